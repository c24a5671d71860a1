"""The RL loop: make experience, then update the actor (and critic) on it.

One step = `generation_batches` experience batches, then `ppo_epochs` passes over them in micro-batches of
`per_device_training_batch_size`. The old log-probs of a step are all taken before its first update, so
ppo_epochs > 1, several generation batches or unequal batch sizes never mix policies (the upstream drift bug).
"""
from __future__ import annotations

import math
import sys

import torch

from step3_rlhf.engines import EMA, ReferenceScope
from step3_rlhf.experience import Experience, generate, response_logprobs, response_values
from utils.engine import Checkpointer, NonFiniteGuard, StopRequest
from utils.losses import (gae_advantages_and_returns, group_advantages, grpo_loss, kl_penalized_rewards,
                          masked_mean, masked_whiten, ppo_policy_loss, reinforce_loss, rloo_advantages, sft_loss,
                          value_loss)
from utils.train_loop import epoch_batches, resume_point


class RLTrainer:
    def __init__(self, cfg, engines, tokenizer, ctx, collate, ptx=None):
        self.cfg, self.e, self.tok, self.ctx, self.collate, self.ptx = cfg, engines, tokenizer, ctx, collate, ptx
        self.log = ctx.log
        self.synced = cfg.actor_zero_stage == 3 and ctx.world_size > 1
        self.ema = EMA(engines.actor, cfg.ema_decay, cfg.actor_zero_stage) if cfg.enable_ema else None
        self.guard = NonFiniteGuard(cfg.max_bad_steps, "step3_rlhf")

    # ------------------------------------------------------------------ experience
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
            seq, action_mask = generate(self.e.actor, ids, mask, cfg, self.tok, self.synced, self.e.use_hybrid)
        with self.log.timer("time/experience"):
            P, R = ids.shape[1], seq.shape[1] - ids.shape[1]
            attn = torch.cat([mask, action_mask.long()], 1)
            self.e.actor.eval()
            logp = response_logprobs(self.e.actor, seq, attn, R, cfg.temperature or 1.0)
            ref_logp = None
            with ReferenceScope(self.e) as ref:
                if ref is not None:
                    ref_logp = response_logprobs(ref, seq, attn, R, cfg.temperature or 1.0)
            values = None
            if self.e.critic is not None:
                self.e.critic.eval()
                values = response_values(self.e.critic, seq, attn, R) * action_mask
            responses = self.tok.batch_decode(seq[:, P:].masked_fill(action_mask == 0, self.tok.pad_token_id),
                                              skip_special_tokens=True)
            scores, components = self.e.reward_fn(seq, attn, prompts, responses, metas)
            exp = Experience(seq, attn, action_mask, P, logp, ref_logp, values, scores.to(dev),
                             responses=responses, prompts=prompts, components=components)
            self._advantages(exp)
        return exp

    def _advantages(self, exp: Experience):
        cfg, m = self.cfg, exp.action_mask
        if cfg.algo == "ppo":
            ref = exp.ref_logprobs if exp.ref_logprobs is not None else exp.logprobs
            rewards = kl_penalized_rewards(exp.logprobs, ref, exp.scores, m, cfg.kl_ctl, cfg.clip_reward_value)
            adv, ret = gae_advantages_and_returns(rewards, exp.values, m, cfg.gamma, cfg.lam)
            exp.advantages = masked_whiten(adv, m) if cfg.whiten_advantages else adv
            exp.returns = ret
        elif cfg.algo == "rloo":
            exp.advantages = rloo_advantages(exp.scores, cfg.num_generations)
        else:  # grpo, reinforce: group-normalised (Dr. GRPO: --no-scale_rewards)
            exp.advantages = group_advantages(exp.scores, cfg.num_generations, scale_by_std=cfg.scale_rewards)

    # ------------------------------------------------------------------ updates
    def _policy_loss(self, mb: Experience, logp):
        cfg, R = self.cfg, mb.action_mask.shape[1]
        if cfg.algo == "ppo":
            return ppo_policy_loss(logp, mb.logprobs, mb.advantages, mb.action_mask, cfg.cliprange, cfg.loss_agg,
                                   max_len=cfg.max_answer_seq_len)
        if cfg.algo == "reinforce":
            return reinforce_loss(logp, mb.advantages, mb.action_mask, cfg.loss_agg, max_len=cfg.max_answer_seq_len,
                                  ref_logprobs=mb.ref_logprobs, beta=cfg.beta)
        return grpo_loss(logp, mb.logprobs, mb.ref_logprobs, mb.advantages, mb.action_mask, cfg.cliprange, cfg.beta,
                         cfg.loss_agg, max_len=max(cfg.max_answer_seq_len, R))

    def train_on(self, experiences: list[Experience], step: int) -> dict:
        cfg, stats = self.cfg, {}
        add = lambda k, v: stats.setdefault(k, []).append(float(v.detach() if torch.is_tensor(v) else v))  # noqa: E731
        self.e.actor.train()
        if self.e.critic is not None:
            self.e.critic.train()
        for _ in range(cfg.ppo_epochs):
            for exp in experiences:
                n = exp.sequences.shape[0]
                for start in range(0, n, cfg.per_device_training_batch_size):
                    mb = exp.rows(slice(start, start + cfg.per_device_training_batch_size))
                    R = mb.action_mask.shape[1]
                    logp, ent = response_logprobs(self.e.actor, mb.sequences, mb.attention_mask, R,
                                                  cfg.temperature or 1.0, with_entropy=True)
                    loss, st = self._policy_loss(mb, logp)
                    terms = {"policy loss": loss.detach()}
                    vloss = None
                    if self.e.critic is not None:
                        values = response_values(self.e.critic, mb.sequences, mb.attention_mask, R)
                        vloss, vclip = value_loss(values, mb.values, mb.returns, mb.action_mask, cfg.cliprange_value)
                        terms["value loss"] = vloss.detach()
                    if not self.guard.check(step, terms):
                        continue
                    self.e.actor.backward(loss)
                    self.e.actor.step()
                    add("loss/policy", loss)
                    add("clipfrac/policy", st.get("clipfrac", 0.0))
                    add("entropy", masked_mean(ent, mb.action_mask))
                    if "approx_kl" in st:
                        add("kl/approx_old_new", st["approx_kl"])
                    if vloss is not None:
                        self.e.critic.backward(vloss)
                        self.e.critic.step()
                        add("loss/value", vloss)
                        add("clipfrac/value", vclip)
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

    # ------------------------------------------------------------------ the loop
    def experience_stats(self, exps: list[Experience]) -> dict:
        scores = torch.cat([e.scores for e in exps]).float()
        lengths = torch.cat([e.action_mask.sum(1) for e in exps])
        out = {"reward/mean": scores.mean(), "reward/std": scores.std() if len(scores) > 1 else 0.0,
               "response/length": lengths.mean(), "response/length_max": lengths.max(),
               "response/empty_frac": (lengths == 0).float().mean()}
        if exps[0].ref_logprobs is not None:
            kl = torch.cat([((e.logprobs - e.ref_logprobs) * e.action_mask).sum(1) for e in exps])
            out["kl/mean"] = kl.mean()
        for k in exps[0].components:
            out[k] = torch.cat([e.components[k].float().cpu() for e in exps]).mean()
        return {k: float(v) for k, v in out.items()}

    def check_guards(self, stats, step):
        if abs(stats["reward/mean"]) > self.cfg.reward_guard or not math.isfinite(stats["reward/mean"]):
            raise FloatingPointError(f"step3_rlhf: step {step}: mean reward {stats['reward/mean']:.4g} is beyond "
                                     f"--reward_guard {self.cfg.reward_guard}; is the reward model broken?")
        if stats.get("kl/mean", 0.0) > self.cfg.kl_guard:
            raise FloatingPointError(f"step3_rlhf: step {step}: KL to the reference {stats['kl/mean']:.4g} passed "
                                     f"--kl_guard {self.cfg.kl_guard}; lower the learning rate or raise --kl_ctl")

    def fit(self, prompts, total_steps):
        cfg, ctx = self.cfg, self.ctx
        ckpt = Checkpointer(cfg.output_dir, cfg.save_total_limit, ctx.rank)
        engines = {"actor": self.e.actor, **({"critic": self.e.critic} if self.e.critic is not None else {})}
        stop = StopRequest()
        step, epoch0, batch0 = 0, 0, 0
        found = resume_point(cfg, ckpt, self.log)
        if found:
            tag, state = found
            extra = ckpt.load(engines, tag, state, ["ema"] if self.ema else [])
            if self.ema:
                self.ema.shadow = extra["ema"]
            step, epoch0, batch0 = state["step"], state["epoch"], state["next_batch"]
        bar = self.log.progress(total_steps, initial=step, desc="step3_rlhf")
        history = []
        epoch = epoch0
        while step < total_steps:
            batches = epoch_batches(len(prompts), cfg.per_device_generation_batch_size, ctx.world_size, ctx.rank,
                                    cfg.seed, epoch)
            b = batch0 if epoch == epoch0 else 0
            while b < len(batches) and step < total_steps:
                group = batches[b:b + cfg.generation_batches]
                exps = [self.make_experience(self.collate([prompts[i] for i in idx])) for idx in group]
                stats = self.experience_stats(exps)
                self.check_guards(stats, step + 1)
                with self.log.timer("time/training"):
                    stats.update(self.train_on(exps, step + 1))
                stats.update(self.log.pop_timers())
                step, b = step + 1, b + len(group)
                history.append(stats)
                self.log.scalars(stats, step)
                bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats.get('kl/mean', 0.0):.3f}",
                                len=f"{stats['response/length']:.0f}")
                bar.update(1)
                if (cfg.save_interval and step % cfg.save_interval == 0) or stop.requested:
                    ckpt.save(engines, step, {"epoch": epoch, "next_batch": b},
                              {"ema": self.ema.shadow} if self.ema else None)
                if stop.requested:
                    bar.close()
                    self.log.info(f"stopped by signal {stop.signal} after step {step}; checkpoint saved in "
                                  f"{ckpt.root}. Run the same command again to resume.")
                    sys.exit(128 + int(stop.signal))
            epoch += 1
        bar.close()
        if self.guard.total:
            self.log.info(f"{self.guard.total} update(s) skipped because a loss was not finite")
        return history

