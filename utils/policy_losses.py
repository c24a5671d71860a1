"""Step 3's policy-side math as pure torch functions: KL estimators and the KL-shaped reward, advantages (GAE,
group-normalised, leave-one-out, REINFORCE++'s batch-whitened returns), loss aggregation, the clipped surrogate
(asymmetric epsilon, token- or sequence-level importance ratio), the value loss.

Conventions as in utils/losses.py: `mask` [B, T] is 1 on real response tokens; masked positions may hold finite
garbage that no result (nor gradient) depends on; stats dicts hold detached 0-dim tensors.
"""
import torch

from utils.losses import last_token_index, masked_mean, masked_sum, masked_whiten

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "batch-token-mean")
# TRL GRPOConfig.loss_type -> our --loss_agg (bnpo: token mean of the micro-batch; dapo: of the whole step)
LOSS_TYPES = {"bnpo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
              "dapo": "batch-token-mean"}
KL_ESTIMATORS = ("k1", "k2", "k3")
IS_LEVELS = ("token", "sequence")


# ----------------------------------------------------------------------------- KL
def masked_log_ratio(logprobs, other_logprobs, mask=None):
    """logprobs - other_logprobs, 0 where mask == 0: what is exponentiated stays finite at masked positions."""
    d = logprobs - other_logprobs
    return d if mask is None else torch.where(mask != 0, d, torch.zeros_like(d))


def kl_estimate(logprobs, ref_logprobs, mask=None, estimator="k3"):
    """Per-token estimate of KL(pi || ref) on samples of pi (Schulman's estimators), 0 where mask == 0.

    With d = logp - ref: k1 = d (unbiased, may be negative), k2 = d^2 / 2 (>= 0, biased; its gradient is the
    true KL's), k3 = exp(-d) + d - 1 (>= 0, unbiased, low variance; expm1 keeps tiny d exact, the clamp removes
    last-ulp negatives)."""
    d = masked_log_ratio(logprobs, ref_logprobs, mask)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return (torch.expm1(-d) + d).clamp(min=0.0)
    raise ValueError(f"unknown kl estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def kl_k3(logprobs, ref_logprobs, mask=None):
    """k3 KL estimator per token: exp(r - logp) - (r - logp) - 1; >= 0, 0 iff equal (and 0 where mask == 0)."""
    return kl_estimate(logprobs, ref_logprobs, mask, "k3")


def kl_penalized_rewards(logprobs, ref_logprobs, scores, mask, kl_ctl, clip_reward_value, estimator="k1"):
    """Per-token rewards [B, T] (DeepSpeed-Chat scheme).

    r_t = -kl_ctl * kl_t(logp, ref) on every masked token (k1: logp_t - ref_t, DeepSpeed-Chat's), and
    clamp(score, -clip, clip) is added at the last masked token of the row. Zero where mask == 0; an all-zero
    row gets nothing.
    """
    kl_reward = -kl_ctl * kl_estimate(logprobs, ref_logprobs, mask, estimator)
    has_tokens = (mask != 0).any(dim=-1)
    score = scores.reshape(-1).to(kl_reward.dtype).clamp(-clip_reward_value, clip_reward_value)
    score = torch.where(has_tokens, score, torch.zeros_like(score))
    bonus = torch.zeros_like(kl_reward).scatter(-1, last_token_index(mask).unsqueeze(-1), score.unsqueeze(-1))
    return kl_reward + bonus


def kl_penalized_scores(scores, logprobs, ref_logprobs, mask, kl_ctl, estimator="k1"):
    """Sequence scores [B] minus kl_ctl * the sum over the response of kl_t: the KL-in-reward of algorithms that
    see one reward per sequence (veRL's use_kl_in_reward with GRPO: the token rewards are summed)."""
    return scores.float() - kl_ctl * masked_sum(kl_estimate(logprobs, ref_logprobs, mask, estimator), mask, dim=-1)


# ----------------------------------------------------------------------------- advantages
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


def reinforce_pp_advantages(rewards, mask, gamma=1.0):
    """REINFORCE++ (OpenRLHF): the reward-to-go G_t = r_t + gamma * G_{t+1} of the per-token (KL-shaped) rewards,
    whitened over every token of the batch (no critic, no groups). Returns (advantages, returns) [B, T].
    G is GAE with V = 0 and lambda = 1."""
    returns, _ = gae_advantages_and_returns(rewards, torch.zeros_like(rewards, dtype=torch.float), mask, gamma, 1.0)
    return masked_whiten(returns, mask), returns


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


# ----------------------------------------------------------------------------- aggregation
def aggregate_loss(loss_mat, mask, loss_agg, max_len=None, n_tokens=None):
    """Reduce a per-token loss [B, T] to a scalar.

    "token-mean": sum over the masked tokens of this micro-batch / their count (PPO default; TRL's bnpo).
    "seq-mean-token-mean": per-sequence token mean, then mean over sequences with >= 1 token (GRPO paper, TRL's
        grpo; every sequence weighs the same, so tokens of short answers weigh more).
    "seq-mean-token-sum-norm": per-sequence token sum / constant max_len, then mean over all B rows
        (Dr. GRPO, TRL's dr_grpo; no length bias). max_len defaults to T.
    "batch-token-mean": sum over the masked tokens / n_tokens, the mean token count of a micro-batch over the
        whole step (all micro-batches, all ranks): after DeepSpeed averages the micro-batch gradients, every
        token of the step weighs the same (DAPO, TRL's dapo). n_tokens defaults to this micro-batch's count.
    """
    if loss_agg == "token-mean" or (loss_agg == "batch-token-mean" and n_tokens is None):
        return masked_mean(loss_mat, mask)
    if loss_agg == "batch-token-mean":
        return masked_sum(loss_mat, mask) / max(float(n_tokens), 1e-8)
    if loss_agg == "seq-mean-token-mean":
        seq_loss = masked_mean(loss_mat, mask, dim=-1)
        n_seq = (mask != 0).any(dim=-1).sum().clamp(min=1)
        return seq_loss.sum() / n_seq
    if loss_agg == "seq-mean-token-sum-norm":
        norm = float(max_len if max_len is not None else loss_mat.shape[-1])
        return (masked_sum(loss_mat, mask, dim=-1) / norm).mean()
    raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGGS}")


