"""Attention for bf16 training and scoring on CPU: grouped matmuls instead of SDPA's CPU flash kernel.

On workload W's shapes (8 rows, 9 query / 3 key-value heads, 192 tokens, head dim 64, bf16, 2 threads)
PyTorch's CPU flash-attention kernel took about 5.7 ms forward and 14 ms backward per layer, a few percent
of the FLOPs but about a fifth of the scoring and training time; this takes about 3.8 and 9 ms (2-4x less
on shorter rows). The query heads that share a key/value head are stacked into one matmul (no repeated
K/V), softmax runs in fp32 a few rows at a time (the [L, L] blocks stay in cache), and backward recomputes
the probabilities (one matmul and a softmax) instead of keeping them, so nothing of size [L, L] is saved.
In fp32 SDPA is as fast, so `auto` uses this for bf16 only. Registered with transformers as
"grouped_matmul" (its mask is SDPA's boolean one); what it does not cover (dropout, sliding windows,
soft-capping, a non-CPU tensor, a float mask) and one-token decode steps (where SDPA is faster) go to
transformers' SDPA path.
"""
from __future__ import annotations

import torch

NAME = "grouped_matmul"


def _probs(q, k, masked, rep):
    """Attention probabilities [B, KV, rep*Lq, Lk] in fp32 (q is pre-scaled). Masked entries get bf16's minimum
    before the softmax: a fully masked row (a padding query) stays finite instead of NaN, and since nothing
    downstream reads it its gradient is zero."""
    s = torch.matmul(q, k.transpose(-1, -2))
    if masked is not None:
        B, KV, RL, Lk = s.shape
        s.view(B, KV, rep, RL // rep, Lk).masked_fill_(masked, torch.finfo(s.dtype).min)
    return torch.softmax(s, -1, dtype=torch.float32)


def _row_chunks(q, k, budget=2 << 20):
    """Row slices whose fp32 [rep*Lq, Lk] probability blocks fit in about `budget` bytes: the softmax and its
    backward then run in cache (measured 2-4x faster than one pass over the whole batch here)."""
    per_row = q.shape[1] * q.shape[2] * k.shape[2] * 4
    n = max(1, budget // max(per_row, 1))
    return [slice(i, i + n) for i in range(0, q.shape[0], n)]


class GroupedAttention(torch.autograd.Function):
    """softmax(q k^T, masked) v with q [B, KV, rep*Lq, D] pre-scaled (the rep query heads of one K/V head
    stacked), k, v [B, KV, Lk, D], `masked` [B|1, 1, 1, Lq, Lk] bool (True = not attended) or None. Saves only
    the inputs; backward recomputes the probabilities (one matmul and a softmax) instead of keeping them."""

    @staticmethod
    def forward(ctx, q, k, v, masked, rep):
        ctx.save_for_backward(q, k, v, masked)
        ctx.rep = rep
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        for r in _row_chunks(q, k):
            m = masked if masked is None or masked.shape[0] == 1 else masked[r]
            out[r] = torch.matmul(_probs(q[r], k[r], m, rep).to(v.dtype), v[r])
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, masked = ctx.saved_tensors
        d_out = d_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for r in _row_chunks(q, k):
            m = masked if masked is None or masked.shape[0] == 1 else masked[r]
            p = _probs(q[r], k[r], m, ctx.rep)
            dv[r] = torch.matmul(p.to(v.dtype).transpose(-1, -2), d_out[r])
            dp = torch.matmul(d_out[r], v[r].transpose(-1, -2)).float()
            ds = torch._softmax_backward_data(dp, p, -1, torch.float32).to(q.dtype)  # p * (dp - rowsum(p * dp))
            dq[r] = torch.matmul(ds, k[r])
            dk[r] = torch.matmul(ds.transpose(-1, -2), q[r])
        return dq, dk, dv, None, None


def grouped_matmul_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             is_causal=None, **kwargs):
    """transformers attention interface: query [B, H, Lq, D], key/value [B, KV, Lk, D] -> ([B, Lq, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    mask_ok = attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.shape[1] == 1)
    if (dropout and module.training) or kwargs.get("sliding_window") or kwargs.get("softcap") \
            or query.device.type != "cpu" or not mask_ok or query.shape[1] % key.shape[1] or query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    B, H, Lq, D = query.shape
    KV, Lk = key.shape[1], key.shape[2]
    if attention_mask is None and Lq > 1:  # SDPA's mask is left out for a plain causal batch: build it
        attention_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril(Lk - Lq)[None, None]
    masked = None if attention_mask is None else ~attention_mask[:, :, None]  # [B|1, 1, 1, Lq, Lk]
    q = query.reshape(B, KV, (H // KV) * Lq, D)  # query head h = kv * rep + r uses K/V head kv (as repeat_kv)
    scale = scaling if scaling is not None else D ** -0.5
    out = GroupedAttention.apply(q * scale, key.contiguous(), value.contiguous(), masked, H // KV)
    return out.view(B, H, Lq, D).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make "grouped_matmul" a transformers attention implementation (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(NAME, grouped_matmul_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
