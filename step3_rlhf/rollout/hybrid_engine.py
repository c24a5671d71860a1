"""The "hybrid" rollout backend: DeepSpeed's hybrid engine generates with its inference kernels.

The call order is DeepSpeed-Chat's (dschat/rlhf/ppo_trainer.py, generate_experience): the ENGINE's `eval()` -
`DeepSpeedHybridEngine.eval()` is what swaps each layer's forward for its inference container's - then the
engine's generate, then the engine's `train()`, which swaps the training forwards back. Calling `eval()` on
the unwrapped module instead never swaps the kernels in (generation runs the training forwards), and a
log-prob forward after an engine `eval()` would run the inference kernels (old log-probs that differ from the
update's new ones before any step). So generation ends with `engine.train()`, and the log-prob forwards put
the actor in `actor_scoring_mode` (engine.train() + the module's eval()) rather than `engine.eval()`.

Where the kernels cannot generate, `hybrid_kernels_missing` says why before any engine is built, and step 3
builds a plain engine instead (one line in the log; the rollout backend is then chosen as without the flag).
Measured on an H200 (DeepSpeed 0.19.8, transformers 5.17, bench/gpu_check.py):
  - families without a DeepSpeed inference policy (Qwen2, Mistral, Gemma; OPT in transformers' Cache-based
    layers): no inference containers, and the engine's `generate` fails with an AttributeError (no `_generate`);
  - grouped-query attention (SmolLM2, Llama-3: fewer key/value heads than query heads): the LLaMA kernels
    assume one per query head and fail with "CUDA error: misaligned address", which ends the process;
  - layers whose caller takes the return value as the hidden states (`hidden_states = decoder_layer(...)`,
    transformers 5 does): DeepSpeed's layers return a tuple, and generation fails with
    "'tuple' object has no attribute 'size'".
"""
from __future__ import annotations

import inspect
import re

from step3_rlhf.rollout.hf_generate import HFRollout
from utils.models import unwrap


def _policy_layer_classes() -> dict:
    """{transformer layer class: DeepSpeed policy name}, filtered as DeepSpeedHybridEngine's
    populate_all_inference_policies filters them (an OPT layer with the Cache-based forward has no kernels)."""
    from deepspeed.module_inject.containers.opt import HFOPTLayerPolicy
    from deepspeed.module_inject.replace_policy import replace_policies
    found = {}
    for policy in replace_policies:
        policy(None)  # what DeepSpeed does: the constructor resolves _orig_layer_class from transformers
        layer = policy._orig_layer_class
        if policy is HFOPTLayerPolicy and layer is not None:
            params = inspect.signature(layer.forward).parameters
            if "cache_position" in params or "past_key_values" in params:
                continue
        for cls in (layer if isinstance(layer, list) else [layer] if layer is not None else []):
            found[cls] = policy.__name__
    return found


def grouped_query_reason(model) -> str | None:
    """Why DeepSpeed's kernels cannot run a model with fewer key/value heads than query heads, else None."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads and kv_heads != heads:
        return (f"DeepSpeed's inference kernels assume one key/value head per query head; this model has {kv_heads} "
                f"for {heads} (grouped-query attention)")
    return None


_TENSOR_CONTRACT = re.compile(r"hidden_states\s*=\s*decoder_layer\(")


def layer_contract_reason(model) -> str | None:
    """Why DeepSpeed's layers cannot stand in for the model's, else None: its inference layers return a tuple,
    and newer transformers code uses a layer's return value as the hidden states."""
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: c.__qualname__):  # one message everywhere
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        if _TENSOR_CONTRACT.search(source):
            return (f"{cls.__name__} takes its layers' return value as the hidden states (this transformers "
                    "version), and DeepSpeed's inference layers return a tuple")
    return None


def hybrid_kernels_missing(actor) -> str | None:
    """None where DeepSpeed's hybrid engine has inference kernels that can generate for the actor, else why not.

    A built DeepSpeedHybridEngine says itself whether it has kernels (its inference containers); otherwise
    (before the engine is built, or a stand-in) the layer classes are looked up in DeepSpeed's policy map.
    Then the model is checked for what the kernels get wrong (module docstring). The same on every rank."""
    model = unwrap(actor)
    family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    containers = getattr(actor, "_inference_containers", None)
    if containers is not None:
        found = len(containers) > 0
    else:
        try:
            policies = _policy_layer_classes()
        except ImportError as e:
            return f"DeepSpeed's inference policies cannot be loaded ({e})"
        found = any(type(m) in policies for m in model.modules())
    if not found:
        return f"DeepSpeed has no inference kernels for model type {family!r} (no policy for its layers)"
    return grouped_query_reason(model) or layer_contract_reason(model)


class HybridRollout(HFRollout):
    """The hf backend's generate, through the hybrid engine and between engine.eval() and engine.train()."""

    name = "hybrid"

    @staticmethod
    def why_not(actor, use_hybrid=False, synced_gpus=False):
        if not use_hybrid:
            return "no hybrid engine (--enable_hybrid_engine, on a GPU, for a model its kernels can run)"
        return hybrid_kernels_missing(actor)

    def _generate_fn(self):
        return self.actor.generate  # DeepSpeedHybridEngine.generate: gathers (ZeRO-3), fuses, runs the kernels

    def _enter_generation(self):
        self.actor.eval()  # the ENGINE's eval(): swaps its inference kernels in

    def _leave_generation(self, was_training):
        self.actor.train()  # training forwards back before any log-prob forward
        if not was_training:
            self.model.eval()  # the module's flag back; the engine stays on its training forwards
