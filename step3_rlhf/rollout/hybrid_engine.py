"""The "hybrid" rollout backend: DeepSpeed's hybrid engine generates with its inference kernels.

The call order is DeepSpeed-Chat's (dschat/rlhf/ppo_trainer.py, generate_experience): the ENGINE's `eval()` -
`DeepSpeedHybridEngine.eval()` is what swaps each layer's forward for its inference container's - then the
engine's generate, then the engine's `train()`, which swaps the training forwards back. Calling `eval()` on
the unwrapped module instead never swaps the kernels in (generation runs the training forwards), and a
log-prob forward after an engine `eval()` would run the inference kernels (old log-probs that differ from the
update's new ones before any step). So generation ends with `engine.train()`, and the log-prob forwards put
the actor in `actor_scoring_mode` (engine.train() + the module's eval()) rather than `engine.eval()`.

Families without a DeepSpeed inference policy (Qwen2, Mistral, Gemma, ...): the engine builds no inference
containers, never sets its `_generate`, and its `generate` fails with an AttributeError on first use. That is
detected before the first rollout (`hybrid_kernels_missing`), and build_rollout falls back to the hf backend
with a one-line notice.
"""
from __future__ import annotations

import inspect

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


def hybrid_kernels_missing(actor) -> str | None:
    """None where DeepSpeed's hybrid engine has inference kernels for the actor's layers, else why not.

    A built DeepSpeedHybridEngine says itself (its inference containers); otherwise (before the engine is
    built, or a stand-in) the layer classes are looked up in DeepSpeed's policy map. The same on every rank."""
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
    if found:
        return None
    return f"DeepSpeed has no inference kernels for model type {family!r} (no policy for its layers)"


class HybridRollout(HFRollout):
    """The hf backend's generate, through the hybrid engine and between engine.eval() and engine.train()."""

    name = "hybrid"

    @staticmethod
    def why_not(actor, use_hybrid=False, synced_gpus=False):
        if not use_hybrid:
            return "needs --enable_hybrid_engine on a GPU"
        return hybrid_kernels_missing(actor)

    def _generate_fn(self):
        return self.actor.generate  # DeepSpeedHybridEngine.generate: gathers (ZeRO-3), fuses, runs the kernels

    def _enter_generation(self):
        self.actor.eval()  # the ENGINE's eval(): swaps its inference kernels in

    def _leave_generation(self, was_training):
        self.actor.train()  # training forwards back before any log-prob forward
        if not was_training:
            self.model.eval()  # the module's flag back; the engine stays on its training forwards
