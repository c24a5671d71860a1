"""Which rows each stage trains on, and which rows are held out for evaluation.

DeepSpeed-Chat shares one data set between its three stages with `--data_split 2,4,4`: a seeded
permutation of the rows is cut into consecutive slices in those proportions, and stage k
(0=SFT, 1=reward model, 2=RLHF) trains only on slice k, so the reward model is never scored on the
prompts the SFT model memorised. `split_indices` reproduces upstream's cut exactly (same numpy
RandomState permutation, same rounding), so indices match for the same seed and size.

Eval rows: a source's own eval split if it has one (Hub test/validation, eval.json), otherwise a
seeded `eval_fraction` of its rows carved off BEFORE the stage split; the eval pool is never trained
on by any stage, so every stage evaluates on all of it. Use the same seed for all three stages,
or the stage slices (and the carved eval rows) will overlap.
"""
from __future__ import annotations

import numpy as np

from utils.data.readers import read_source
from utils.data.rows import DataError, PreferenceRow, stage_problem

STAGE_NAMES = ("sft", "reward", "rlhf")


def parse_data_split(data_split: str) -> list[float]:
    try:
        shares = [float(part) for part in str(data_split).split(",")]
    except ValueError:
        raise DataError(f"data_split {data_split!r}: expected comma-separated numbers like '2,4,4'",
                        "bad_value") from None
    if any(s < 0 for s in shares) or sum(shares) <= 0:
        raise DataError(f"data_split {data_split!r}: shares must be >= 0 and not all 0", "bad_value")
    return shares


def split_bounds(n: int, shares: list[float]) -> list[int]:
    """Slice boundaries [0, b1, ..., n] as upstream computes them (rounded cumulative, last fixed to n)."""
    total = sum(shares)
    bounds = [0]
    for share in shares:
        bounds.append(bounds[-1] + int(round(share / total * float(n))))
    diff = bounds[-1] - n
    return [0] + [b - diff for b in bounds[1:]]


def seeded_permutation(n: int, seed: int) -> list[int]:
    order = np.arange(n, dtype=np.int64)
    np.random.RandomState(seed=seed).shuffle(order)
    return order.tolist()


def split_indices(n: int, data_split: str = "2,4,4", stage: int = 0, seed: int = 1234) -> list[int]:
    """Indices (into n rows) that `stage` trains on. The slices of all stages are disjoint and together
    cover range(n); the result depends only on (n, data_split, stage, seed)."""
    shares = parse_data_split(data_split)
    if not 0 <= stage < len(shares):
        raise DataError(f"data_split {data_split!r} has {len(shares)} shares, no share for stage {stage}",
                        "bad_value")
    if shares[stage] == 0:
        name = STAGE_NAMES[stage] if stage < len(STAGE_NAMES) else str(stage)
        raise DataError(f"data_split {data_split!r} gives stage {stage} ({name}) no data; give it a "
                        "share, e.g. '10,0,0' for the first stage alone", "bad_value")
    bounds = split_bounds(n, shares)
    return seeded_permutation(n, seed)[bounds[stage]:bounds[stage + 1]]


def carve_eval(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train_pool, eval_pool) indices: a seeded eval_fraction of n, at least one row when n >= 2."""
    n_eval = int(round(n * eval_fraction)) if eval_fraction > 0 else 0
    if eval_fraction > 0 and n >= 2:
        n_eval = max(n_eval, 1)
    order = seeded_permutation(n, seed + 1)  # a different stream from the stage permutation
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def load_stage_rows(data_paths: list[str], data_split: str, stage: int, seed: int,
                    eval_fraction: float = 0.1, on_bad_rows: str = "error", max_field_chars: int | None = None,
                    cut: list | None = None) -> tuple[list[PreferenceRow], list[PreferenceRow], list[str]]:
    """(train_rows, eval_rows, skipped_messages) for `stage`, blending several sources.

    Each source is split by `data_split` on its own (as upstream), then the parts are concatenated in
    the order given; shuffling is the training sampler's job. Rows that lack what the stage needs
    (rows.stage_problem) are dropped after the split, so every stage's slice stays where it was.
    `cut` (a list) collects the notes of fields cut to `max_field_chars`.
    """
    if isinstance(data_paths, str):
        data_paths = data_paths.split()
    train_rows: list[PreferenceRow] = []
    eval_rows: list[PreferenceRow] = []
    skipped: list[str] = []
    for path in data_paths:
        source = read_source(path, on_bad_rows, max_field_chars=max_field_chars)
        _refuse_all_bad(path, source.train.rows, source.train.skipped, "bad")
        skipped.extend(source.skipped)
        if cut is not None:
            cut.extend(source.train.cut + (source.eval.cut if source.eval else []))
        pool = source.train.rows
        if source.eval is not None:
            held_out = source.eval.rows
        else:
            train_idx, eval_idx = carve_eval(len(pool), eval_fraction, seed)
            pool, held_out = [pool[i] for i in train_idx], [pool[i] for i in eval_idx]
        mine = [pool[i] for i in split_indices(len(pool), data_split, stage, seed)]
        kept, dropped = _fit_for_stage(mine, stage, on_bad_rows)
        _refuse_all_bad(path, kept, dropped, f"unusable for stage {stage + 1} ({STAGE_NAMES[stage]})")
        train_rows.extend(kept)
        eval_rows.extend(_fit_for_stage(held_out, stage, on_bad_rows)[0])
        skipped.extend(dropped)
    if not train_rows:
        raise DataError(f"no training rows for stage {stage + 1} from {', '.join(data_paths)}: --data_split "
                        f"{data_split!r} leaves this stage an empty slice (too few rows for its share)", "empty")
    return train_rows, eval_rows, skipped


def _fit_for_stage(rows: list[PreferenceRow], stage: int, on_bad_rows: str) -> tuple[list[PreferenceRow], list[str]]:
    """(rows the stage can use, messages of the others); "error" raises the first problem."""
    kept, dropped = [], []
    for row in rows:
        problem = stage_problem(row, stage)
        if problem is None:
            kept.append(row)
        elif on_bad_rows == "error":
            raise problem
        else:
            dropped.append(str(problem))
    return kept, dropped


def _refuse_all_bad(path: str, rows: list, bad: list[str], what: str) -> None:
    """Every row of a source bad: name the file, the count and the first reason (not --data_split)."""
    if not rows and bad:
        raise DataError(f"{path}: all {len(bad)} rows are {what} (--on_bad_rows skip dropped them); first: "
                        f"{bad[0]}", "all_bad")
