"""Does averaging several reward models beat one? Scored from runs of bench/reward_model_bench.py on one split.

    python bench/reward_model_ensemble.py --runs /tmp/rm/seed1 /tmp/rm/seed2 --out bench/results/x.json

Each --runs directory is a reward_model_bench --out directory: its ours_scores.jsonl holds one model's scores of
the same eval pairs (the runs must share the split; the script refuses runs whose pair counts differ or whose
split files differ). No model is loaded or trained here.

The ensemble's reward for a reply is the mean over models of each model's standardised score. Standardising
(each model's scores of all eval replies, chosen and rejected, to mean 0 and std 1) uses no label; it only
keeps a model whose scores spread wider from outweighing the others. Reported: each model's accuracy and
the ensemble's (ties count wrong, as in reward_model_bench, with its bootstrap CI), the ensemble's paired gain
over the mean single model, how often the models agree on a pair, and the share of pairs some model gets
right (what an oracle picking the right model per pair would score: the most an ensemble could reach).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.reward_model_bench import bootstrap_ci, paired_diff_ci, score_summary, scores_of  # noqa: E402
from bench.report import print_report  # noqa: E402


def standardise(chosen, rejected) -> tuple[np.ndarray, np.ndarray]:
    """One model's scores of the eval replies, shifted and scaled so all 2n of them have mean 0 and std 1."""
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    both = np.concatenate([chosen, rejected])
    std = both.std()
    std = std if std > 0 else 1.0  # a constant model: every pair a tie whatever the scale
    return (chosen - both.mean()) / std, (rejected - both.mean()) / std


def ensemble_correct(models: list[tuple[list, list]]) -> np.ndarray:
    """Per pair: does the mean standardised score rank chosen strictly above rejected?"""
    margins = sum(c - r for c, r in (standardise(*m) for m in models))
    return margins > 0


def agreement(correct: list[np.ndarray]) -> float:
    """Mean over model pairs of the share of eval pairs on which both models are right or both wrong."""
    shares = [float(np.mean(a == b)) for i, a in enumerate(correct) for b in correct[i + 1:]]
    return float(np.mean(shares)) if shares else 1.0


def split_fingerprint(run: str) -> str | None:
    """Hash of the run's eval pairs file (reward_model_bench writes it under split_*/test.jsonl), if present."""
    splits = sorted(d for d in os.listdir(run) if d.startswith("split_"))
    path = os.path.join(run, splits[0], "test.jsonl") if splits else ""
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:16] if os.path.exists(path) else None


def ensemble_report(runs: list[str]) -> dict:
    models = [scores_of(os.path.join(run, "ours_scores.jsonl")) for run in runs]
    sizes = {len(c) for c, _ in models}
    if len(sizes) != 1:
        raise SystemExit(f"the runs scored different numbers of pairs ({sorted(sizes)}): not the same split")
    prints = {split_fingerprint(run) for run in runs} - {None}
    if len(prints) > 1:
        raise SystemExit("the runs' split_*/test.jsonl files differ: not the same eval pairs")
    correct = [np.asarray(c) > np.asarray(r) for c, r in models]
    ens = ensemble_correct(models)
    mean_single = np.mean(correct, axis=0)  # per pair: the share of single models that get it right
    return {
        "n_pairs": sizes.pop(),
        "models": [{"run": run, **score_summary(*m)} for run, m in zip(runs, models)],
        "mean_single_accuracy": round(float(np.mean([c.mean() for c in correct])), 4),
        "ensemble_accuracy": round(float(ens.mean()), 4),
        "ensemble_accuracy_ci95": [round(x, 4) for x in bootstrap_ci(ens)],
        "ensemble_gain_over_mean_single": round(float(ens.mean() - mean_single.mean()), 4),
        "ensemble_gain_ci95": paired_diff_ci(ens, mean_single),
        "agreement": round(agreement(correct), 4),
        "some_model_right": round(float(np.any(correct, axis=0).mean()), 4),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="reward_model_bench --out directories, one split")
    parser.add_argument("--out", default="", help="also write the JSON report here")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("--runs needs at least two runs to ensemble")
    print_report(ensemble_report(args.runs), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