# ----------------------------------------------------------------------------- policy losses
def importance_log_ratio(logprobs, old_logprobs, mask, level="token"):
    """log(pi / pi_old): per token [B, T], or per sequence [B, 1] as GSPO's length-normalised
    (1 / |y|) * sum_t (logp_t - old_t) (one ratio per response, shared by its tokens)."""
    d = masked_log_ratio(logprobs, old_logprobs, mask)
    if level == "token":
        return d
    if level == "sequence":
        return d.sum(-1, keepdim=True) / (mask != 0).sum(-1, keepdim=True).clamp(min=1).to(d.dtype)
    raise ValueError(f"unknown importance_sampling_level {level!r}; expected one of {IS_LEVELS}")


def clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_low, clip_high=None, level="token"):
    """Per-token loss [B, T] max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high)) and its stats; [B] advantages
    broadcast over T. clip_high defaults to clip_low (DAPO's clip-higher: clip_high > clip_low). r = 1 at masked
    positions; with level="sequence" r is GSPO's sequence ratio (importance_log_ratio)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(importance_log_ratio(logprobs, old_logprobs, mask, level))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(unclipped, clipped).expand(mask.shape)
    stats = policy_stats(ratio.expand(mask.shape), (clipped > unclipped).expand(mask.shape), logprobs,
                         old_logprobs, mask)
    return loss_mat, stats


def policy_stats(ratio, is_clipped, logprobs, old_logprobs, mask):
    """What to watch in an update, masked token means: clipfrac (all), clipfrac_low (r below 1 - eps: a negative
    advantage stopped), clipfrac_high (r above 1 + eps: a positive one stopped), ratio_mean, ratio_max,
    approx_kl = k3(old vs new) = r - 1 - log r."""
    with torch.no_grad():
        clipped = is_clipped & (mask != 0)
        return {
            "clipfrac": masked_mean(clipped.float(), mask),
            "clipfrac_low": masked_mean((clipped & (ratio < 1)).float(), mask),
            "clipfrac_high": masked_mean((clipped & (ratio > 1)).float(), mask),
            "approx_kl": masked_mean(kl_k3(old_logprobs, logprobs, mask), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask != 0, ratio, torch.zeros_like(ratio)).max(),
        }


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange, loss_agg="token-mean", max_len=None,
                    cliprange_high=None, level="token"):
    """PPO clipped surrogate (clipped_surrogate) aggregated by aggregate_loss. advantages [B, T] or [B]."""
    loss_mat, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, cliprange, cliprange_high, level)
    return aggregate_loss(loss_mat, mask, loss_agg, max_len), stats


def value_loss(values, old_values, returns, mask, cliprange_value):
    """0.5 * masked mean of max((v - R)^2, (clip(v, old_v - c, old_v + c) - R)^2). Returns (loss, clipfrac)."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, clipfrac


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, cliprange, beta,
              loss_agg="seq-mean-token-mean", max_len=None, cliprange_high=None, level="token", kl_estimator="k3"):
    """GRPO: per-token clipped surrogate with the sequence advantage [B] broadcast over tokens,
    plus beta * kl(logp, ref) per token, aggregated by aggregate_loss.

    old_logprobs=None means one update per rollout (old = logprobs.detach(), ratio == 1 but the
    gradient is still A * grad logp). ref_logprobs may be None when beta == 0. Returns (loss, stats).
    """
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    loss_mat, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, cliprange, cliprange_high, level)
    loss_mat = add_kl_term(loss_mat, logprobs, ref_logprobs, mask, beta, stats, kl_estimator)
    return aggregate_loss(loss_mat, mask, loss_agg, max_len), stats


