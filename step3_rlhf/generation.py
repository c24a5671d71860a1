"""Our own sampling loop for step 3: the model's forward, a static KV cache, and nothing else per token.

Why: `model.generate` re-does a lot of work for every new token (input preparation, mask conversion, logits
processors, stopping criteria, cache growth by concatenation); for the small models and short answers of RLHF on
a CPU that overhead is a large part of generation time. This loop keeps the cache in one preallocated buffer
(transformers' StaticCache), builds positions and the mask once, and samples with the same rules as
`generate` (min_new_tokens forbids EOS, then temperature, top-k, top-p; rows that ended emit pad), so greedy
decoding gives generate()'s tokens (tests/test_fast_path.py).

It is used only where it is known to be right: a plain (non-ZeRO-3-partitioned) decoder-only model on one
process, no hybrid engine. ZeRO-3, several processes (synced_gpus) and DeepSpeed's hybrid engine keep
`model.generate` (see experience.generate).
"""
from __future__ import annotations

import torch

# Decoder-only families whose forward takes (position_ids, cache_position, a Cache, logits_to_keep).
FAST_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "opt", "gpt_neox", "olmo", "olmo2",
                 "smollm3", "granite", "cohere", "starcoder2", "stablelm", "falcon")


def fast_decode_ok(model, synced_gpus=False, use_hybrid=False) -> bool:
    """True where `sample` may replace `model.generate` (see the module docstring)."""
    if synced_gpus or use_hybrid or getattr(model.config, "is_encoder_decoder", False):
        return False
    if getattr(model.config, "model_type", "") not in FAST_FAMILIES:
        return False
    # ZeRO-3 partitions parameters (ds_id) and gathers them in forward hooks: leave that to generate().
    return not any(hasattr(p, "ds_id") for p in model.parameters())


def _make_cache(model, max_len, static):
    from transformers import DynamicCache, StaticCache
    if static:
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache(config=model.config)


def _grouped(ids, mask, g):
    """Whether rows i*g .. i*g+g-1 are copies of one prompt (ids and mask)."""
    return torch.equal(ids, ids[::g].repeat_interleave(g, 0)) and torch.equal(mask, mask[::g].repeat_interleave(g, 0))


def _warp(logits, temperature, top_k, top_p):
    """generate()'s sampling warpers in its order: temperature, top-k, top-p (filtered logits -> -inf)."""
    if temperature not in (None, 0, 1):
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[:, -1:] = False  # keep at least one token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, *, max_new_tokens, eos_ids, pad_id, min_new_tokens=0,
           temperature=1.0, top_p=1.0, top_k=0, group_size=1, static_cache=False, return_logprobs=False):
    """Sample up to `max_new_tokens` per row after left-padded prompts.

    Returns responses [B, R] (R <= max_new_tokens: the loop stops when every row has ended, like generate()),
    and, with `return_logprobs`, the [B, R] float32 log-probs of the sampled tokens under the policy's own
    distribution (logits / temperature, no top-k/top-p/min-length changes; 0 after a row ended).
    `temperature` 0 (or None) means greedy decoding.
    `group_size` G > 1: rows come in groups of G copies of one prompt (GRPO's samples of a prompt, group-major);
    the prompt is then run once per group and its KV cache copied G times (one shared prefix), instead of G
    times. Rows that are not such copies fall back to one prefill per row.
    `static_cache`: one preallocated cache (transformers' StaticCache) instead of a growing one; on CPU both
    decode equally fast (bench/ppo_throughput.py), and only the growing one can share a group's prefix."""
    B, P = prompt_ids.shape
    dev = prompt_ids.device
    shared = group_size > 1 and B % group_size == 0 and not static_cache and _grouped(prompt_ids, prompt_mask,
                                                                                          group_size)
    cache = _make_cache(model, P + max_new_tokens, static_cache)
    mask = torch.zeros(B, P + max_new_tokens, dtype=prompt_mask.dtype, device=dev)
    mask[:, :P] = prompt_mask
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(eos_ids, device=dev)
    greedy = not temperature
    out = torch.full((B, max_new_tokens), pad_id, dtype=prompt_ids.dtype, device=dev)
    logps = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=dev) if return_logprobs else None
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    next_pos = positions[:, -1:] + 1
    rows = slice(None, None, group_size) if shared else slice(None)
    logits = model(input_ids=prompt_ids[rows], attention_mask=mask[rows, :P], position_ids=positions[rows],
                   past_key_values=cache, cache_position=torch.arange(P, device=dev), use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    if shared:  # one prefill per group, then every sample of the group continues from a copy of it
        cache.batch_repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, 0)
    n = 0
    for t in range(max_new_tokens):
        logits = logits.float()
        scores = logits
        if t < min_new_tokens:
            scores = scores.index_fill(-1, eos, float("-inf"))
        if greedy:
            tok = scores.argmax(-1)
        else:
            probs = _warp(scores, temperature, top_k, top_p).softmax(-1)
            tok = torch.multinomial(probs, 1).squeeze(-1)
        tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
        out[:, t] = tok
        if return_logprobs:
            policy = logits / temperature if temperature not in (None, 0, 1) else logits
            lp = policy.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - policy.logsumexp(-1)
            logps[:, t] = torch.where(alive, lp, torch.zeros_like(lp))
        alive = alive & ~torch.isin(tok, eos)
        n = t + 1
        if not bool(alive.any()) or t == max_new_tokens - 1:
            break
        mask[:, P + t] = 1
        logits = model(input_ids=tok.unsqueeze(-1), attention_mask=mask[:, :P + t + 1], position_ids=next_pos,
                       past_key_values=cache, cache_position=torch.tensor([P + t], device=dev), use_cache=True,
                       ).logits[:, -1]
        next_pos = next_pos + 1
    out = out[:, :n]
    return (out, logps[:, :n]) if return_logprobs else out


