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
                      fused=True, checkpointing=False, lora_dim=0, lora_only=False) -> dict:
    """Steps 1 and 2: one trained model; step 2 runs chosen + rejected (2 x micro-batch) in one backward
    and has a scalar head instead of LM logits."""
    trainable = lora_params(shape, lora_dim) if lora_only else shape.params + lora_params(shape, lora_dim)
    rows = micro_batch * (2 if value_model else 1)
    tokens = rows * seq_len
    step = {"activations": activation_bytes(shape, tokens, nbytes, fused, checkpointing)}
    if not value_model:
        step["logits"] = logits_bytes(shape, tokens, nbytes)
    return peak(trained_bytes(shape.params, trainable, nbytes, zero_stage, world), {"train": step})


def rlhf_memory(actor: ModelShape, critic: ModelShape | None, *, nbytes, world, actor_zero, critic_zero,
                reference: bool, reward_model: ModelShape | None, gen_rows, train_rows, prompt_len, answer_len,
                fused=True, actor_checkpointing=False, critic_checkpointing=False) -> dict:
    """Step 3: actor (+ reference), critic (+ reward model) resident; the peak phase is generation (KV cache),
    experience scoring (no-grad logits of every generated row) or a training micro-batch."""
    length = prompt_len + answer_len
    persistent = trained_bytes(actor.params, actor.params, nbytes, actor_zero, world)
    if reference:
        persistent = add(persistent, frozen_bytes(actor.params, nbytes, actor_zero, world))
    if critic is not None:
        persistent = add(persistent, trained_bytes(critic.params, critic.params, nbytes, critic_zero, world))
    if reward_model is not None:
        persistent = add(persistent, frozen_bytes(reward_model.params, nbytes, critic_zero, world))
    train = {"activations": activation_bytes(actor, train_rows * length, nbytes, fused, actor_checkpointing),
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
class _PlanLog:
    """The data pipeline's logger during a dry run: its notes (skipped rows...) go to stderr."""

    def info(self, msg):
        print(f"[dry run] {msg}", file=sys.stderr, flush=True)


def generation_path(cfg, device_type: str, model_type: str, world: int) -> tuple[str, str]:
    """(backend, reason) step 3 will take: the hybrid engine, our decode loop, or the model's generate().
    The same rule as step3_rlhf/experience.py's `generate`."""
    from step3_rlhf.generation import FAST_FAMILIES
    if cfg.enable_hybrid_engine and device_type == "cuda":
        return "hybrid", "--enable_hybrid_engine on a GPU: DeepSpeed's inference kernels"
    note = "--enable_hybrid_engine needs a GPU; " if cfg.enable_hybrid_engine else ""
    if model_type not in FAST_FAMILIES:
        return "hf", f"{note}model type '{model_type}' is not one our decode loop knows: the model's generate()"
    if cfg.actor_zero_stage == 3:
        return "hf", f"{note}ZeRO-3 gathers the actor's weights layer by layer: the model's generate()"
    return "fast", f"{note}{model_type} decoder on {'one process' if world == 1 else f'{world} processes'}: " \
                   "our KV-cache decode loop"


def _supervised_plan(cfg, stage, world, dtype, device_type):
    from utils.models import load_tokenizer
    from utils.data.pipeline import pair_datasets, sft_datasets
    from utils.train_loop import steps_per_epoch
    value = stage == "step2_reward_model"
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
    train_set, eval_set, _ = (pair_datasets if value else sft_datasets)(cfg, tokenizer, _PlanLog())
    total = cfg.max_steps or cfg.num_train_epochs * steps_per_epoch(
        len(train_set), cfg.per_device_train_batch_size, world, cfg.gradient_accumulation_steps)
    shape = model_shape(cfg.model_name_or_path, value, cfg.trust_remote_code)
    unit = "pairs" if value else "sequences"
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    lines = [f"model {cfg.model_name_or_path}: {shape.model_type}, {millions(shape.params)} parameters"
             + (f", LoRA rank {cfg.lora_dim}{' only' if cfg.only_optimize_lora else ''}" if cfg.lora_dim else ""),
             f"data {' '.join(cfg.data_path)}: {len(train_set)} training / {len(eval_set)} eval {unit}",
             f"batch {cfg.per_device_train_batch_size} per process x {cfg.gradient_accumulation_steps} accumulation x "
             f"{world} process(es) = {global_batch}, max {cfg.max_seq_len} tokens, {total} optimizer steps"]
    mem = supervised_memory(shape, nbytes=dtype_bytes(dtype), zero_stage=cfg.zero_stage, world=world,
                            micro_batch=cfg.per_device_train_batch_size, seq_len=cfg.max_seq_len, value_model=value,
                            fused=cfg.fused_layers, checkpointing=cfg.gradient_checkpointing, lora_dim=cfg.lora_dim,
                            lora_only=cfg.only_optimize_lora)
    return lines, mem


def _rlhf_plan(cfg, world, dtype, device_type):
    from step3_rlhf.engines import needs_reference
    from step3_rlhf.main import plan_steps
    from step3_rlhf.prompt_data import load_prompts
    from utils.models import load_tokenizer
    from utils.stage import reward_model_paths
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.actor_model_name_or_path, cfg.trust_remote_code)
    train_items, eval_items = load_prompts(cfg, tokenizer, _PlanLog())
    steps, actor_updates, _ = plan_steps(cfg, len(train_items), world)
    actor = model_shape(cfg.actor_model_name_or_path, False, cfg.trust_remote_code)
    critic = model_shape(cfg.critic_model_name_or_path, True, cfg.trust_remote_code) if cfg.algo == "ppo" else None
    reward_paths = reward_model_paths(cfg)
    reward = model_shape(reward_paths[0], True, cfg.trust_remote_code) if reward_paths else None
    reference = needs_reference(cfg) and not (cfg.actor_lora_dim and cfg.reference_from_lora and cfg.only_optimize_lora)
    backend, why = generation_path(cfg, device_type, actor.model_type, world)
    models = [f"actor {millions(actor.params)} (ZeRO {cfg.actor_zero_stage})"] + \
        (["reference (frozen copy)"] if reference else []) + \
        ([f"critic {millions(critic.params)} (ZeRO {cfg.critic_zero_stage})"] if critic else []) + \
        ([f"reward model {millions(reward.params)} (frozen)"] if reward else [])
    rows = cfg.per_device_generation_batch_size * cfg.num_generations
    lines = [f"{cfg.algo}: {', '.join(models)}; {actor.model_type}",
             f"prompts: {len(train_items)} training / {len(eval_items[: cfg.eval_prompts])} held-out ({cfg.task})",
             f"{steps} steps of {cfg.generation_batches} x {rows} samples per process, {cfg.ppo_epochs} PPO epoch(s), "
             f"micro-batch {cfg.per_device_training_batch_size}, {actor_updates} actor updates, "
             f"{cfg.max_prompt_seq_len} prompt + {cfg.max_answer_seq_len} answer tokens",
             f"generation: {backend} ({why})"]
    mem = rlhf_memory(actor, critic, nbytes=dtype_bytes(dtype), world=world, actor_zero=cfg.actor_zero_stage,
                      critic_zero=cfg.critic_zero_stage, reference=reference, reward_model=reward, gen_rows=rows,
                      train_rows=cfg.per_device_training_batch_size, prompt_len=cfg.max_prompt_seq_len,
                      answer_len=cfg.max_answer_seq_len, fused=cfg.fused_layers,
                      actor_checkpointing=cfg.actor_gradient_checkpointing,
                      critic_checkpointing=cfg.critic_gradient_checkpointing)
    return lines, mem


