"""All loss / advantage math of the toolkit, as pure torch functions (tensors in, tensors out).

Shapes: B = batch, T = response length (tokens after the prompt), V = vocabulary.
`mask` is a float/bool tensor [B, T]: 1 for real response tokens, 0 after EOS and on padding.
Masked positions may hold arbitrary (finite) garbage; no result below depends on it, and no gradient either:
a log-ratio is zeroed at masked positions before it is exponentiated (a gap of 1e4 after EOS would otherwise
give exp = inf there and 0 * inf = nan in the backward, even though the forward masks it out).
Stats dicts hold detached 0-dim tensors (no .item(), so no device sync inside the loss).
The losses on preference pairs (the pairwise reward model, DPO) are in utils/preference_losses.py.
"""
import torch
import torch.nn.functional as F

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


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


# ----------------------------------------------------------------------------- PPO (step 3)
def masked_log_ratio(logprobs, other_logprobs, mask=None):
    """logprobs - other_logprobs, 0 where mask == 0: what is exponentiated stays finite at masked positions."""
    d = logprobs - other_logprobs
    return d if mask is None else torch.where(mask != 0, d, torch.zeros_like(d))


def kl_k3(logprobs, ref_logprobs, mask=None):
    """k3 KL estimator per token: exp(d) - d - 1 with d = ref - logp; >= 0, 0 iff equal (and 0 where mask == 0).

    Unbiased for KL(pi || ref) on samples from pi, with low variance (Schulman's "k3").
    expm1 keeps tiny d exact; the clamp removes last-ulp negatives.
    """
    d = masked_log_ratio(ref_logprobs, logprobs, mask)
    return (torch.expm1(d) - d).clamp(min=0.0)


def kl_penalized_rewards(logprobs, ref_logprobs, scores, mask, kl_ctl, clip_reward_value):
    """Per-token rewards [B, T] (DeepSpeed-Chat scheme).

    r_t = -kl_ctl * (logp_t - ref_t) on every masked token, and clamp(score, -clip, clip) is added
    at the last masked token of the row. Zero where mask == 0; an all-zero row gets nothing.
    """
    kl_reward = torch.where(mask != 0, -kl_ctl * (logprobs - ref_logprobs), torch.zeros_like(logprobs))
    has_tokens = (mask != 0).any(dim=-1)
    score = scores.reshape(-1).to(kl_reward.dtype).clamp(-clip_reward_value, clip_reward_value)
    score = torch.where(has_tokens, score, torch.zeros_like(score))
    bonus = torch.zeros_like(kl_reward).scatter(-1, last_token_index(mask).unsqueeze(-1), score.unsqueeze(-1))
    return kl_reward + bonus


def gae_advantages_and_returns(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation, computed backwards over T.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t,  A_t = (delta_t + gamma * lam * A_{t+1}) * m_t.
    A position with mask 0 is past the end of the episode, so the bootstrap value after the last
    real token is 0 and A = returns = 0 there. returns = A + V (on masked tokens).
    """
    m = (mask != 0).to(values.dtype)
    values = torch.where(m != 0, values, torch.zeros_like(values))
    rewards = torch.where(m != 0, rewards.to(values.dtype), torch.zeros_like(values))
    next_adv = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    advs = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        next_value = values[:, t]  # already 0 where masked
        advs.append(next_adv)
    advantages = torch.stack(advs[::-1], dim=1)
    returns = (advantages + values) * m
    return advantages, returns


def aggregate_loss(loss_mat, mask, loss_agg, max_len=None):
    """Reduce a per-token loss [B, T] to a scalar.

    "token-mean": sum over all masked tokens / their count (long answers weigh more; PPO default).
    "seq-mean-token-mean": per-sequence token mean, then mean over sequences with >= 1 token (GRPO
        paper; every sequence weighs the same, so tokens of short answers weigh more).
    "seq-mean-token-sum-norm": per-sequence token sum / constant max_len, then mean over all B rows
        (Dr. GRPO; no length bias). max_len defaults to T.
    """
    if loss_agg == "token-mean":
        return masked_mean(loss_mat, mask)
    if loss_agg == "seq-mean-token-mean":
        seq_loss = masked_mean(loss_mat, mask, dim=-1)
        n_seq = (mask != 0).any(dim=-1).sum().clamp(min=1)
        return seq_loss.sum() / n_seq
    if loss_agg == "seq-mean-token-sum-norm":
        norm = float(max_len if max_len is not None else loss_mat.shape[-1])
        return (masked_sum(loss_mat, mask, dim=-1) / norm).mean()
    raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGGS}")


def _clipped_surrogate(logprobs, old_logprobs, advantages, cliprange, mask):
    """Per-token max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)); [B] advantages broadcast over T.
    ratio = 1 at masked positions."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(masked_log_ratio(logprobs, old_logprobs, mask))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.maximum(unclipped, clipped), ratio, (clipped > unclipped)


