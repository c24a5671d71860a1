"""The "hf" rollout backend: the model's own `generate` with a KV cache, sampling with our settings only.

It runs where our decode loop does not: ZeRO-3 across several processes (`synced_gpus`: every rank steps
through generate in lockstep, DeepSpeed gathering each layer's parameters as it runs), model families the loop
is not tested on, encoder-decoders.

Only our sampling settings: `generate` fills every setting we leave unset from the model's `generation_config`,
so a checkpoint whose generation_config sets repetition_penalty, no_repeat_ngram_size, min_p, suppress_tokens,
... would sample from a different distribution than the one our decode loop samples from and the one scoring
computes log-probs of (softmax(logits / temperature)). During the call the model's generation_config is
replaced by one holding only --temperature/--top_p/--top_k/--min/max_answer_seq_len, EOS and pad
(`ignored_generation_extras` names what is dropped; build_rollout logs it once).
"""
from __future__ import annotations

from contextlib import contextmanager

from step3_rlhf.rollout.base import Rollout

# generation_config keys that are ours (set from flags / the tokenizer) or that do not change which tokens are
# sampled; anything else a model's generation_config sets is an extra the rollout ignores
OWN_OR_NEUTRAL = {"do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens", "max_length",
                  "min_length", "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache",
                  "cache_implementation", "cache_config", "transformers_version", "return_dict_in_generate",
                  "output_scores", "output_logits", "output_attentions", "output_hidden_states"}


def sampling_kwargs(cfg, eos, pad_id) -> dict:
    """generate() settings from our flags: temperature 0 = greedy; top_k 0 = off (explicit, not generate()'s 50)."""
    sample = bool(cfg.temperature and cfg.temperature > 0)
    return dict(max_new_tokens=cfg.max_answer_seq_len, min_new_tokens=cfg.min_answer_seq_len or None,
                do_sample=sample, temperature=cfg.temperature if sample else None,
                top_p=cfg.top_p if sample else None, top_k=cfg.top_k if sample else None,
                pad_token_id=pad_id, eos_token_id=eos, use_cache=True)


def ignored_generation_extras(model) -> dict:
    """Settings of the model's generation_config that change sampling and that the rollout does not apply."""
    from transformers import GenerationConfig
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return {}
    defaults = GenerationConfig()._get_default_generation_params() \
        if hasattr(GenerationConfig, "_get_default_generation_params") else {}
    return {k: v for k, v in sorted(gen.to_diff_dict().items())
            if not k.startswith("_") and k not in OWN_OR_NEUTRAL and v is not None and v != defaults.get(k)}


@contextmanager
def only_these_settings(model, settings: dict):
    """Run generate() with `settings` and global defaults only: the model's generation_config swapped out."""
    from transformers import GenerationConfig
    saved = model.generation_config
    model.generation_config = GenerationConfig(**settings)
    try:
        yield
    finally:
        model.generation_config = saved


class HFRollout(Rollout):
    """`generate` of the actor's module (no log-probs: `return_logprobs` gives None)."""

    name = "hf"

    def __init__(self, cfg, actor, tokenizer, synced_gpus=False):
        super().__init__(cfg, actor, tokenizer, synced_gpus)

    @property
    def settings(self):  # from self.cfg at each call: Rollout.temperature swaps it for evaluation
        return sampling_kwargs(self.cfg, self.eos, self.pad_id)

    def _generate_fn(self):
        return self.model.generate

    def _responses(self, prompt_ids, prompt_mask, group_size, return_logprobs):
        # the settings go in as keyword arguments too: DeepSpeed's hybrid engine reads max/min_new_tokens there
        with only_these_settings(self.model, self.settings):
            seq = self._generate_fn()(input_ids=prompt_ids, attention_mask=prompt_mask, synced_gpus=self.synced_gpus,
                                      **self.settings)
        return seq[:, prompt_ids.shape[1]:], None
