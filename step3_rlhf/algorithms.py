"""What differs between the RL algorithms: how advantages are made and which policy loss is used.

- ppo: per-token KL-penalised reward, critic values, GAE (DeepSpeed-Chat / InstructGPT).
- grpo: group-normalised sequence advantages, clipped ratio, k3 KL to the reference as a loss term.
- rloo: leave-one-out baseline, clipped ratio.
- reinforce: group-normalised advantage, no ratio ("Reinforce-Lite"), optional KL term.
"""
from __future__ import annotations

import torch

from utils.losses import (gae_advantages_and_returns, group_advantages, grpo_loss, kl_penalized_rewards,
                          masked_whiten, ppo_policy_loss, reinforce_loss, rloo_advantages)


def compute_advantages(exp, cfg, group_size=None):
    """Fills exp.advantages (and exp.returns for PPO) in place.

    `group_size` is the number of samples per prompt in THIS batch (default cfg.num_generations).
    Evaluation batches hold one sample per prompt: a critic-free algorithm then has no group to
    compare with, so the advantages are 0 (they are never trained on)."""
    m = exp.action_mask
    g = cfg.num_generations if group_size is None else group_size
    if cfg.algo == "ppo":
        ref = exp.ref_logprobs if exp.ref_logprobs is not None else exp.logprobs
        rewards = kl_penalized_rewards(exp.logprobs, ref, exp.scores, m, cfg.kl_ctl, cfg.clip_reward_value)
        adv, ret = gae_advantages_and_returns(rewards, exp.values, m, cfg.gamma, cfg.lam)
        exp.advantages = masked_whiten(adv, m) if cfg.whiten_advantages else adv
        exp.returns = ret
    elif g < 2:
        exp.advantages = torch.zeros_like(exp.scores, dtype=torch.float)
    elif cfg.algo == "rloo":
        exp.advantages = rloo_advantages(exp.scores, g)
    else:  # grpo, reinforce: group-normalised (Dr. GRPO: --no-scale_rewards)
        exp.advantages = group_advantages(exp.scores, g, scale_by_std=cfg.scale_rewards)


def policy_loss(mb, logp, cfg):
    """(loss, stats) of the actor on micro-batch `mb` given its current log-probs `logp`."""
    max_len = max(cfg.max_answer_seq_len, mb.action_mask.shape[1])
    if cfg.algo == "ppo":
        return ppo_policy_loss(logp, mb.logprobs, mb.advantages, mb.action_mask, cfg.cliprange, cfg.loss_agg,
                               max_len=max_len)
    if cfg.algo == "reinforce":
        return reinforce_loss(logp, mb.advantages, mb.action_mask, cfg.loss_agg, max_len=max_len,
                              ref_logprobs=mb.ref_logprobs, beta=cfg.beta)
    return grpo_loss(logp, mb.logprobs, mb.ref_logprobs, mb.advantages, mb.action_mask, cfg.cliprange, cfg.beta,
                     cfg.loss_agg, max_len=max_len)
