"""The "fast" rollout backend: our own sampling loop - the model's forward, a KV cache, and nothing else per token.

Why: `model.generate` re-does a lot of work for every new token (input preparation, mask conversion, logits
processors, stopping criteria, cache growth by concatenation); for the small models and short answers of RLHF on
a CPU that overhead is a large part of generation time. This loop builds positions and the mask once, can keep
the cache in one preallocated buffer (transformers' StaticCache), and samples with the same rules as
`generate` (min_new_tokens forbids EOS, then temperature, top-k, top-p; rows that ended emit pad), so greedy
decoding gives generate()'s tokens (tests/test_fast_path.py). It draws a sampled token from the same distribution
as generate() but by another method (`draw`: one uniform number per row, not multinomial's one per vocabulary
entry; 27% less generation time in a Countdown GRPO step on 2 CPU cores), so for one seed the sampled tokens
differ; `sampler="multinomial"` gives generate()'s.

It is used only where it is known to be right (`fast_decode_reason`): a plain (non-ZeRO-3-partitioned)
decoder-only model of a family whose forward takes a cache, on one process, no hybrid engine. ZeRO-3 across
several processes (synced_gpus) and DeepSpeed's hybrid engine keep `generate` (hf_generate.py,
hybrid_engine.py).
"""
from __future__ import annotations

import torch

from step3_rlhf.rollout.base import Rollout
from utils.hf_compat import cache_kwargs
from utils.models import unwrap

# Decoder-only families whose forward takes (position_ids, cache_position, a Cache, logits_to_keep).
FAST_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "opt", "gpt_neox", "olmo", "olmo2",
                 "smollm3", "granite", "cohere", "starcoder2", "stablelm", "falcon")


def fast_decode_reason(model, synced_gpus=False, use_hybrid=False) -> str | None:
    """None where `sample` may replace `model.generate`, else why not (see the module docstring). The same on
    every rank: it reads the config, the model family and whether parameters are ZeRO-3 partitioned."""
    if synced_gpus:
        return "ZeRO-3 across several processes (every rank must gather weights in lockstep: synced_gpus)"
    if use_hybrid:
        return "DeepSpeed's hybrid engine generates"
    if getattr(model.config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    family = getattr(model.config, "model_type", "")
    if family not in FAST_FAMILIES:
        return f"model type {family!r} is not one the loop is tested on ({', '.join(FAST_FAMILIES)})"
    # ZeRO-3 partitions parameters (ds_id) and gathers them in forward hooks: leave that to generate().
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "ZeRO-3 partitioned parameters"
    return None


def fast_decode_ok(model, synced_gpus=False, use_hybrid=False) -> bool:
    """True where `sample` may replace `model.generate`."""
    return fast_decode_reason(model, synced_gpus, use_hybrid) is None


def _make_cache(model, max_len, static):
    from transformers import DynamicCache, StaticCache
    if static:
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache(config=model.config)


def grouped(ids, mask, g):
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


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` [B, V]: the distribution of torch.multinomial(probs, 1), drawn by inverting the
    cumulative sum at one uniform number per row. Why: multinomial draws an exponential number for every vocabulary
    entry (B x 49k), a quarter of a 2-core CPU decode step; this draws B. u lies in (0, total], so the first index
    whose cumulative sum reaches u always has a non-zero probability (a filtered token adds 0 to the sum)."""
    cdf = probs.cumsum(-1)
    if not bool(torch.isfinite(cdf[:, -1]).all()):  # multinomial refuses these too; a silent pick would hide it
        raise RuntimeError("cannot sample: the model's next-token probabilities are NaN or inf (diverged weights?)")
    u = (1.0 - torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, *, max_new_tokens, eos_ids, pad_id, min_new_tokens=0,
           temperature=1.0, top_p=1.0, top_k=0, group_size=1, static_cache=False, return_logprobs=False,
           sampler="cdf"):
    """Sample up to `max_new_tokens` per row after left-padded prompts.

    Returns responses [B, R] (R <= max_new_tokens: the loop stops when every row has ended, like generate()),
    and, with `return_logprobs`, the [B, R] float32 log-probs of the sampled tokens under the policy's own
    distribution (logits / temperature, no top-k/top-p/min-length changes; 0 after a row ended).
    `temperature` 0 (or None) means greedy decoding.
    `group_size` G > 1: rows come in groups of G copies of one prompt (GRPO's samples of a prompt, group-major);
    the prompt is then run once per group and its KV cache copied G times (one shared prefix), instead of G
    times. Rows that are not such copies fall back to one prefill per row.
    `static_cache`: one preallocated cache (transformers' StaticCache) instead of a growing one; on CPU both
    decode equally fast (bench/ppo_throughput.py), and only the growing one can share a group's prefix.
    `sampler`: "cdf" (`draw`, fast) or "multinomial" (generate()'s own draw: the same tokens as generate() for
    one seed, which the tests compare); both sample the same distribution."""
    if sampler not in ("cdf", "multinomial"):
        raise ValueError(f"sampler must be 'cdf' or 'multinomial', not {sampler!r}")
    B, P = prompt_ids.shape
    dev = prompt_ids.device
    shared = group_size > 1 and B % group_size == 0 and not static_cache and grouped(prompt_ids, prompt_mask,
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
                   **cache_kwargs(model, cache), cache_position=torch.arange(P, device=dev), use_cache=True,
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
            tok = draw(probs) if sampler == "cdf" else torch.multinomial(probs, 1).squeeze(-1)
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
                       **cache_kwargs(model, cache), cache_position=torch.tensor([P + t], device=dev), use_cache=True,
                       ).logits[:, -1]
        next_pos = next_pos + 1
    out = out[:, :n]
    return (out, logps[:, :n]) if return_logprobs else out


class FastRollout(Rollout):
    """Our decode loop; returns the sampled tokens' log-probs too, and shares a GRPO group's prompt prefill."""

    name = "fast"
    sampler = "cdf"  # see `sample`; "multinomial" draws generate()'s tokens for a seed (backend comparisons in tests)

    @staticmethod
    def why_not(actor, use_hybrid=False, synced_gpus=False):
        return fast_decode_reason(unwrap(actor), synced_gpus, use_hybrid)

    def _responses(self, prompt_ids, prompt_mask, group_size, return_logprobs):
        cfg = self.cfg
        out = sample(self.model, prompt_ids, prompt_mask, max_new_tokens=cfg.max_answer_seq_len,
                     min_new_tokens=cfg.min_answer_seq_len, eos_ids=self.eos, pad_id=self.pad_id,
                     temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, group_size=group_size,
                     return_logprobs=return_logprobs, sampler=self.sampler)
        return out if return_logprobs else (out, None)
