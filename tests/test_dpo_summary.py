"""inference.summary and inference.report on step2_dpo's outputs (what e2e_rlhf.py --step2-algo dpo leaves in
OUTPUT/step2_dpo): a fake summary.json with hand-computed figures, no training."""
import json
from types import SimpleNamespace

from inference.report import Series, classify_tag, group_tags, headlines
from inference.summary import summarize

# policy = reference before training: every pair ties (accuracy 0.5, margin 0, loss log 2)
BEFORE = {"eval/loss": 0.693147, "eval/rewards/chosen": 0.0, "eval/rewards/rejected": 0.0, "eval/margin": 0.0,
          "eval/accuracy": 0.5, "eval/accuracy_strict": 0.0, "eval/tie_fraction": 1.0}


def write_summary(out, before, after):
    (out / "step2_dpo").mkdir(parents=True)
    (out / "step2_dpo" / "summary.json").write_text(json.dumps(
        {"stage": "step2_dpo", "steps": 32, "before": before, "after": after, "train_pairs": 64, "eval_pairs": 2,
         "train_seconds": 50.0, "wall_seconds": 61.2}))


def test_summary_shows_dpo_figures_as_step2_dpo_computes_them(tmp_path):
    from step2_dpo.main import eval_metrics
    # beta 0.5; pair 0: chosen +1 nat over the reference, rejected -1 -> rewards 0.5 / -0.5; pair 1: a tie.
    # means: chosen 0.25, rejected -0.25, margin 0.5, accuracy (1 + 0.5) / 2; loss (-log sig(1) + log 2) / 2
    rows = [(0, -1.0, -3.0, -2.0, -2.0), (1, -2.0, -2.0, -2.0, -2.0)]
    after = eval_metrics(rows, SimpleNamespace(beta=0.5, loss_type="sigmoid", label_smoothing=0.0))
    write_summary(tmp_path, BEFORE, after)
    assert summarize(str(tmp_path)) == (
        "step 2 (DPO, 32 steps, 61 s wall): implicit-reward accuracy on 2 pairs it never trained on 0.500 -> 0.750 "
        "(a tie counts half; ties 100% -> 50%), margin 0.000 -> 0.500 (mean chosen 0.250, rejected -0.250), "
        "DPO loss 0.6931 -> 0.5032")


def test_summary_without_before_and_beside_step1(tmp_path):
    after = {**BEFORE, "eval/accuracy": 1.0, "eval/margin": 2.0, "eval/rewards/chosen": 1.0,
             "eval/rewards/rejected": -1.0, "eval/loss": 0.125, "eval/tie_fraction": 0.0}
    write_summary(tmp_path, {}, after)  # --no-compare_before
    (tmp_path / "step1").mkdir()
    (tmp_path / "step1" / "summary.json").write_text(json.dumps(
        {"steps": 4, "eval_sequences": 8, "before": {"eval/loss": 2.0, "eval/perplexity": 7.39},
         "after": {"eval/loss": 1.5, "eval/perplexity": 4.48}}))
    first, second = summarize(str(tmp_path)).splitlines()
    assert first.startswith("step 1 (SFT, 4 steps)")
    assert "nan -> 1.000" in second and "margin nan -> 2.000 (mean chosen 1.000, rejected -1.000)" in second


def test_report_groups_and_headlines_dpo_scalars():
    tags = {"train/loss": [0.75, 0.5], "rewards/chosen": [0.0, 0.25], "rewards/rejected": [0.0, -0.25],
            "rewards/margins": [0.0, 0.5], "rewards/accuracies": [0.5, 0.75], "eval/accuracy": [0.5, 0.75],
            "eval/margin": [0.0, 0.5], "eval/rewards/chosen": [0.0, 0.25], "eval/rewards/rejected": [0.0, -0.25]}
    assert group_tags(tags)["rewards"] == ["rewards/accuracies", "rewards/chosen", "rewards/margins",
                                           "rewards/rejected"]
    assert classify_tag("reward/mean") == "reward" and classify_tag("rewards") == "other"
    lines = headlines({t: Series([0, 1], v) for t, v in tags.items()})
    assert "DPO implicit-reward margin 0 -> 0.5 over 2 steps" in lines
    assert "chosen - rejected implicit-reward margin 0.5" in lines
    assert "implicit rewards: chosen 0.25, rejected -0.25" in lines
