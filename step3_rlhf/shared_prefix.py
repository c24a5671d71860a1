"""Scoring forwards that run each prompt once for a GRPO group of G samples (its KV cache copied G times).

Used by the experience-time and training forwards (log-probs, values, reward scores); they give the numbers of
one full forward per row, to float rounding (tests/test_fast_path.py), for about prompt / (prompt + response)
fewer FLOPs per extra row.
"""
from __future__ import annotations

import math

import torch

from step3_rlhf.rollout.decode_loop import fast_decode_ok, grouped
from utils.hf_compat import cache_kwargs
from utils.models import unwrap


def shared_group(model, seq, attn, prompt_len, group_size) -> int:
    """How many consecutive rows of `seq` share one prompt (a divisor of group_size; 1 = no sharing).

    Sharing needs rows that are copies of one prompt in the first `prompt_len` columns, a model our decode
    loop supports (a plain cache-taking forward, no ZeRO-3), and no gradient checkpointing (it turns the cache
    off under autograd; it is checked without autograd too, so old and new log-probs take the same path)."""
    if not prompt_len or group_size < 2:
        return 1
    g = math.gcd(group_size, seq.shape[0])
    hf = unwrap(model)
    checkpointing = getattr(hf, "is_activation_checkpointing", None)  # transformers >= 5; older: the other name
    if checkpointing is None:
        checkpointing = getattr(hf, "is_gradient_checkpointing", False)
    if g < 2 or not fast_decode_ok(hf) or checkpointing:
        return 1
    return g if grouped(seq[:, :prompt_len], attn[:, :prompt_len], g) else 1


def shared_prefix_logits(model, seq, attn, prompt_len, n_response, group):
    """Logits [B, R, V] predicting the R response tokens, with each prompt run once for its `group` rows.

    The prompt's forward fills a KV cache that is copied to the group's rows (autograd flows back through the
    copy into the one prompt forward), then the responses run on it: the same logits as one full forward per
    row (to float rounding) for about prompt / (prompt + response) fewer FLOPs per extra row."""
    from transformers import DynamicCache
    P, R = prompt_len, n_response
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=unwrap(model).config)
    head = model(input_ids=seq[::group, :P], attention_mask=attn[::group, :P], position_ids=pos[::group, :P],
                 **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits.repeat_interleave(group, 0)
    if R == 1:
        return head
    cache.batch_repeat_interleave(group)
    tail = model(input_ids=seq[:, P:P + R - 1], attention_mask=attn[:, :P + R - 1], position_ids=pos[:, P:P + R - 1],
                 **cache_kwargs(model, cache), use_cache=True).logits
    return torch.cat([head, tail], 1)


def shared_prefix_response_values(value_model, seq, attn, prompt_len, group):
    """A value model's per-token values [B, R] (float32) on the response positions, prompts run once per group."""
    from transformers import DynamicCache
    from utils.models import value_head
    hf = unwrap(value_model)
    P = prompt_len
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=hf.config)
    hf.base_model(input_ids=seq[::group, :P], attention_mask=attn[::group, :P], position_ids=pos[::group, :P],
                  **cache_kwargs(hf.base_model, cache), use_cache=True)
    cache.batch_repeat_interleave(group)
    hidden = hf.base_model(input_ids=seq[:, P:], attention_mask=attn, position_ids=pos[:, P:],
                           **cache_kwargs(hf.base_model, cache), use_cache=True).last_hidden_state
    return value_head(hf)(hidden).squeeze(-1).float()
