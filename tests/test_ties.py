"""Step 2 and the scoring CLI report ties as ties: accuracy counts a tie half, plus the tie fraction."""


def test_ties_count_half_with_hand_made_scores():
    from utils.preference_losses import pairwise_outcomes
    # a zero head: every pair ties -> 0.5, not 0.0
    assert pairwise_outcomes([0.0] * 4, [0.0] * 4) == {"accuracy": 0.5, "accuracy_strict": 0.0, "tie_fraction": 1.0}
    # right, tie, wrong, right -> (1 + 0.5 + 0 + 1) / 4
    out = pairwise_outcomes([2.0, 1.0, -1.0, 0.5], [1.0, 1.0, 0.0, 0.0])
    assert out == {"accuracy": 0.625, "accuracy_strict": 0.5, "tie_fraction": 0.25}



def test_step2_eval_metrics_report_ties():
    from step2_reward_model.main import eval_metrics
    m = eval_metrics([(0, 0.0, 0.0), (1, 0.0, 0.0), (2, 1.0, 0.0), (3, 0.0, 1.0)])
    assert m["eval/accuracy"] == 0.5 and m["eval/accuracy_strict"] == 0.25 and m["eval/tie_fraction"] == 0.5


def test_summary_shows_ties_and_wall_time(tmp_path):
    import json
    from inference.summary import summarize
    (tmp_path / "step2").mkdir()
    before = {"eval/accuracy": 0.5, "eval/tie_fraction": 1.0}
    after = {"eval/accuracy": 0.75, "eval/tie_fraction": 0.0, "eval/chosen_score": 0.2, "eval/rejected_score": -0.1}
    (tmp_path / "step2" / "summary.json").write_text(json.dumps(
        {"steps": 4, "eval_pairs": 8, "before": before, "after": after, "wall_seconds": 61.2}))
    line = summarize(str(tmp_path))
    assert "0.500 -> 0.750" in line and "ties 100% -> 0%" in line and "61 s wall" in line