# ----------------------------------------------------------------------------- shared prompt prefixes
def shared_group(model, seq, attn, prompt_len, group_size) -> int:
    """How many consecutive rows of `seq` share one prompt (a divisor of group_size; 1 = no sharing).

    Sharing needs rows that are copies of one prompt in the first `prompt_len` columns, a model our decode
    loop supports (a plain cache-taking forward, no ZeRO-3), and no gradient checkpointing (it turns the cache
    off under autograd; it is checked without autograd too, so old and new log-probs take the same path)."""
    import math
    from utils.models import unwrap
    if not prompt_len or group_size < 2:
        return 1
    g = math.gcd(group_size, seq.shape[0])
    hf = unwrap(model)
    checkpointing = getattr(hf, "is_activation_checkpointing", None)  # transformers >= 5; older: the other name
    if checkpointing is None:
        checkpointing = getattr(hf, "is_gradient_checkpointing", False)
    if g < 2 or not fast_decode_ok(hf) or checkpointing:
        return 1
    return g if _grouped(seq[:, :prompt_len], attn[:, :prompt_len], g) else 1


def shared_prefix_logits(model, seq, attn, prompt_len, n_response, group):
    """Logits [B, R, V] predicting the R response tokens, with each prompt run once for its `group` rows.

    The prompt's forward fills a KV cache that is copied to the group's rows (autograd flows back through the
    copy into the one prompt forward), then the responses run on it: the same logits as one full forward per
    row (to float rounding) for about prompt / (prompt + response) fewer FLOPs per extra row."""
    from transformers import DynamicCache
    from utils.models import unwrap
    P, R = prompt_len, n_response
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=unwrap(model).config)
    head = model(input_ids=seq[::group, :P], attention_mask=attn[::group, :P], position_ids=pos[::group, :P],
                 past_key_values=cache, use_cache=True, logits_to_keep=1).logits.repeat_interleave(group, 0)
    if R == 1:
        return head
    cache.batch_repeat_interleave(group)
    tail = model(input_ids=seq[:, P:P + R - 1], attention_mask=attn[:, :P + R - 1], position_ids=pos[:, P:P + R - 1],
                 past_key_values=cache, use_cache=True).logits
    return torch.cat([head, tail], 1)


def shared_prefix_response_values(value_model, seq, attn, prompt_len, group):
    """A value model's per-token values [B, R] (float32) on the response positions, prompts run once per group."""
    from transformers import DynamicCache
    from utils.models import unwrap, value_head
    hf = unwrap(value_model)
    P = prompt_len
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=hf.config)
    hf.base_model(input_ids=seq[::group, :P], attention_mask=attn[::group, :P], position_ids=pos[::group, :P],
                  past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(group)
    hidden = hf.base_model(input_ids=seq[:, P:], attention_mask=attn, position_ids=pos[:, P:], past_key_values=cache,
                           use_cache=True).last_hidden_state
    return value_head(hf)(hidden).squeeze(-1).float()
