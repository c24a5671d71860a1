"""The RL trainer: make experience, then update the actor (and critic) on it. The loop is in loop.py.

The old log-probs of a step are all taken before its first update, so ppo_epochs > 1, several generation
batches or unequal batch sizes never mix policies (the upstream drift bug).
"""
from __future__ import annotations

import torch

from step3_rlhf.algorithms import compute_advantages, policy_loss
from step3_rlhf.engines import EMA, ReferenceScope
from step3_rlhf.experience import Experience, RewardFunction, generate, response_logprobs, response_values
from utils.guards import NonFiniteGuard
from utils.losses import masked_mean, sft_loss, value_loss


class RLTrainer:
    def __init__(self, cfg, engines, tokenizer, ctx, collate, ptx=None):
        self.cfg, self.e, self.tok, self.ctx, self.collate, self.ptx = cfg, engines, tokenizer, ctx, collate, ptx
        self.log = ctx.log
        self.synced = cfg.actor_zero_stage == 3 and ctx.world_size > 1
        self.ema = EMA(engines.actor, cfg.ema_decay, cfg.actor_zero_stage) if cfg.enable_ema else None
        self.guard = NonFiniteGuard(cfg.max_bad_steps, "step3_rlhf")

    # ------------------------------------------------------------------ experience
    def reuses_policy_forward(self, n_rows, sample=True) -> bool:
        """Whether the experience-time actor forward can also be the first update's forward.

        With one PPO epoch, one generation batch and a batch that is exactly one micro-batch, the old
        log-probs are taken with the very weights the first (and only) update starts from, so computing them
        once with the autograd graph kept gives the same numbers as the two forwards of the straightforward
        path (ratio exactly 1) for one forward less. Not with dropout (old log-probs are taken without it),
        DeepSpeed's hybrid engine (inference kernels in eval mode) or ZeRO-3 (parameters re-partitioned
        between the phases); --no-reuse_policy_forward turns it off."""
        cfg = self.cfg
        return (sample and getattr(cfg, "reuse_policy_forward", True) and cfg.ppo_epochs == 1
                and cfg.generation_batches == 1 and n_rows == cfg.per_device_training_batch_size
                and not cfg.actor_dropout and not self.e.use_hybrid and cfg.actor_zero_stage < 3)

    @torch.no_grad()
    def make_experience(self, batch, sample=True) -> Experience:
        cfg, dev = self.cfg, self.ctx.device
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        prompts, metas = batch["prompts"], batch["metas"]
        g = cfg.num_generations if sample else 1
        if g > 1:  # group-major: the g samples of prompt i are rows i*g .. i*g+g-1
            ids, mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)
            prompts = [p for p in prompts for _ in range(g)]
            metas = [m for m in metas for _ in range(g)]
        with self.log.timer("time/generation"):
            seq, action_mask = generate(self.e.actor, ids, mask, cfg, self.tok, self.synced, self.e.use_hybrid,
                                        group_size=g)
        with self.log.timer("time/experience"):
            P, R = ids.shape[1], seq.shape[1] - ids.shape[1]
            attn = torch.cat([mask, action_mask.long()], 1)
            # forward-only passes: a micro-batch of rows at a time (row_chunk applies without autograd only),
            # in length groups without padding columns, each group's prompt run once (GRPO)
            shared = dict(row_chunk=cfg.per_device_training_batch_size, prompt_len=P, group_size=g,
                          length_groups=cfg.length_groups)
            ref_logp = None
            with ReferenceScope(self.e) as ref:
                if ref is not None:
                    ref_logp = response_logprobs(ref, seq, attn, R, cfg.temperature or 1.0, **shared)
            values = None
            if self.e.critic is not None:
                self.e.critic.eval()
                values = response_values(self.e.critic, seq, attn, R, row_chunk=shared["row_chunk"],
                                         length_groups=shared["length_groups"]) * action_mask
            responses = self.tok.batch_decode(seq[:, P:].masked_fill(action_mask == 0, self.tok.pad_token_id),
                                              skip_special_tokens=True)
            own = isinstance(self.e.reward_fn, RewardFunction)
            scores, components = self.e.reward_fn(seq, attn, prompts, responses, metas, **(shared if own else {}))
            # the actor last: when its forward keeps the autograd graph for the update, the other models'
            # forwards do not run (and allocate) on top of it
            graph = None
            if self.reuses_policy_forward(seq.shape[0], sample):
                self.e.actor.train()
                with torch.enable_grad():
                    graph = response_logprobs(self.e.actor, seq, attn, R, cfg.temperature or 1.0, with_entropy=True,
                                              **shared)
                logp = graph[0].detach()
            else:
                self.e.actor.eval()
                logp = response_logprobs(self.e.actor, seq, attn, R, cfg.temperature or 1.0, **shared)
            exp = Experience(seq, attn, action_mask, P, logp, ref_logp, values, scores.to(dev),
                             responses=responses, prompts=prompts, components=components, policy_graph=graph)
            compute_advantages(exp, self.cfg, group_size=g)
        return exp

    # ------------------------------------------------------------------ updates
    def train_on(self, experiences: list[Experience], step: int) -> dict:
        """`ppo_epochs` passes over the experiences in micro-batches. Per micro-batch the actor is updated,
        then the critic: one model's autograd graph is alive at a time (half the activation memory of
        building both first). A non-finite policy loss skips the micro-batch; a non-finite value loss skips
        the critic's update; either counts as one bad update for --max_bad_steps."""
        cfg, stats = self.cfg, {}
        add = lambda k, v: stats.setdefault(k, []).append(float(v.detach() if torch.is_tensor(v) else v))  # noqa: E731
        self.e.actor.train()
        if self.e.critic is not None:
            self.e.critic.train()
        for epoch in range(cfg.ppo_epochs):
            for exp in experiences:
                n = exp.sequences.shape[0]
                for start in range(0, n, cfg.per_device_training_batch_size):
                    mb = exp.rows(slice(start, start + cfg.per_device_training_batch_size))
                    R = mb.action_mask.shape[1]
                    graph, exp.policy_graph = exp.policy_graph, None  # valid for the first update only
                    if graph is not None and epoch == 0 and start == 0 and exp is experiences[0] \
                            and n <= cfg.per_device_training_batch_size:
                        logp, ent = graph
                    else:
                        logp, ent = response_logprobs(self.e.actor, mb.sequences, mb.attention_mask, R,
                                                      cfg.temperature or 1.0, with_entropy=True,
                                                      prompt_len=mb.prompt_len, group_size=cfg.num_generations,
                                                      length_groups=cfg.length_groups)
                    del graph
                    loss, st = policy_loss(mb, logp, cfg)
                    if not self.guard.check(step, {"policy loss": loss.detach()}, reset=self.e.critic is None):
                        continue
                    self.e.actor.backward(loss)
                    self.e.actor.step()
                    del logp
                    add("loss/policy", loss)
                    add("clipfrac/policy", st.get("clipfrac", 0.0))
                    add("entropy", masked_mean(ent, mb.action_mask))
                    if "approx_kl" in st:
                        add("kl/approx_old_new", st["approx_kl"])
                    if self.e.critic is not None:
                        values = response_values(self.e.critic, mb.sequences, mb.attention_mask, R,
                                                 length_groups=cfg.length_groups)
                        vloss, vclip = value_loss(values, mb.values, mb.returns, mb.action_mask, cfg.cliprange_value)
                        if self.guard.check(step, {"policy loss": loss.detach(), "value loss": vloss.detach()}):
                            self.e.critic.backward(vloss)
                            self.e.critic.step()
                            add("loss/value", vloss)
                            add("clipfrac/value", vclip)
                        del values, vloss
                    if self.ptx is not None:
                        add("loss/ptx", self._ptx_step())
                    if self.ema is not None:
                        self.ema.update(self.e.actor)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def _ptx_step(self):
        batch = {k: v.to(self.ctx.device) for k, v in next(self.ptx).items()}
        logits = self.e.actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).logits
        loss, _ = sft_loss(logits, batch["labels"])
        self.e.actor.backward(self.cfg.unsup_coef * loss)
        self.e.actor.step()
        return loss.detach()