def _policy_stats(ratio, is_clipped, logprobs, old_logprobs, mask):
    """clipfrac, approx_kl = masked mean of k3(old vs new) = ratio - 1 - log ratio, ratio_mean."""
    with torch.no_grad():
        return {
            "clipfrac": masked_mean(is_clipped.float(), mask),
            "approx_kl": masked_mean(kl_k3(old_logprobs, logprobs, mask), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange, loss_agg="token-mean", max_len=None):
    """PPO clipped surrogate: agg of max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)), ratio = exp(logp - old).

    advantages may be [B, T] (PPO/GAE) or [B] (one per sequence). Returns (loss, stats).
    """
    loss_mat, ratio, is_clipped = _clipped_surrogate(logprobs, old_logprobs, advantages, cliprange, mask)
    loss = aggregate_loss(loss_mat, mask, loss_agg, max_len)
    return loss, _policy_stats(ratio, is_clipped, logprobs, old_logprobs, mask)


def value_loss(values, old_values, returns, mask, cliprange_value):
    """0.5 * masked mean of max((v - R)^2, (clip(v, old_v - c, old_v + c) - R)^2). Returns (loss, clipfrac)."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, clipfrac


# ----------------------------------------------------------------------------- critic-free advantages
def group_advantages(scores, group_size, scale_by_std=True, eps=1e-4):
    """GRPO advantages: (r - group mean) / (group std + eps), scores [N*G] laid out group-major.

    std is torch.std's default, the unbiased (n - 1) estimator, as in TRL's GRPOTrainer.
    A group whose scores are all equal gets all-zero advantages (no learning signal).
    """
    if scale_by_std and group_size < 2:
        raise ValueError("group_size must be >= 2 to scale by the group std")
    grouped = scores.reshape(-1, group_size).float()
    adv = grouped - grouped.mean(dim=-1, keepdim=True)
    if scale_by_std:
        adv = adv / (grouped.std(dim=-1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(scores, group_size):
    """RLOO: r_i - mean of the other G - 1 rewards of the same group = (G r_i - sum) / (G - 1)."""
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2")
    grouped = scores.reshape(-1, group_size).float()
    baseline = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, cliprange, beta,
              loss_agg="seq-mean-token-mean", max_len=None):
    """GRPO: per-token clipped surrogate with the sequence advantage [B] broadcast over tokens,
    plus beta * k3(logp, ref) per token, aggregated by aggregate_loss.

    old_logprobs=None means one update per rollout (old = logprobs.detach(), ratio == 1 but the
    gradient is still A * grad logp). ref_logprobs may be None when beta == 0. Returns (loss, stats).
    """
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    loss_mat, ratio, is_clipped = _clipped_surrogate(logprobs, old_logprobs, advantages, cliprange, mask)
    stats = _policy_stats(ratio, is_clipped, logprobs, old_logprobs, mask)
    loss_mat = _add_kl_term(loss_mat, logprobs, ref_logprobs, mask, beta, stats, "grpo_loss")
    return aggregate_loss(loss_mat, mask, loss_agg, max_len), stats


def reinforce_loss(logprobs, advantages, mask, loss_agg="token-mean", max_len=None, ref_logprobs=None, beta=0.0):
    """REINFORCE: per-token -A * logp (no ratio, no clipping) + optional beta * k3(logp, ref).

    advantages are per sequence [B] (or per token [B, T]). Returns (loss, stats).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    stats = {}
    loss_mat = _add_kl_term(-advantages * logprobs, logprobs, ref_logprobs, mask, beta, stats, "reinforce_loss")
    return aggregate_loss(loss_mat, mask, loss_agg, max_len), stats


def _add_kl_term(loss_mat, logprobs, ref_logprobs, mask, beta, stats, caller):
    """loss_mat + beta * k3(logp, ref) per token, its masked mean into stats["kl"]; loss_mat as is if beta == 0."""
    if not beta:
        return loss_mat
    if ref_logprobs is None:
        raise ValueError(f"{caller} with beta > 0 needs ref_logprobs")
    kl = kl_k3(logprobs, ref_logprobs, mask)
    stats["kl"] = masked_mean(kl.detach(), mask)
    return loss_mat + beta * kl
