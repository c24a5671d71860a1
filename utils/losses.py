"""Shared loss math as pure torch functions (tensors in, tensors out): masked reductions, token log-probs and
entropy, SFT. Step 3's policy-side math (KL, advantages, clipped surrogates) is in utils/policy_losses.py.

Shapes: B = batch, T = response length (tokens after the prompt), V = vocabulary.
`mask` is a float/bool tensor [B, T]: 1 for real response tokens, 0 after EOS and on padding.
Masked positions may hold arbitrary (finite) garbage; no result below depends on it, and no gradient either:
a log-ratio is zeroed at masked positions before it is exponentiated (a gap of 1e4 after EOS would otherwise
give exp = inf there and 0 * inf = nan in the backward, even though the forward masks it out).
Stats dicts hold detached 0-dim tensors (no .item(), so no device sync inside the loss).
The losses on preference pairs (the pairwise reward model, DPO) are in utils/preference_losses.py.
"""
import torch


# ----------------------------------------------------------------------------- masked reductions
def masked_sum(x, mask, dim=None):
    """sum(x * mask). Uses where() so garbage (even inf) at masked positions cannot leak in as nan."""
    mask = mask.to(x.dtype) if mask.dtype != torch.bool else mask
    picked = torch.where(mask != 0, x, torch.zeros_like(x))
    weighted = picked if mask.dtype == torch.bool else picked * mask
    return weighted.sum() if dim is None else weighted.sum(dim)


def masked_mean(x, mask, dim=None):
    """sum(x * mask) / sum(mask); an all-zero mask gives 0 instead of nan."""
    denom = mask.to(x.dtype)
    denom = denom.sum() if dim is None else denom.sum(dim)
    return masked_sum(x, mask, dim) / denom.clamp(min=1e-8)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps) with mean and (population, i.e. biased) var over masked elements only.

    shift_mean=False adds the mean back (rescale only; used for rewards so their sign is kept).
    Masked positions are set to 0.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask != 0, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------- token log-probs
def _chunks(t_len, chunk_size):
    step = max(1, t_len) if not chunk_size else max(1, int(chunk_size))
    return [(s, min(s + step, t_len)) for s in range(0, max(t_len, 1), step)]


class _LabelLogProb(torch.autograd.Function):
    """log p(label) with a backward that keeps only the logits and the fp32 log-sum-exp per position (not a
    float32 copy of [B, T, V]) and rebuilds softmax chunk by chunk: d/dlogits = g * (onehot(label) - p)."""

    @staticmethod
    def forward(ctx, logits, labels, chunk_size):
        idx = labels.long().unsqueeze(-1)
        out, lse = (torch.empty(labels.shape, dtype=torch.float32, device=logits.device) for _ in range(2))
        for s, e in _chunks(logits.shape[1], chunk_size):
            chunk = logits[:, s:e].float()
            lse[:, s:e] = torch.logsumexp(chunk, dim=-1)
            out[:, s:e] = chunk.gather(-1, idx[:, s:e]).squeeze(-1) - lse[:, s:e]
        ctx.save_for_backward(logits, idx, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad):
        logits, idx, lse = ctx.saved_tensors
        d_logits = torch.empty_like(logits)
        for s, e in _chunks(logits.shape[1], ctx.chunk_size):
            g = grad[:, s:e].unsqueeze(-1).float()
            d = (logits[:, s:e].float() - lse[:, s:e].unsqueeze(-1)).exp_().mul_(-g)
            d_logits[:, s:e] = d.scatter_add_(-1, idx[:, s:e], g)
        return d_logits, None, None


def gather_logprobs(logits, labels, chunk_size=None):
    """log p(label) = logit[label] - logsumexp(logits), [B, T] in float32.

    No [B, T, V] log_softmax is built: only the picked logit and the logsumexp per position.
    Each chunk of `chunk_size` positions is upcast to float32 on its own, so the float32 copy of a
    bf16 logits tensor is at most [B, chunk_size, V], in the backward too. Labels must be valid ids
    (mask -100 first).
    """
    return _LabelLogProb.apply(logits, labels, chunk_size)


def entropy_from_logits(logits, chunk_size=None):
    """H = logsumexp(l) - sum_v softmax(l)_v * l_v  (= -sum p log p), [B, T] in float32."""
    out = []
    for s, e in _chunks(logits.shape[1], chunk_size):
        chunk = logits[:, s:e].float()
        probs = torch.softmax(chunk, dim=-1)
        out.append(torch.logsumexp(chunk, dim=-1) - (probs * chunk).sum(-1))
    return torch.cat(out, dim=1)


def last_token_index(attention_mask):
    """Index of the last non-zero mask entry per row, [B] long.

    Works for left padding, right padding and pad == eos because only the mask is read, never ids:
    argmax over (position * mask) is the largest position whose mask is set. All-zero rows give 0.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * (attention_mask != 0).long()).amax(dim=-1)


def gather_last(values, attention_mask):
    """values[b, last_token_index(mask)[b]] -> [B] (e.g. the reward-model score of a sequence)."""
    idx = last_token_index(attention_mask).unsqueeze(-1)
    return values.gather(-1, idx).squeeze(-1)


# ----------------------------------------------------------------------------- step 1
def sft_loss(logits, labels, ignore_index=-100):
    """Mean NLL over non-ignored targets with the causal shift: logits[:, t] predicts labels[:, t + 1].

    Returns (loss, n_tokens); n_tokens is a long tensor so callers can re-weight across micro-batches.
    With no target at all the loss is 0 (not nan).
    """
    logits, targets = logits[:, :-1], labels[:, 1:]
    valid = targets != ignore_index
    logp = gather_logprobs(logits, torch.where(valid, targets, torch.zeros_like(targets)))
    n_tokens = valid.sum()
    return -masked_sum(logp, valid) / n_tokens.clamp(min=1), n_tokens


