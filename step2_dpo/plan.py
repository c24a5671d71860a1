"""`--dry_run` of step2_dpo: the plan and the peak-memory estimate of a DPO run (utils/plan.py's arithmetic).

Per process: the policy's weights, gradients and optimizer state as step 1's; the frozen reference's weights
(sharded only at ZeRO-3, none with --reference_free); and the larger transient of the reference's no-grad
forward (its logits) and the policy's training micro-batch (2 x micro-batch rows: chosen and rejected, their
activations and the logits with their gradient, read through utils/losses.py gather_logprobs).
"""
from __future__ import annotations

from utils.plan import (PlanLog, activation_bytes, add, dtype_bytes, frozen_bytes, label_logprob_bytes, logits_bytes,
                        lora_params, millions, model_shape, peak, trained_bytes)


def dpo_memory(shape, *, nbytes, zero_stage, world, micro_batch, seq_len, reference=True, fused=True,
               checkpointing=False, lora_dim=0, lora_only=False) -> dict:
    """Peak bytes per process of a DPO run (pure arithmetic; the breakdown of utils/plan.peak)."""
    trainable = lora_params(shape, lora_dim) if lora_only else shape.params + lora_params(shape, lora_dim)
    persistent = trained_bytes(shape.params, trainable, nbytes, zero_stage, world)
    tokens = 2 * micro_batch * seq_len  # chosen and rejected rows of one micro-batch
    phases = {"train": {"activations": activation_bytes(shape, tokens, nbytes, fused, checkpointing),
                        "logits": label_logprob_bytes(shape, tokens, nbytes)}}
    if reference:
        persistent = add(persistent, frozen_bytes(shape.params, nbytes, zero_stage, world))
        phases["reference"] = {"logits": logits_bytes(shape, tokens, nbytes, with_grad=False)}
    return peak(persistent, phases)


def dpo_plan(cfg, world, dtype, device_type):
    """(plan lines, memory breakdown) of a DPO run; reads the data and the model's config.json."""
    from utils.data.pipeline import pair_datasets
    from utils.models import load_tokenizer
    from utils.train_loop import steps_per_epoch
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
    train_set, eval_set, _ = pair_datasets(cfg, tokenizer, PlanLog())
    total = cfg.max_steps or cfg.num_train_epochs * steps_per_epoch(
        len(train_set), cfg.per_device_train_batch_size, world, cfg.gradient_accumulation_steps)
    shape = model_shape(cfg.model_name_or_path, False, cfg.trust_remote_code)
    ref = "none (--reference_free)" if cfg.reference_free else \
        f"a frozen copy, ZeRO {3 if cfg.zero_stage == 3 else 0}{', offload' if cfg.offload_reference_model else ''}"
    smoothing = f", label smoothing {cfg.label_smoothing}" if cfg.label_smoothing else ""
    lines = [f"policy {cfg.model_name_or_path}: {shape.model_type}, {millions(shape.params)} parameters, ZeRO "
             f"{cfg.zero_stage}{', offload' if cfg.offload else ''}"
             + (f", LoRA rank {cfg.lora_dim}{' only' if cfg.only_optimize_lora else ''}" if cfg.lora_dim else ""),
             f"reference: {ref}; loss {cfg.loss_type}, beta {cfg.beta}{smoothing}",
             f"data {' '.join(cfg.data_path)}: {len(train_set)} training / {len(eval_set)} eval pairs",
             f"batch {cfg.per_device_train_batch_size} pairs per process x {cfg.gradient_accumulation_steps} "
             f"accumulation x {world} process(es), max {cfg.max_seq_len} tokens, {total} optimizer steps"]
    mem = dpo_memory(shape, nbytes=dtype_bytes(dtype), zero_stage=cfg.zero_stage, world=world,
                     micro_batch=cfg.per_device_train_batch_size, seq_len=cfg.max_seq_len,
                     reference=not cfg.reference_free, fused=cfg.fused_layers,
                     checkpointing=cfg.gradient_checkpointing, lora_dim=cfg.lora_dim,
                     lora_only=cfg.only_optimize_lora)
    return lines, mem
