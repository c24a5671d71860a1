"""The RL algorithms of step 3 as one table: what each needs built, how it makes advantages, which policy loss.

- ppo: per-token KL-penalised reward, critic values, GAE (DeepSpeed-Chat / InstructGPT).
- grpo: group-normalised sequence advantages, clipped ratio, k3 KL to the reference as a loss term.
- rloo: leave-one-out baseline, clipped ratio.
- reinforce: group-normalised advantage, no ratio ("Reinforce-Lite"), optional KL term.
- reinforce_pp: REINFORCE++ (OpenRLHF's advantage_estimator "reinforce", veRL's "reinforce_plus_plus"; "++" is no
  flag-safe name): k1 KL in the per-token reward, reward-to-go whitened over the whole batch (no critic, no groups:
  one sample per prompt is enough), clipped ratio.

Adding an algorithm is one `Algorithm` entry in ALGORITHMS plus its pure loss/advantage functions in
utils/policy_losses.py; every decision that depends on the algorithm (engines built, reference needed, default loss
aggregation, where the KL goes, samples per prompt, advantages, policy loss) reads the entry, never the name.
What every algorithm shares is applied here, around the entry's loss: the KL term in the loss (--kl_in_loss,
--beta, --kl_estimator), the entropy bonus (--entropy_coeff) and the aggregation (--loss_agg).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from utils.losses import masked_mean, masked_whiten
from utils.policy_losses import (add_kl_term, aggregate_loss, clipped_surrogate, gae_advantages_and_returns,
                                 group_advantages, kl_estimate, kl_penalized_rewards, kl_penalized_scores,
                                 reinforce_pp_advantages, reinforce_term, rloo_advantages)


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str                               # one line for logs and --help
    needs_critic: bool                         # a trained value model (and its updates)
    kl_in_reward: bool                         # default place of the KL: the reward (kl_ctl) or the loss (beta)
    default_loss_agg: str                      # --loss_agg when not given
    min_generations: int                       # samples per prompt it needs to learn (--num_generations)
    advantages: Callable                       # (exp, cfg, group_size) -> advantages (and exp.returns set)
    loss: Callable                             # (mb, logp, cfg) -> (per-token loss [B, T], stats)
    clipped_ratio: bool = True                 # its loss reads --cliprange(_high), --importance_sampling_level

    def needs_reference(self, cfg) -> bool:
        """A frozen reference model is built and scored: some KL term has a non-zero coefficient."""
        kl = kl_places(cfg, self)
        return bool((kl.in_reward and cfg.kl_ctl > 0) or (kl.in_loss and cfg.beta > 0))


class KLPlaces(NamedTuple):
    in_reward: bool
    in_loss: bool
    reward_estimator: str
    loss_estimator: str


def kl_places(cfg, algo: Algorithm | None = None) -> KLPlaces:
    """Where the KL to the reference goes and with which estimator: --kl_in_reward / --kl_in_loss (unset: the
    entry's place, and the other one off), --kl_estimator (unset: k1 in the reward, k3 in the loss - today's)."""
    algo = algo or algorithm(cfg.algo)
    in_reward = getattr(cfg, "kl_in_reward", None)
    in_reward = algo.kl_in_reward if in_reward is None else in_reward
    in_loss = getattr(cfg, "kl_in_loss", None)
    in_loss = (not algo.kl_in_reward) if in_loss is None else in_loss
    est = getattr(cfg, "kl_estimator", "") or ""
    return KLPlaces(bool(in_reward), bool(in_loss), est or "k1", est or "k3")


def _token_rewards(exp, cfg):
    """Per-token rewards: the clipped score at the last token, minus kl_ctl * kl_t when the KL is in the reward."""
    kl = kl_places(cfg)
    ref = exp.ref_logprobs if exp.ref_logprobs is not None else exp.logprobs
    kl_ctl = cfg.kl_ctl if kl.in_reward else 0.0
    return kl_penalized_rewards(exp.logprobs, ref, exp.scores, exp.action_mask, kl_ctl, cfg.clip_reward_value,
                                kl.reward_estimator)


def _scores(exp, cfg):
    """Sequence scores, minus kl_ctl * the response's summed kl_t when the KL is in the reward."""
    kl = kl_places(cfg)
    if not (kl.in_reward and cfg.kl_ctl and exp.ref_logprobs is not None):
        return exp.scores
    return kl_penalized_scores(exp.scores, exp.logprobs, exp.ref_logprobs, exp.action_mask, cfg.kl_ctl,
                               kl.reward_estimator)