def reinforce_term(logprobs, advantages, mask, old_logprobs=None):
    """Per-token REINFORCE loss -A * logp [B, T] (no ratio, no clipping) and its stats: the ratio to old_logprobs
    is watched (clip fractions 0) though it does not enter the loss."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    loss_mat = (-advantages * logprobs).expand(mask.shape)
    if old_logprobs is None:
        return loss_mat, {}
    ratio = torch.exp(masked_log_ratio(logprobs.detach(), old_logprobs, mask))
    return loss_mat, policy_stats(ratio, torch.zeros_like(ratio, dtype=torch.bool), logprobs, old_logprobs, mask)


def reinforce_loss(logprobs, advantages, mask, loss_agg="token-mean", max_len=None, ref_logprobs=None, beta=0.0,
                   kl_estimator="k3"):
    """REINFORCE: reinforce_term + optional beta * kl(logp, ref), aggregated. advantages [B] or [B, T]."""
    loss_mat, stats = reinforce_term(logprobs, advantages, mask)
    loss_mat = add_kl_term(loss_mat, logprobs, ref_logprobs, mask, beta, stats, kl_estimator)
    return aggregate_loss(loss_mat, mask, loss_agg, max_len), stats


def add_kl_term(loss_mat, logprobs, ref_logprobs, mask, beta, stats, estimator="k3"):
    """loss_mat + beta * kl_estimate(logp, ref) per token, its masked mean into stats["kl"]; as is if beta == 0."""
    if not beta:
        return loss_mat
    if ref_logprobs is None:
        raise ValueError("a KL loss term (beta > 0) needs ref_logprobs")
    kl = kl_estimate(logprobs, ref_logprobs, mask, estimator)
    stats["kl"] = masked_mean(kl.detach(), mask)
    return loss_mat + beta * kl
