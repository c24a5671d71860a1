"""bench/reward_model_ensemble.py: the ensemble's pair decisions and statistics, checked by hand."""
import json
import os

import numpy as np
import pytest

from bench.reward_model_ensemble import ensemble_correct, ensemble_report, standardise


def write_run(root, name, chosen, rejected, split_text=None):
    run = os.path.join(root, name)
    os.makedirs(run)
    with open(os.path.join(run, "ours_scores.jsonl"), "w") as f:
        for i, (c, r) in reversed(list(enumerate(zip(chosen, rejected)))):  # the bench sorts by index
            f.write(json.dumps({"index": i, "chosen": c, "rejected": r}) + "\n")
    if split_text is not None:
        os.makedirs(os.path.join(run, "split_test_2_2_1234"))
        with open(os.path.join(run, "split_test_2_2_1234", "test.jsonl"), "w") as f:
            f.write(split_text)
    return run


# Model A's four scores are +-1 (mean 0, std 1); model B's are 0, 30, -30, 0 (mean 0, std sqrt(450) = 21.21).
A = ([1.0, -1.0], [-1.0, 1.0])    # margins 2, -2: right, wrong
B = ([0.0, 30.0], [-30.0, 0.0])   # margins 30, 30 -> 1.414, 1.414 standardised: right, right


def test_standardise_by_hand():
    c, r = standardise(*B)
    s = np.sqrt(450.0)
    assert np.allclose(c, [0.0, 30 / s]) and np.allclose(r, [-30 / s, 0.0])


def test_ensemble_weighs_models_by_their_spread_not_their_scale():
    # pair 1: 2 + 1.414 > 0, right; pair 2: -2 + 1.414 < 0, wrong. Raw averaging would say right (-2 + 30).
    assert ensemble_correct([A, B]).tolist() == [True, False]


def test_report_by_hand(tmp_path):
    runs = [write_run(tmp_path, "a", *A, "same"), write_run(tmp_path, "b", *B, "same")]
    rep = ensemble_report(runs)
    assert rep["n_pairs"] == 2
    assert [m["accuracy"] for m in rep["models"]] == [0.5, 1.0]
    assert rep["mean_single_accuracy"] == 0.75
    assert rep["ensemble_accuracy"] == 0.5
    assert rep["ensemble_gain_over_mean_single"] == -0.25  # per pair: 1 - 1, 0 - 0.5
    assert rep["agreement"] == 0.5                          # they agree on pair 1 only
    assert rep["some_model_right"] == 1.0


def test_refuses_runs_of_different_splits(tmp_path):
    a = write_run(tmp_path, "a", *A)
    short = write_run(tmp_path, "short", [1.0], [0.0])
    with pytest.raises(SystemExit, match="different numbers of pairs"):
        ensemble_report([a, short])
    x, y = write_run(tmp_path, "x", *A, "one split"), write_run(tmp_path, "y", *B, "another split")
    with pytest.raises(SystemExit, match="not the same eval pairs"):
        ensemble_report([x, y])
