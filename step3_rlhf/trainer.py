"""The RL trainer: updates of the actor (and critic) on experience made by experience_maker.py. The loop that
joins the two is in loop.py.

The old log-probs of a step are all taken before its first update, so ppo_epochs > 1, several generation
batches or unequal batch sizes never mix policies (the upstream drift bug). With --gradient_accumulation_steps
the engines' step() applies the optimizer once per that many micro-steps (DeepSpeed's accumulation window).
"""
from __future__ import annotations

import torch

from step3_rlhf.algorithms import policy_loss
from step3_rlhf.engines import EMA
from step3_rlhf.experience import Experience, response_logprobs, response_values
from utils.guards import NonFiniteGuard, sum_over_ranks
from utils.losses import masked_mean, sft_loss
from utils.policy_losses import value_loss

# stats of the policy loss logged every step (stats key -> log name); a name ending in /max is the step's maximum
POLICY_STATS = {"clipfrac": "clipfrac/policy", "clipfrac_low": "clipfrac/low", "clipfrac_high": "clipfrac/high",
                "ratio_mean": "ratio/mean", "ratio_max": "ratio/max", "approx_kl": "kl/approx_old_new",
                "kl": "kl/in_loss", "kl_reward": "kl/in_reward"}


class RLTrainer:
    """Updates only: the actor (policy loss of the algorithm), the critic (value loss) and PTX, with the guards
    every rank agrees on. The experience it trains on comes from experience_maker.ExperienceMaker."""

    def __init__(self, cfg, engines, ctx, ptx=None):
        self.cfg, self.e, self.ctx, self.ptx = cfg, engines, ctx, ptx
        self.log = ctx.log
        self.ema = EMA(engines.actor, cfg.ema_decay) if cfg.enable_ema else None
        self.guard = NonFiniteGuard(cfg.max_bad_steps, cfg.stage_name)

    def train_on(self, experiences: list[Experience], step: int) -> dict:
        """`ppo_epochs` passes over the experiences in micro-batches. Per micro-batch the actor is updated,
        then the critic: one model's autograd graph is alive at a time (half the activation memory of
        building both first). A non-finite policy loss skips the micro-batch; a non-finite value loss skips
        the critic's update; either counts as one bad update for --max_bad_steps. (A skipped micro-batch makes
        no engine step, so with gradient accumulation the next one takes its place in the window.)"""
        cfg, stats = self.cfg, {}
        add = lambda k, v: stats.setdefault(k, []).append(float(v.detach() if torch.is_tensor(v) else v))  # noqa: E731
        self.e.actor.train()
        if self.e.critic is not None:
            self.e.critic.train()
        n_tokens = self._step_tokens(experiences)
        self._moved = False  # the actor's weights are still those the old log-probs were taken with
        for epoch in range(cfg.ppo_epochs):
            for exp in experiences:
                n = exp.sequences.shape[0]
                for start in range(0, n, cfg.per_device_training_batch_size):
                    mb = exp.rows(slice(start, start + cfg.per_device_training_batch_size))
                    graph, exp.policy_graph = exp.policy_graph, None  # valid for the first update only
                    # the kept graph's entropy is detached: an entropy bonus needs the training forward's own
                    if graph is not None and epoch == 0 and start == 0 and exp is experiences[0] \
                            and n <= cfg.per_device_training_batch_size and not getattr(cfg, "entropy_coeff", 0.0):
                        logp, ent = graph
                    else:
                        logp, ent = response_logprobs(self.e.actor, mb.sequences, mb.attention_mask,
                                                      mb.action_mask.shape[1], cfg.temperature or 1.0,
                                                      with_entropy=True, prompt_len=mb.prompt_len,
                                                      group_size=cfg.num_generations,
                                                      length_groups=cfg.groups_for(cfg.actor_zero_stage, grad=True),
                                                      entropy_grad=bool(getattr(cfg, "entropy_coeff", 0.0)))
                    del graph
                    self._update(mb, logp, ent, step, add, n_tokens)
                    del logp
        return {k: (max(v) if k.endswith("/max") else sum(v) / len(v)) for k, v in stats.items()}

    def _step_tokens(self, experiences):
        """--loss_agg batch-token-mean: the mean response tokens of a micro-batch over this step's experience on
        every rank (one all-reduce, made by every rank alike); None for the other aggregations."""
        if self.cfg.loss_agg != "batch-token-mean":
            return None
        mbs = sum(-(-e.sequences.shape[0] // self.cfg.per_device_training_batch_size) for e in experiences)
        tokens, mbs = sum_over_ranks([sum(float(e.action_mask.sum()) for e in experiences), float(mbs)])
        return tokens / max(mbs, 1.0)

    def _update(self, mb, logp, ent, step, add, n_tokens=None):
        """One micro-batch: the actor's policy step, the critic's value step, the PTX step, the EMA."""
        cfg = self.cfg
        if not self._moved:  # same weights as at experience time: any gap is a numerics mismatch, not learning
            gap = (logp.detach() - mb.logprobs).abs()
            add("logprob_mismatch/train_mean", masked_mean(gap, mb.action_mask))
            add("logprob_mismatch/train_max", torch.where(mb.action_mask != 0, gap, torch.zeros_like(gap)).max())
        # the entropy and the step's token count go in only when an option reads them
        kw = {"entropy": ent} if getattr(cfg, "entropy_coeff", 0.0) else {}
        if n_tokens is not None:
            kw["n_tokens"] = n_tokens
        loss, st = policy_loss(mb, logp, cfg, **kw)
        if not self.guard.check(step, {"policy loss": loss.detach()}, reset=self.e.critic is None):
            return
        applied = _step(self.e.actor, loss)
        add("loss/policy", loss)
        add("entropy", masked_mean(ent.detach(), mb.action_mask))
        for key, name in POLICY_STATS.items():
            if key in st:
                add(name, st[key])
        if self.e.critic is not None:
            values = response_values(self.e.critic, mb.sequences, mb.attention_mask, mb.action_mask.shape[1],
                                     length_groups=cfg.groups_for(cfg.critic_zero_stage, grad=True))
            vloss, vclip = value_loss(values, mb.values, mb.returns, mb.action_mask, cfg.cliprange_value)
            if self.guard.check(step, {"policy loss": loss.detach(), "value loss": vloss.detach()}):
                _step(self.e.critic, vloss)
                add("loss/value", vloss)
                add("clipfrac/value", vclip)
            del values, vloss
        if self.ptx is not None:
            ptx_loss, ptx_applied = self._ptx_step()
            add("loss/ptx", ptx_loss)
            applied = applied or ptx_applied
        self._moved = self._moved or applied
        if self.ema is not None and applied:  # the weights moved (not inside an accumulation window)
            self.ema.update(self.e.actor)

    def _ptx_step(self):
        """(PTX loss, whether the actor's optimizer stepped)."""
        batch = {k: v.to(self.ctx.device) for k, v in next(self.ptx).items()}
        logits = self.e.actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).logits
        loss, _ = sft_loss(logits, batch["labels"])
        return loss.detach(), _step(self.e.actor, self.cfg.unsup_coef * loss)


def _step(engine, loss) -> bool:
    """backward + step of a DeepSpeed engine; True when this step applied the optimizer (the end of an
    accumulation window: every step without gradient accumulation)."""
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(loss)
    engine.step()
    return boundary
