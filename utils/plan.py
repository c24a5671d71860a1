"""`--dry_run`: check a stage's options, data and model configs, print the plan and a peak-memory estimate
per rank, and exit 0 without loading a weight.

The estimate is arithmetic on the model configs (config.json; parameter counts from a model built on the
meta device) and the batch options - `rank_memory` and the helpers below are pure functions with a unit test
against a hand computation; bench/memory_estimate.py compares them with measured peaks. What each term counts:

- weights: parameters x dtype bytes (ZeRO-3: / processes);
- gradients: trained parameters x (dtype bytes + 4 where the dtype is 16-bit: DeepSpeed's bf16/fp16
  optimizers keep an fp32 gradient buffer) (ZeRO-2/3: / processes);
- optimizer: trained parameters x (8 for Adam's two fp32 moments + 4 for the fp32 master copy of a 16-bit
  model) (ZeRO >= 1: / processes);
- activations: what backward keeps per token and layer (ACT_* below) x tokens of a micro-batch;
- logits: tokens x vocabulary x (dtype bytes + 8: the fp32 log-softmax and its gradient; + 4 without grad;
  step 3's training log-probs keep only the logits and their gradient in the dtype: 2 x dtype bytes);
- KV cache (step 3): 2 x layers x KV heads x head dim x rows x (prompt + answer) x dtype bytes;
- runtime: the Python process itself (torch, DeepSpeed, transformers, gloo), measured on CPU.
Peak = all persistent terms + the largest transient phase (training micro-batch, or in step 3 generation /
experience scoring / training).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

GB = 1e9
# Bytes a stage process holds before any model: interpreter + torch + DeepSpeed + transformers + gloo
# (RSS measured on CPU with bench/memory_estimate.py's empty run). On a GPU the CUDA context is extra.
RUNTIME_BYTES = 0.55e9
# Saved activations per token and transformer block, in units of the dtype, as multiples of the hidden
# size h and the MLP width i: attention in/out, q/k/v, the residual stream and the MLP's gate/up/act inputs.
# utils/fused_layers.py keeps only the inputs of RMSNorm and SwiGLU, which drops about 2h + 2i of that.
ACT_H, ACT_I = 10, 3
ACT_H_FUSED, ACT_I_FUSED = 8, 1


@dataclass
class ModelShape:
    """What the estimate needs from a model's config.json."""
    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    model_type: str = ""

    @property
    def head_dim(self):
        return self.hidden // max(self.heads, 1)


def millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def model_shape(name_or_path: str, value_model=False, trust_remote_code=False) -> ModelShape:
    """Shape and exact parameter count from config.json alone: the model is built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from utils.models import ModelLoadError, resolve_model_path
    path = resolve_model_path(name_or_path, need_weights=False)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config of '{name_or_path}': {str(e).splitlines()[0][:200]}") from None
    with torch.device("meta"):
        if value_model:
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def get(*names, default=0):  # the first of several config names a family uses for one quantity
        return next((getattr(text, n) for n in names if getattr(text, n, None)), default)
    hidden = get("hidden_size", "d_model", "n_embd")
    heads = get("num_attention_heads", "n_head", default=1)
    return ModelShape(params=sum(p.numel() for p in model.parameters()), layers=get("num_hidden_layers", "n_layer"),
                      hidden=hidden, intermediate=get("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
                      heads=heads, kv_heads=get("num_key_value_heads", default=heads), vocab=get("vocab_size"),
                      model_type=getattr(config, "model_type", ""))


# ------------------------------------------------------------------------------------ pure arithmetic
def lora_params(shape: ModelShape, rank: int) -> int:
    """LoRA weights on a block's 4 attention and 3 MLP projections: rank x (in + out) each."""
    h, i = shape.hidden, shape.intermediate
    return shape.layers * rank * (4 * 2 * h + 3 * (h + i))


def trained_bytes(params, trainable, nbytes, zero_stage, world) -> dict:
    """Weights, gradients and optimizer state of a model trained with DeepSpeed at `zero_stage`."""
    master = 4 if nbytes < 4 else 0
    return {"weights": params * nbytes / (world if zero_stage >= 3 else 1),
            "gradients": trainable * (nbytes + master) / (world if zero_stage >= 2 else 1),
            "optimizer": trainable * (8 + master) / (world if zero_stage >= 1 else 1)}


def frozen_bytes(params, nbytes, zero_stage, world) -> dict:
    return {"weights": params * nbytes / (world if zero_stage >= 3 else 1)}


