"""Experience making, apart from the trainer (OpenRLHF's split): prompts -> samples -> everything the update
needs - the actor's old log-probs, the reference's, the critic's values, the rewards and the advantages of the
algorithm (step3_rlhf/algorithms.py). Nothing here changes a weight; the trainer (trainer.py) does the updates.
"""
from __future__ import annotations

import torch

from step3_rlhf.algorithms import compute_advantages
from step3_rlhf.engines import ReferenceScope
from step3_rlhf.experience import Experience, RewardFunction, response_logprobs, response_values
from step3_rlhf.experience_stats import overlong_penalty, truncated_rows
from step3_rlhf.rollout import actor_scoring_mode, build_rollout


class ExperienceMaker:
    def __init__(self, cfg, engines, tokenizer, ctx, collate):
        """`collate`: prompt items -> a left-padded batch (prompt_data.collate_prompts)."""
        self.cfg, self.e, self.tok, self.ctx, self.collate = cfg, engines, tokenizer, ctx, collate
        self.log = ctx.log
        self.rollout = build_rollout(cfg, engines.actor, tokenizer, ctx, self.log, use_hybrid=engines.use_hybrid)

    def reuses_policy_forward(self, n_rows, sample=True) -> bool:
        """Whether the experience-time actor forward can also be the first update's forward.

        With one PPO epoch, one generation batch and a batch that is exactly one micro-batch, the old
        log-probs are taken with the very weights the first (and only) update starts from, so computing them
        once with the autograd graph kept gives the same numbers as the two forwards of the straightforward
        path (ratio exactly 1) for one forward less. Not with dropout (old log-probs are taken without it),
        DeepSpeed's hybrid engine (inference kernels in eval mode) or ZeRO-3 (parameters re-partitioned
        between the phases); --no-reuse_policy_forward turns it off. Not with --dynamic_sampling either (the
        trained batch is made of the kept groups of several batches)."""
        cfg = self.cfg
        return (sample and cfg.reuse_policy_forward and cfg.ppo_epochs == 1 and not cfg.dynamic_sampling
                and cfg.generation_batches == 1 and n_rows == cfg.per_device_training_batch_size
                and not cfg.actor_dropout and not self.e.use_hybrid and cfg.actor_zero_stage < 3
                and not cfg.entropy_coeff)  # the bonus needs the entropy's gradient, which the kept graph lacks

    def make(self, items, sample=True) -> Experience:
        """The experience of a list of prompt items (collated here)."""
        return self.make_experience(self.collate(items), sample)

    @torch.no_grad()
    def make_experience(self, batch, sample=True) -> Experience:
        """`sample`: a training batch (cfg.num_generations samples per prompt); False: one sample per prompt,
        never trained on (evaluation)."""
        cfg, dev = self.cfg, self.ctx.device
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        prompts, metas = batch["prompts"], batch["metas"]
        g = cfg.num_generations if sample else 1
        if g > 1:  # group-major: the g samples of prompt i are rows i*g .. i*g+g-1
            ids, mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)
            prompts = [p for p in prompts for _ in range(g)]
            metas = [m for m in metas for _ in range(g)]
        with self.log.timer("time/generation"):
            # the sampling-time log-probs (fast backend; None from hf/hybrid) only feed the mismatch stat
            seq, action_mask, rollout_logp = self.rollout.generate(ids, mask, group_size=g, return_logprobs=True)
        with self.log.timer("time/experience"):
            P, R = ids.shape[1], seq.shape[1] - ids.shape[1]
            attn = torch.cat([mask, action_mask.long()], 1)
            # forward-only passes: a micro-batch of rows at a time (row_chunk applies without autograd only),
            # in length groups without padding columns, each group's prompt run once (GRPO)
            shared = dict(row_chunk=cfg.per_device_training_batch_size, prompt_len=P, group_size=g,
                          length_groups=cfg.length_groups)
            ref_logp, values = self._frozen_scores(seq, attn, action_mask, R, shared)
            responses = self.tok.batch_decode(seq[:, P:].masked_fill(action_mask == 0, self.tok.pad_token_id),
                                              skip_special_tokens=True)
            own = isinstance(self.e.reward_fn, RewardFunction)
            scores, components = self.e.reward_fn(seq, attn, prompts, responses, metas, **(shared if own else {}))
            scores = self._length_penalty(scores.to(dev), action_mask, components)
            # the actor last: when its forward keeps the autograd graph for the update, the other models'
            # forwards do not run (and allocate) on top of it
            logp, graph = self._policy_logprobs(seq, attn, R, shared, self.reuses_policy_forward(seq.shape[0], sample))
            exp = Experience(seq, attn, action_mask, P, logp, ref_logp, values, scores,
                             responses=responses, prompts=prompts, components=components, policy_graph=graph,
                             rollout_logprobs=rollout_logp, truncated=truncated_rows(seq[:, P:], action_mask,
                                                                                     self.rollout.eos))
            compute_advantages(exp, cfg, group_size=g)
            if sample and cfg.overlong_filter:  # DAPO: a truncated answer's loss is masked out (not its reward)
                exp.action_mask = exp.action_mask * (~exp.truncated).to(exp.action_mask.dtype)[:, None]
        return exp

    def _length_penalty(self, scores, action_mask, components):
        """scores + DAPO's soft overlong penalty (--overlong_buffer_len > 0), logged as reward/overlong."""
        cfg = self.cfg
        if not cfg.overlong_buffer_len:
            return scores
        penalty = overlong_penalty(action_mask.sum(1).cpu(), cfg.max_answer_seq_len, cfg.overlong_buffer_len,
                                   cfg.overlong_penalty_factor)
        components["reward/overlong"] = penalty
        return scores + penalty.to(scores.device, scores.dtype)

    def _frozen_scores(self, seq, attn, action_mask, R, shared):
        """(reference log-probs or None, critic values or None) of the sampled rows."""
        ref_logp, values = None, None
        with ReferenceScope(self.e) as ref:
            if ref is not None:
                ref_logp = response_logprobs(ref, seq, attn, R, self.cfg.temperature or 1.0, **shared)
        if self.e.critic is not None:
            self.e.critic.eval()
            values = response_values(self.e.critic, seq, attn, R, row_chunk=shared["row_chunk"],
                                     length_groups=shared["length_groups"]) * action_mask
        return ref_logp, values

    def _policy_logprobs(self, seq, attn, R, shared, keep_graph):
        """(old log-probs, (logp, entropy) with the autograd graph kept for the first update, or None)."""
        temperature = self.cfg.temperature or 1.0
        if keep_graph:
            self.e.actor.train()
            with torch.enable_grad():  # its backward comes in the first update: one group at ZeRO-3
                graph = response_logprobs(self.e.actor, seq, attn, R, temperature, with_entropy=True, **dict(
                    shared, length_groups=self.cfg.groups_for(self.cfg.actor_zero_stage, grad=True)))
            return graph[0].detach(), graph
        actor_scoring_mode(self.e.actor)  # engine.train() (training forwards, never the hybrid kernels) + no dropout
        return response_logprobs(self.e.actor, seq, attn, R, temperature, **shared), None

