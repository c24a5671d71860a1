"""Forward passes without the padding columns: rows grouped by length, each group cut to its own width.

A batch of left-padded prompts is as wide as its longest prompt; on workload W about a sixth of the tokens of
a PPO batch are padding that every forward and backward pass would pay for. Sorting the rows by their left
padding and running them in up to `max_groups` groups, each without the columns that are padding in all of
its rows, computes the same numbers (position ids come from the attention mask, so dropping all-padding
columns on the left changes no position and no attention) for fewer FLOPs. Right-side (response) padding is
kept: response tensors stay aligned to the right edge of the batch.

Several processes: under ZeRO-3 every forward call all-gathers the weights, so every rank must make the same
number of calls or the ranks hang waiting on each other (or, worse, pair a gather with another model's). The
plan (how many groups, how many rows in each) is therefore made from lengths all ranks agree on: the i-th
shortest block's length (width less its left padding) is all-reduced with MAX, every rank cuts its own sorted
blocks at the same positions, and each group is then cut only to the columns that are padding in all of its
rows on this rank. Same number of calls with the same rows on every rank (batches are the same size on every
rank), for two tiny all-reduces per batch; one process: no collective, the plan as before. (The simpler rule,
one group whenever several processes run, would give up the padding savings on every multi-GPU run.)
"""
from __future__ import annotations

import torch

from utils.guards import max_over_ranks
from utils.phase import rank_name


def left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] number of leading padding columns per row (the whole width for an all-padding row)."""
    return (attention_mask.long().cumsum(-1) == 0).sum(-1)


def row_groups(attention_mask: torch.Tensor, align: int = 1, max_groups: int = 3,
               overhead_tokens: int = 64) -> list[tuple[torch.Tensor, int]]:
    """Split the rows into at most `max_groups` groups that minimise the tokens computed.

    Blocks of `align` consecutive rows stay together (the G copies of a GRPO prompt); blocks are ordered by
    their left padding and cut into contiguous runs by dynamic programming; each extra group costs
    `overhead_tokens` (a forward call's fixed cost, in tokens). Returns [(row indices, columns to cut)]."""
    B, W = attention_mask.shape
    align = align if align > 0 and B % align == 0 else 1
    lead = left_padding(attention_mask).view(B // align, align).min(-1).values.tolist()
    order = sorted(range(len(lead)), key=lambda b: -lead[b])  # most padding first (stable)
    n = len(order)
    length = agreed_lengths([W - lead[b] for b in order])  # same on all ranks
    best = {(0, 0): (0, [])}  # (blocks placed, groups used) -> (cost, cut points)
    for k in range(1, max_groups + 1):
        for end in range(1, n + 1):
            cands = []
            for start in range(end):
                prev = best.get((start, k - 1))
                if prev is None:
                    continue
                # the run's least-padded (longest) block sets its width
                cost = prev[0] + (end - start) * align * length[end - 1] + (overhead_tokens if k > 1 else 0)
                cands.append((cost, prev[1] + [end]))
            if cands:
                best[(end, k)] = min(cands, key=lambda c: c[0])
    _, cuts = min((best[(n, k)] for k in range(1, max_groups + 1) if (n, k) in best), key=lambda c: c[0])
    groups, start = [], 0
    for end in cuts:
        blocks = order[start:end]
        rows = torch.tensor([b * align + i for b in blocks for i in range(align)], dtype=torch.long)
        groups.append((rows, min(lead[b] for b in blocks)))
        start = end
    return groups


def agreed_lengths(sorted_len: list[int]) -> list[int]:
    """Each position's length (blocks sorted shortest first) as the maximum over all ranks: identical on every
    rank, so the grouping made from it is too. One process: `sorted_len` itself. Ranks holding different
    numbers of blocks cannot make the same calls: that is a bug upstream of here, and it stops with an error."""
    n = len(sorted_len)
    most, neg_least = max_over_ranks([n, -n])
    if most != -neg_least:
        raise RuntimeError(f"{rank_name()}: {n} row blocks in this batch but another rank has "
                           f"{int(most) if most != n else int(-neg_least)}; every rank needs the same batch size to "
                           "make the same number of forward calls")
    return [int(v) for v in max_over_ranks(sorted_len)]


def run_row_groups(fn, attention_mask, *tensors, align=1, max_groups=3, row_chunk=None):
    """fn(cut, *row-group slices without their `cut` leading columns) per group; the outputs (tensors or tuples
    of tensors with rows first) are put back in the original row order. `row_chunk` caps the rows per call
    (memory, without autograd); `tensors` are [B, T] like the mask. Autograd flows through the reassembly."""
    B = attention_mask.shape[0]
    groups = row_groups(attention_mask, align, max_groups) if max_groups > 1 else [(torch.arange(B), 0)]
    if row_chunk and not torch.is_grad_enabled():
        step = max(row_chunk // align, 1) * align
        lead = left_padding(attention_mask)
        groups = [(rows[s:s + step], int(lead[rows[s:s + step]].min()))
                  for rows, _ in groups for s in range(0, len(rows), step)]
    if len(groups) == 1 and groups[0][1] == 0:
        return fn(0, attention_mask, *tensors)
    parts = [fn(cut, attention_mask[rows][:, cut:], *(t[rows][:, cut:] for t in tensors)) for rows, cut in groups]
    order = torch.cat([rows for rows, _ in groups])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(B)
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p)[inverse.to(p[0].device)] for p in zip(*parts))
    return torch.cat(parts)[inverse.to(parts[0].device)]
