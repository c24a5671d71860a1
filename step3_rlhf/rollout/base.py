"""What every rollout backend shares: the interface, the end-of-response rules and the batch layout it returns.

Layout (written once, here): prompts are LEFT-padded to P tokens, responses follow at positions P..P+R-1 and
are RIGHT-padded; `action_mask` [B, R] is 1 up to and including each response's first EOS and 0 after it.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch

from utils.models import unwrap


def eos_ids(tokenizer, model) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation_config EOS (one or a list)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def action_mask_from(responses: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after (also when pad == eos)."""
    is_eos = torch.isin(responses, torch.tensor(eos, device=responses.device))
    after_first_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after_first_eos).float()


def actor_scoring_mode(actor):
    """Put the actor in the mode its log-prob forwards run in: the training forwards (`engine.train()`; for
    DeepSpeed's hybrid engine that swaps its inference kernels back out, so old log-probs come from the same
    kernels as the update's new ones and the first ratio is 1), without dropout (the module's `eval()`, which
    swaps nothing). For any other engine this is exactly `engine.eval()`."""
    actor.train()
    unwrap(actor).eval()


class Rollout:
    """Samples responses to prompts with the current actor. Built once per run by `build_rollout`.

    `generate(prompt_ids, prompt_mask, group_size=1, return_logprobs=False)` -> (sequences [B, P+R],
    action_mask [B, R]) and, with `return_logprobs`, the sampled tokens' log-probs [B, R] under
    logits / temperature (None from a backend that cannot give them). `group_size` G: rows come in groups of G
    copies of one prompt (GRPO, group-major), which a backend may use to run each prompt once.
    `sync_weights()`: make the next `generate` use the actor's current weights - nothing to do for a backend
    that runs the actor's own module in this process; a separate inference server (vLLM) pushes them here.
    A subclass implements `_responses` (and `why_not` when it can run only in some set-ups)."""

    name = ""

    def __init__(self, cfg, actor, tokenizer, synced_gpus=False):
        self.cfg, self.actor, self.synced_gpus = cfg, actor, synced_gpus
        self.model = unwrap(actor)
        self.eos = eos_ids(tokenizer, self.model)
        self.pad_id = tokenizer.pad_token_id

    @staticmethod
    def why_not(actor, use_hybrid=False, synced_gpus=False) -> str | None:
        """None where this backend can generate for `actor` in this set-up, else the reason it cannot. Must
        give the same answer on every rank (it decides which collectives generation makes)."""
        return None

    def sync_weights(self):
        """In-process backends generate with the actor's own parameters: nothing to push."""

    @contextmanager
    def temperature(self, value):
        """Sample at `value` for the calls inside (0 = greedy; None = --temperature): held-out evaluation.
        A backend reads its sampling settings from self.cfg at each call, so swapping that copy is enough."""
        saved = self.cfg
        if value is not None:
            self.cfg = dataclasses.replace(saved, temperature=value)
        try:
            yield
        finally:
            self.cfg = saved

    @contextmanager
    def generation_mode(self):
        """The generating mode for the call, the module's training flag restored after."""
        was_training = self.model.training
        self._enter_generation()
        try:
            yield
        finally:
            self._leave_generation(was_training)

    def _enter_generation(self):
        self.model.eval()  # no dropout while sampling

    def _leave_generation(self, was_training):
        self.model.train(was_training)

    def _responses(self, prompt_ids, prompt_mask, group_size, return_logprobs):
        """(responses [B, R'], logprobs [B, R'] or None); R' may be 0."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, prompt_ids, prompt_mask, group_size=1, return_logprobs=False):
        with self.generation_mode():
            responses, logps = self._responses(prompt_ids, prompt_mask, group_size, return_logprobs)
        if responses.shape[1] == 0:  # nothing generated at all (max_answer_seq_len 0): one masked pad column
            responses = torch.full((prompt_ids.shape[0], 1), self.pad_id, dtype=prompt_ids.dtype,
                                   device=prompt_ids.device)
            mask = torch.zeros_like(responses, dtype=torch.float)
            logps = torch.zeros_like(mask) if return_logprobs else None
        else:
            mask = action_mask_from(responses, self.eos)
        seq = torch.cat([prompt_ids, responses], 1)
        return (seq, mask, logps) if return_logprobs else (seq, mask)
