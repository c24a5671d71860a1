"""Step 3's rollout plug-in point: who samples the responses (see base.Rollout for the interface).

One file per backend, one entry in BACKENDS each: fast (our decode loop, decode_loop.py), hf (the model's
generate, hf_generate.py), hybrid (DeepSpeed's hybrid engine, hybrid_engine.py). A new backend (vLLM) is a
Rollout subclass in its own file - `why_not` says where it cannot run, `_responses` samples, `sync_weights`
pushes the actor's weights after each round of updates - plus its entry here; --generation_backend offers
every entry.
"""
from __future__ import annotations

from step3_rlhf.rollout.base import Rollout, action_mask_from, actor_scoring_mode, eos_ids
from step3_rlhf.rollout.decode_loop import FastRollout
from step3_rlhf.rollout.hf_generate import HFRollout, ignored_generation_extras
from step3_rlhf.rollout.hybrid_engine import HybridRollout, hybrid_kernels_missing

BACKENDS = {"fast": FastRollout, "hf": HFRollout, "hybrid": HybridRollout}
# what --generation_backend auto tries, in order: DeepSpeed's kernels where enabled and able, then our loop
# where it is exact, then generate() (which always runs)
AUTO_ORDER = ("hybrid", "fast", "hf")
FALLBACK = "hf"

__all__ = ["BACKENDS", "Rollout", "action_mask_from", "actor_scoring_mode", "build_rollout", "choose_backend",
           "eos_ids", "generate", "planned_backend"]


def choose_backend(cfg, actor, use_hybrid=False, synced_gpus=False) -> tuple[str, str]:
    """(backend name, why) for --generation_backend: auto tries AUTO_ORDER, a named backend falls back to hf
    where it cannot run (the reason says why). The same on every rank: every input is."""
    want = getattr(cfg, "generation_backend", "auto") or "auto"
    order = AUTO_ORDER if want == "auto" else (want, FALLBACK)
    skipped = []
    for name in order:
        why_not = BACKENDS[name].why_not(actor, use_hybrid=use_hybrid, synced_gpus=synced_gpus)
        if why_not is None:
            return name, "; ".join([f"--generation_backend {want}"] + skipped)
        skipped.append(f"not {name}: {why_not}")
    raise AssertionError(f"the {FALLBACK} backend always runs")  # pragma: no cover


def planned_backend(cfg, device_type="cpu", world_size=1) -> tuple[str, str]:
    """choose_backend before any weights are loaded (a --dry_run plan): the actor's architecture is built on the
    meta device from its config, and ZeRO-3 partitioning is predicted from --actor_zero_stage."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from utils.models import resolve_model_path
    remote = getattr(cfg, "trust_remote_code", False)
    config = AutoConfig.from_pretrained(resolve_model_path(cfg.actor_model_name_or_path), trust_remote_code=remote)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    if cfg.actor_zero_stage == 3:
        next(model.parameters()).ds_id = 0  # the mark ZeRO-3 puts on the parameters it partitions
    use_hybrid = cfg.enable_hybrid_engine and device_type == "cuda"
    kernels_missing = hybrid_kernels_missing(model) if use_hybrid else None  # then engines.py builds a plain one
    name, why = choose_backend(cfg, model, use_hybrid and not kernels_missing,
                               cfg.actor_zero_stage == 3 and world_size > 1)
    return name, why + (f" ({kernels_missing})" if kernels_missing else "")


def build_rollout(cfg, actor, tokenizer, ctx=None, log=None, use_hybrid=None) -> Rollout:
    """The run's rollout backend for `actor` (an engine or a plain model), chosen once and logged in one line.

    `ctx`: the stage context (device, world size); `use_hybrid`: whether the actor IS a hybrid engine
    (Engines.use_hybrid; default: --enable_hybrid_engine on a GPU, the rule engines.py builds it by)."""
    device = getattr(ctx, "device", None)
    if use_hybrid is None:
        use_hybrid = bool(getattr(cfg, "enable_hybrid_engine", False)) and getattr(device, "type", "") == "cuda"
    # ZeRO-3 across processes: every rank must run generate's forwards in lockstep (DeepSpeed gathers per layer)
    synced = getattr(cfg, "actor_zero_stage", 0) == 3 and getattr(ctx, "world_size", 1) > 1
    name, why = choose_backend(cfg, actor, use_hybrid, synced)
    rollout = BACKENDS[name](cfg, actor, tokenizer, synced)
    if log is not None:
        log.info(f"generation backend: {name} ({why})")
        extras = ignored_generation_extras(rollout.model)
        if extras:
            log.info(f"the model's generation_config also sets {', '.join(f'{k}={v}' for k, v in extras.items())}: "
                     "ignored - rollouts sample with --temperature/--top_p/--top_k only, the distribution the "
                     "log-probs are computed of")
    return rollout


def generate(actor, prompt_ids, prompt_mask, cfg, tokenizer, group_size=1, return_logprobs=False):
    """One-off sampling outside a run (tests, scripts): build_rollout on one process, then generate."""
    return build_rollout(cfg, actor, tokenizer).generate(prompt_ids, prompt_mask, group_size, return_logprobs)