def _ppo_advantages(exp, cfg, g):
    adv, exp.returns = gae_advantages_and_returns(_token_rewards(exp, cfg), exp.values, exp.action_mask, cfg.gamma,
                                                  cfg.lam)
    return masked_whiten(adv, exp.action_mask) if cfg.whiten_advantages else adv


def _reinforce_pp_advantages(exp, cfg, g):
    adv, exp.returns = reinforce_pp_advantages(_token_rewards(exp, cfg), exp.action_mask, cfg.gamma)
    return adv


def _group_advantages(exp, cfg, g):
    return group_advantages(_scores(exp, cfg), g, scale_by_std=cfg.scale_rewards)


def _clipped(mb, logp, cfg):
    """The clipped surrogate of every ratio-based entry: --cliprange low, --cliprange_high (default: the low one),
    --importance_sampling_level token or sequence (GSPO)."""
    return clipped_surrogate(logp, mb.logprobs, mb.advantages, mb.action_mask, cfg.cliprange,
                             getattr(cfg, "cliprange_high", None), getattr(cfg, "importance_sampling_level", "token"))


ALGORITHMS = {a.name: a for a in (
    Algorithm("ppo", "critic + GAE", needs_critic=True, kl_in_reward=True, default_loss_agg="token-mean",
              min_generations=1, advantages=_ppo_advantages, loss=_clipped),
    # Dr. GRPO: --no-scale_rewards --loss_agg seq-mean-token-sum-norm
    Algorithm("grpo", "critic-free, group-normalised", needs_critic=False, kl_in_reward=False,
              default_loss_agg="seq-mean-token-mean", min_generations=2, advantages=_group_advantages, loss=_clipped),
    Algorithm("rloo", "critic-free, leave-one-out baseline", needs_critic=False, kl_in_reward=False,
              default_loss_agg="seq-mean-token-mean", min_generations=2,
              advantages=lambda exp, cfg, g: rloo_advantages(_scores(exp, cfg), g), loss=_clipped),
    Algorithm("reinforce", "critic-free, no ratio", needs_critic=False, kl_in_reward=False,
              default_loss_agg="seq-mean-token-mean", min_generations=2, advantages=_group_advantages,
              loss=lambda mb, logp, cfg: reinforce_term(logp, mb.advantages, mb.action_mask, mb.logprobs),
              clipped_ratio=False),
    Algorithm("reinforce_pp", "REINFORCE++: KL in the reward, batch-whitened returns", needs_critic=False,
              kl_in_reward=True, default_loss_agg="token-mean", min_generations=1,
              advantages=_reinforce_pp_advantages, loss=_clipped),
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


def policy_loss(mb, logp, cfg, entropy=None, n_tokens=None):
    """(loss, stats) of the actor on micro-batch `mb` given its current log-probs `logp` (and, with
    --entropy_coeff, the entropy [B, T] of the same forward, with its graph). `n_tokens`: the step's mean tokens
    per micro-batch for --loss_agg batch-token-mean. stats: the entry's, plus kl (the KL loss term's mean per
    token) and kl_reward (the KL-in-reward estimate's) when that term is on."""
    algo, mask = algorithm(cfg.algo), mb.action_mask
    loss_mat, stats = algo.loss(mb, logp, cfg)
    kl = kl_places(cfg, algo)
    if kl.in_loss and cfg.beta:
        loss_mat = add_kl_term(loss_mat, logp, mb.ref_logprobs, mask, cfg.beta, stats, kl.loss_estimator)
    if kl.in_reward and cfg.kl_ctl and mb.ref_logprobs is not None:
        stats["kl_reward"] = masked_mean(kl_estimate(mb.logprobs, mb.ref_logprobs, mask, kl.reward_estimator), mask)
    coeff = getattr(cfg, "entropy_coeff", 0.0)
    if coeff:
        if entropy is None or not entropy.requires_grad and logp.requires_grad:
            raise ValueError("--entropy_coeff needs the entropy of the training forward with its autograd graph")
        loss_mat = loss_mat - coeff * entropy
    max_len = max(cfg.max_answer_seq_len, mask.shape[1])
    return aggregate_loss(loss_mat, mask, cfg.loss_agg, max_len, n_tokens), stats
