"""DAPO's dynamic sampling (--dynamic_sampling): a group (the --num_generations samples of one prompt) whose
rewards are all equal has a group-relative advantage of 0 on every sample, so it teaches nothing and only
dilutes the batch. Such groups are dropped and the batch is refilled with the groups of new prompts (the next
generation batches of the prompt order, whose position the checkpoint holds), at most --max_refill_rounds
extra generation batches per step; past the cap the step trains on what it has (and says so).

Several processes (the rule that keeps their collectives in step): ZeRO-3 gathers weights in every forward and
DeepSpeed all-reduces gradients per micro-batch, so every rank must run the same number of refill rounds and
train on the same number of rows. Hence (1) another round runs while ANY rank is short (utils.guards.any_rank):
a rank that is already full takes part in the round's forwards too (its extra groups are not used); (2) every
rank trains on the FEWEST kept groups any rank has (capped at the step's size), so the micro-batch counts
agree; (3) with --gradient_accumulation_steps > 1 that count is rounded down to whole accumulation windows, so
no window stays open across steps. With one process (1) and (2) reduce to "refill while short, train on
what you have".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from step3_rlhf.experience import Experience
from step3_rlhf.experience_stats import zero_variance_groups
from utils.guards import any_rank, max_over_ranks


def kept_rows(scores, group_size) -> torch.Tensor:
    """Row indices (group-major) of the groups whose rewards are not all equal."""
    keep = ~zero_variance_groups(scores.float().cpu(), group_size)
    return torch.arange(len(scores)).reshape(-1, group_size)[keep].reshape(-1)


def select_rows(exp: Experience, idx) -> Experience:
    """A copy of `exp` with the rows `idx` (a LongTensor) of every per-row field, texts and reward components
    included (Experience.rows copies only what an update reads)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    dev_idx = idx.to(exp.sequences.device)
    pick = lambda t: None if t is None else t[idx.to(t.device)]  # noqa: E731
    return Experience(exp.sequences[dev_idx], exp.attention_mask[dev_idx], exp.action_mask[dev_idx],
                      exp.prompt_len, exp.logprobs[dev_idx], pick(exp.ref_logprobs), pick(exp.values),
                      exp.scores[dev_idx], pick(exp.advantages), pick(exp.returns),
                      responses=[exp.responses[i] for i in idx.tolist()] if exp.responses else [],
                      prompts=[exp.prompts[i] for i in idx.tolist()] if exp.prompts else [],
                      components={k: pick(v) for k, v in exp.components.items()},
                      rollout_logprobs=pick(exp.rollout_logprobs), truncated=pick(exp.truncated))


def _cat_padded(parts, widths, width, value, left=False):
    """Concatenate [B_i, w_i] tensors along rows, each padded to `width` columns with `value`."""
    out = []
    for t, w in zip(parts, widths):
        pad = (width - w, 0) if left else (0, width - w)
        out.append(F.pad(t, pad, value=value) if t.dim() == 2 else t)
    return torch.cat(out)


def concat_experiences(exps: list[Experience], pad_id: int) -> Experience:
    """One experience of the rows of `exps` (batches with different prompt width P and response width R):
    prompts left-padded to the widest P, responses right-padded to the widest R (masked: attention and action
    mask 0, log-probs/values/advantages 0). Position ids come from the attention mask, so the extra padding
    changes no log-prob."""
    P = max(e.prompt_len for e in exps)
    Rs = [e.action_mask.shape[1] for e in exps]
    R = max(Rs)
    Ps = [e.prompt_len for e in exps]

    def seq_field(name, value):
        prompts = _cat_padded([getattr(e, name)[:, :e.prompt_len] for e in exps], Ps, P, value, left=True)
        responses = _cat_padded([getattr(e, name)[:, e.prompt_len:] for e in exps], Rs, R, value)
        return torch.cat([prompts, responses], 1)

    def resp_field(name):
        parts = [getattr(e, name) for e in exps]
        return None if parts[0] is None else _cat_padded(parts, Rs, R, 0)

    return Experience(seq_field("sequences", pad_id), seq_field("attention_mask", 0), resp_field("action_mask"), P,
                      resp_field("logprobs"), resp_field("ref_logprobs"), resp_field("values"),
                      torch.cat([e.scores for e in exps]), resp_field("advantages"), resp_field("returns"),
                      responses=[r for e in exps for r in e.responses], prompts=[p for e in exps for p in e.prompts],
                      components={k: torch.cat([e.components[k] for e in exps]) for k in exps[0].components},
                      rollout_logprobs=resp_field("rollout_logprobs"),
                      truncated=None if exps[0].truncated is None else torch.cat([e.truncated for e in exps]))


def group_quantum(cfg) -> int:
    """Kept groups are trained in multiples of this many: 1, or with --gradient_accumulation_steps > 1 enough
    groups to fill whole accumulation windows (rows a multiple of micro-batch x accumulation steps)."""
    if cfg.gradient_accumulation_steps <= 1:
        return 1
    window = cfg.per_device_training_batch_size * cfg.gradient_accumulation_steps
    return math.lcm(cfg.num_generations, window) // cfg.num_generations


def dynamic_sample(exps, make_more, cfg, pad_id):
    """(experiences to train on: [] or one merged batch, every experience made (for the stats), stats).

    `exps`: the step's experiences; `make_more()`: the experience of the next generation batch of the prompt
    order (it advances the checkpointed prompt position). The rule across ranks is the module docstring's."""
    g = cfg.num_generations
    target = cfg.generation_batches * cfg.per_device_generation_batch_size
    made = list(exps)
    kept = [select_rows(e, kept_rows(e.scores, g)) for e in exps]
    have = sum(len(k.scores) for k in kept) // g
    rounds = 0
    while rounds < cfg.max_refill_rounds and any_rank(have < target):
        e = make_more()
        made.append(e)
        kept.append(select_rows(e, kept_rows(e.scores, g)))
        have += len(kept[-1].scores) // g
        rounds += 1
    n = min(int(-max_over_ranks([-have])[0]), target)  # the fewest kept groups on any rank
    n -= n % group_quantum(cfg)
    stats = {"dynamic_sampling/refill_rounds": float(rounds), "dynamic_sampling/trained_groups": float(n),
             "dynamic_sampling/short": float(n < target)}
    kept = [k for k in kept if len(k.scores)]
    if n == 0 or not kept:
        return [], made, stats
    merged = concat_experiences(kept, pad_id)
    return [select_rows(merged, torch.arange(n * g))], made, stats