def stage_plan(cfg, stage: str) -> tuple[list[str], dict]:
    """(plan lines, memory breakdown) for a stage's config; checks data and model configs on the way."""
    from utils.models import dtype_choice
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, dtype_why = dtype_choice(cfg.dtype)
    zero = f"ZeRO {cfg.zero_stage}" if stage != "step3_rlhf" else \
        f"ZeRO actor {cfg.actor_zero_stage} / critic {cfg.critic_zero_stage}"
    head = f"{stage}: {world} process(es) on {device_type}, dtype {str(dtype).replace('torch.', '')} ({dtype_why}), " \
           f"{zero}{', offload' if cfg.offload else ''}"
    lines, mem = _rlhf_plan(cfg, world, dtype, device_type) if stage == "step3_rlhf" else \
        _supervised_plan(cfg, stage, world, dtype, device_type)
    return [head] + lines + [f"peak memory per process (estimate): {format_breakdown(mem)}"], mem


def dry_run(cfg, stage: str) -> None:
    """What `--dry_run` does at the top of a stage's main: preflight, plan, estimate; nothing is trained."""
    from utils.stage import preflight
    preflight(cfg, stage)
    lines, _ = stage_plan(cfg, stage)
    if os.environ.get("RANK", "0") == "0":  # under the launcher every rank plans; one prints
        for line in lines:
            print(f"[dry run] {line}", flush=True)
        print(f"[dry run] options, data and model configs are valid; nothing was trained (output: {cfg.output_dir})",
              flush=True)