def activation_bytes(shape: ModelShape, tokens, nbytes, fused=True, checkpointing=False) -> float:
    """What backward keeps for `tokens` tokens; with gradient checkpointing one hidden state per block plus
    one block recomputed at a time."""
    per_block = (ACT_H_FUSED * shape.hidden + ACT_I_FUSED * shape.intermediate) if fused else \
        (ACT_H * shape.hidden + ACT_I * shape.intermediate)
    if checkpointing:
        return tokens * nbytes * (shape.layers * shape.hidden + per_block)
    return tokens * nbytes * shape.layers * per_block


def logits_bytes(shape: ModelShape, tokens, nbytes, with_grad=True) -> float:
    return tokens * shape.vocab * (nbytes + (8 if with_grad else 4))


def label_logprob_bytes(shape: ModelShape, tokens, nbytes) -> float:
    """Step 3's training log-probs: the logits and their gradient, both in the model's dtype (utils/losses.py
    _LabelLogProb keeps no fp32 copy of [tokens, vocabulary])."""
    return tokens * shape.vocab * 2 * nbytes


def kv_cache_bytes(shape: ModelShape, rows, length, nbytes) -> float:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * rows * length * nbytes


def add(*parts: dict) -> dict:
    out = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0.0) + v
    return out


def peak(persistent: dict, phases: dict, runtime=RUNTIME_BYTES) -> dict:
    """Peak = persistent terms + the largest transient phase. Returns the breakdown with 'total' and 'phase'."""
    name, transient = max(phases.items(), key=lambda kv: sum(kv[1].values())) if phases else ("", {})
    out = add(persistent, transient, {"runtime": runtime})
    out["total"] = sum(out.values())
    out["phase"] = name
    return out


def supervised_memory(shape: ModelShape, *, nbytes, zero_stage, world, micro_batch, seq_len, value_model,
                      fused=True, checkpointing=False, lora_dim=0, lora_only=False, lm_loss=False) -> dict:
    """Steps 1 and 2: one trained model; step 2 runs chosen + rejected (2 x micro-batch) in one backward
    and has a scalar head instead of LM logits, except with --lm_loss_coef (`lm_loss`): then the chosen
    rows' LM logits are kept for the backward too."""
    trainable = lora_params(shape, lora_dim) if lora_only else shape.params + lora_params(shape, lora_dim)
    rows = micro_batch * (2 if value_model else 1)
    tokens = rows * seq_len
    step = {"activations": activation_bytes(shape, tokens, nbytes, fused, checkpointing)}
    if not value_model or lm_loss:
        step["logits"] = logits_bytes(shape, micro_batch * seq_len, nbytes)
    return peak(trained_bytes(shape.params, trainable, nbytes, zero_stage, world), {"train": step})


def rlhf_memory(actor: ModelShape, critic: ModelShape | None, *, nbytes, world, actor_zero, critic_zero,
                reference: bool, reward_model: ModelShape | None, gen_rows, train_rows, prompt_len, answer_len,
                fused=True, actor_checkpointing=False, critic_checkpointing=False) -> dict:
    """Step 3: actor (+ reference), critic (+ reward model) resident; the peak phase is generation (KV cache),
    experience scoring (no-grad logits of every generated row) or a training micro-batch. The gradients belong to
    the training phase, one model's at a time: the trainer updates the actor, then the critic, and DeepSpeed
    frees each one's gradients at its step (measured on bench W: 4.0 GiB live at rest = weights + optimizer)."""
    length = prompt_len + answer_len
    actor_state = trained_bytes(actor.params, actor.params, nbytes, actor_zero, world)
    grads = actor_state.pop("gradients")
    persistent = actor_state
    if reference:
        persistent = add(persistent, frozen_bytes(actor.params, nbytes, actor_zero, world))
    if critic is not None:
        critic_state = trained_bytes(critic.params, critic.params, nbytes, critic_zero, world)
        grads = max(grads, critic_state.pop("gradients"))
        persistent = add(persistent, critic_state)
    if reward_model is not None:
        persistent = add(persistent, frozen_bytes(reward_model.params, nbytes, critic_zero, world))
    train = {"gradients": grads,
             "activations": activation_bytes(actor, train_rows * length, nbytes, fused, actor_checkpointing),
             "logits": label_logprob_bytes(actor, train_rows * length, nbytes)}
    if critic is not None:  # the critic trains after the actor's graph is freed: the larger of the two counts
        c = activation_bytes(critic, train_rows * length, nbytes, fused, critic_checkpointing)
        train["activations"] = max(train["activations"], c)
    phases = {"generation": {"kv_cache": kv_cache_bytes(actor, gen_rows, length, nbytes),
                             "logits": gen_rows * actor.vocab * 4},
              "experience": {"logits": logits_bytes(actor, gen_rows * length, nbytes, with_grad=False)},
              "train": train}
    return peak(persistent, phases)


