"""The RL algorithms of step 3 as one table: what each needs built, how it makes advantages, which policy loss.

- ppo: per-token KL-penalised reward, critic values, GAE (DeepSpeed-Chat / InstructGPT).
- grpo: group-normalised sequence advantages, clipped ratio, k3 KL to the reference as a loss term.
- rloo: leave-one-out baseline, clipped ratio.
- reinforce: group-normalised advantage, no ratio ("Reinforce-Lite"), optional KL term.

Adding an algorithm is one `Algorithm` entry in ALGORITHMS plus its pure loss/advantage functions in
utils/losses.py; every decision that depends on the algorithm (engines built, reference needed, default loss
aggregation, samples per prompt, advantages, policy loss) reads the entry, never the name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from utils.losses import (gae_advantages_and_returns, group_advantages, grpo_loss, kl_penalized_rewards,
                          masked_whiten, ppo_policy_loss, reinforce_loss, rloo_advantages)


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str                               # one line for logs and --help
    needs_critic: bool                         # a trained value model (and its updates)
    needs_reference: Callable                  # cfg -> bool: a frozen reference model is built and scored
    default_loss_agg: str                      # --loss_agg when not given
    min_generations: int                       # samples per prompt it needs to learn (--num_generations)
    advantages: Callable                       # (exp, cfg, group_size) -> advantages (and exp.returns set)
    loss: Callable                             # (mb, logp, cfg, max_len) -> (loss, stats)


def _ppo_advantages(exp, cfg, g):
    ref = exp.ref_logprobs if exp.ref_logprobs is not None else exp.logprobs
    rewards = kl_penalized_rewards(exp.logprobs, ref, exp.scores, exp.action_mask, cfg.kl_ctl, cfg.clip_reward_value)
    adv, exp.returns = gae_advantages_and_returns(rewards, exp.values, exp.action_mask, cfg.gamma, cfg.lam)
    return masked_whiten(adv, exp.action_mask) if cfg.whiten_advantages else adv


def _clipped_group_loss(mb, logp, cfg, max_len):
    return grpo_loss(logp, mb.logprobs, mb.ref_logprobs, mb.advantages, mb.action_mask, cfg.cliprange, cfg.beta,
                     cfg.loss_agg, max_len=max_len)


ALGORITHMS = {a.name: a for a in (
    Algorithm("ppo", "critic + GAE", needs_critic=True, needs_reference=lambda cfg: cfg.kl_ctl > 0,
              default_loss_agg="token-mean", min_generations=1, advantages=_ppo_advantages,
              loss=lambda mb, logp, cfg, max_len: ppo_policy_loss(logp, mb.logprobs, mb.advantages, mb.action_mask,
                                                                  cfg.cliprange, cfg.loss_agg, max_len=max_len)),
    # Dr. GRPO: --no-scale_rewards
    Algorithm("grpo", "critic-free, group-normalised", needs_critic=False, needs_reference=lambda cfg: cfg.beta > 0,
              default_loss_agg="seq-mean-token-mean", min_generations=2,
              advantages=lambda exp, cfg, g: group_advantages(exp.scores, g, scale_by_std=cfg.scale_rewards),
              loss=_clipped_group_loss),
    Algorithm("rloo", "critic-free, leave-one-out baseline", needs_critic=False,
              needs_reference=lambda cfg: cfg.beta > 0, default_loss_agg="seq-mean-token-mean", min_generations=2,
              advantages=lambda exp, cfg, g: rloo_advantages(exp.scores, g), loss=_clipped_group_loss),
    Algorithm("reinforce", "critic-free, no ratio", needs_critic=False, needs_reference=lambda cfg: cfg.beta > 0,
              default_loss_agg="seq-mean-token-mean", min_generations=2,
              advantages=lambda exp, cfg, g: group_advantages(exp.scores, g, scale_by_std=cfg.scale_rewards),
              loss=lambda mb, logp, cfg, max_len: reinforce_loss(logp, mb.advantages, mb.action_mask, cfg.loss_agg,
                                                                 max_len=max_len, ref_logprobs=mb.ref_logprobs,
                                                                 beta=cfg.beta)),
)}


def algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown --algo {name!r}; expected one of {', '.join(ALGORITHMS)}") from None


def compute_advantages(exp, cfg, group_size=None):
    """Fills exp.advantages (and exp.returns for PPO) in place.

    `group_size` is the number of samples per prompt in THIS batch (default cfg.num_generations).
    Evaluation batches hold one sample per prompt: an algorithm that compares the samples of a prompt then
    has no group to compare with, so the advantages are 0 (they are never trained on)."""
    algo = algorithm(cfg.algo)
    g = cfg.num_generations if group_size is None else group_size
    if g < algo.min_generations:
        exp.advantages = torch.zeros_like(exp.scores, dtype=torch.float)
    else:
        exp.advantages = algo.advantages(exp, cfg, g)


def policy_loss(mb, logp, cfg):
    """(loss, stats) of the actor on micro-batch `mb` given its current log-probs `logp`."""
    max_len = max(cfg.max_answer_seq_len, mb.action_mask.shape[1])
    return algorithm(cfg.algo).loss(mb, logp, cfg, max_len)