def format_breakdown(mem: dict) -> str:
    parts = [f"{k} {mem[k] / GB:.2f}" for k in ("weights", "gradients", "optimizer", "activations", "kv_cache",
                                                  "logits", "runtime") if mem.get(k)]
    return f"{mem['total'] / GB:.2f} GB at {mem['phase'] or 'start'} = " + " + ".join(parts)


# ------------------------------------------------------------------------------------ the stage plans
class PlanLog:
    """The data pipeline's logger during a dry run: its notes (skipped rows...) go to stderr."""

    def info(self, msg):
        print(f"[dry run] {msg}", file=sys.stderr, flush=True)


def supervised_plan(cfg, world, dtype, device_type, value=False):
    """Steps 1 and 2 (`value`: a reward model): (plan lines, memory breakdown)."""
    from utils.models import load_tokenizer
    from utils.data.pipeline import pair_datasets, sft_datasets
    from utils.train_loop import steps_per_epoch
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
    train_set, eval_set, _ = (pair_datasets if value else sft_datasets)(cfg, tokenizer, PlanLog())
    total = cfg.max_steps or cfg.num_train_epochs * steps_per_epoch(
        len(train_set), cfg.per_device_train_batch_size, world, cfg.gradient_accumulation_steps)
    shape = model_shape(cfg.model_name_or_path, value, cfg.trust_remote_code)
    unit = "pairs" if value else "sequences"
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    lines = [f"model {cfg.model_name_or_path}: {shape.model_type}, {millions(shape.params)} parameters, "
             f"ZeRO {cfg.zero_stage}{', offload' if cfg.offload else ''}"
             + (f", LoRA rank {cfg.lora_dim}{' only' if cfg.only_optimize_lora else ''}" if cfg.lora_dim else ""),
             f"data {' '.join(cfg.data_path)}: {len(train_set)} training / {len(eval_set)} eval {unit}",
             f"batch {cfg.per_device_train_batch_size} per process x {cfg.gradient_accumulation_steps} accumulation x "
             f"{world} process(es) = {global_batch}, max {cfg.max_seq_len} tokens, {total} optimizer steps"]
    mem = supervised_memory(shape, nbytes=dtype_bytes(dtype), zero_stage=cfg.zero_stage, world=world,
                            micro_batch=cfg.per_device_train_batch_size, seq_len=cfg.max_seq_len, value_model=value,
                            fused=cfg.fused_layers, checkpointing=cfg.gradient_checkpointing, lora_dim=cfg.lora_dim,
                            lora_only=cfg.only_optimize_lora, lm_loss=value and cfg.lm_loss_coef > 0)
    return lines, mem


def stage_plan(cfg, plan=supervised_plan) -> tuple[list[str], dict]:
    """(plan lines, memory breakdown) for a stage's config; checks data and model configs on the way.
    `plan(cfg, world, dtype, device_type)` is the stage's own part (step 3 passes its own)."""
    from utils.models import dtype_choice
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, dtype_why = dtype_choice(cfg.dtype)
    head = f"{cfg.stage_name}: {world} process(es) on {device_type}, dtype {str(dtype).replace('torch.', '')} " \
           f"({dtype_why})"
    lines, mem = plan(cfg, world, dtype, device_type)
    return [head] + lines + [f"peak memory per process (estimate): {format_breakdown(mem)}"], mem


def dry_run(cfg, plan=supervised_plan) -> None:
    """What `--dry_run` does at the top of a stage's main: preflight, plan, estimate; nothing is trained."""
    from utils.stage import preflight
    preflight(cfg)
    lines, _ = stage_plan(cfg, plan)
    if os.environ.get("RANK", "0") == "0":  # under the launcher every rank plans; one prints
        for line in lines:
            print(f"[dry run] {line}", flush=True)
        print(f"[dry run] options, data and model configs are valid; nothing was trained (output: {cfg.output_dir})",
              flush=True)
