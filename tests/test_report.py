"""Tests for inference/report.py: small TensorBoard logs -> PNGs + report.md, checked against hand values.

Logged values are dyadic fractions (exact in float32, which is what TensorBoard stores), so equality is exact.
"""
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

from inference.report import (Series, aligned, classify_tag, ema_smooth, group_tags, headlines, main,
                              summarize, write_report)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP1 = {  # tag -> (steps, values)
    "train/loss": ([0, 1, 2, 3, 4], [2.5, 2.0, 1.75, 1.5, 1.25]),
    "eval/loss": ([0, 4], [2.25, 2.0]),
    "eval/perplexity": ([0, 4], [9.5, 7.5]),
    "train/lr": ([0, 1, 2, 3, 4], [0.0, 0.5, 1.0, 0.75, 0.25]),
}
STEP2 = {
    "train/loss": ([0, 1, 2], [0.75, 0.625, 0.5]),
    "eval/accuracy": ([0, 2], [0.5, 0.75]),
    "eval/chosen_score": ([0, 2], [0.25, 1.5]),
    "eval/rejected_score": ([0, 2], [0.0, 0.5]),
    "eval/margin": ([0, 2], [0.25, 1.0]),
}
STEP3 = {
    "reward/mean": ([0, 1, 2, 3], [0.125, 0.25, 0.5, 0.875]),
    "reward/std": ([0, 1, 2, 3], [0.5, 0.25, 0.25, 0.125]),
    "reward/score": ([0, 1, 2, 3], [0.25, 0.375, 0.625, 1.0]),
    "kl/mean": ([0, 1, 2, 3], [0.0, 0.0625, 0.125, 0.25]),
    "response/length": ([0, 1, 2, 3], [32.0, 40.0, 48.0, 44.0]),
    "response/length_max": ([0, 1, 2, 3], [64.0, 64.0, 80.0, 72.0]),
    "loss/policy": ([0, 1, 2, 3], [0.5, 0.25, -0.25, 0.125]),
    "loss/value": ([0, 1, 2, 3], [4.0, 2.0, 1.0, 0.5]),
    "clipfrac/policy": ([0, 1, 2, 3], [0.0, 0.125, 0.25, 0.125]),
    "entropy": ([0, 1, 2, 3], [2.5, 2.25, 2.0, 2.0]),
    "time/generation": ([0, 1, 2, 3], [2.0, 2.5, 3.0, 2.0]),
    "time/experience": ([0, 1, 2, 3], [0.5, 0.5, 0.75, 0.5]),
    "time/training": ([0, 1, 2, 3], [1.0, 1.25, 1.0, 1.5]),
    "train/lr": ([0, 1, 2, 3], [0.25, 0.25, 0.125, 0.125]),
    "custom/thing": ([0, 3], [1.0, 3.0]),
}


def write_logs(run_dir, scalars):
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(run_dir))
    for tag, (steps, values) in scalars.items():
        for step, value in zip(steps, values):
            writer.add_scalar(tag, value, step)
    writer.close()


@pytest.fixture(scope="module")
def three_stage_logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_logs(root / "step1", STEP1)
    write_logs(root / "step2", STEP2)
    write_logs(root / "step3", STEP3)
    return root


@pytest.fixture(scope="module")
def report(three_stage_logs, tmp_path_factory):
    return write_report(str(three_stage_logs), str(tmp_path_factory.mktemp("out")))


# ------------------------------------------------------------------------------------------- pure helpers

def test_ema_smooth_hand_values():
    # Start at the first value, no debias term: s0 = 0; s1 = 0.5*0 + 0.5*1 = 0.5; s2 = 0.5*0.5 + 0.5*1 = 0.75.
    assert ema_smooth([0, 1, 1], 0.5) == [0.0, 0.5, 0.75]
    # weight 0.75 on [4, 0, 8]: s1 = 0.75*4 = 3; s2 = 0.75*3 + 0.25*8 = 2.25 + 2 = 4.25.
    assert ema_smooth([4, 0, 8], 0.75) == [4.0, 3.0, 4.25]
    assert ema_smooth([3, 1, 2], 0.0) == [3.0, 1.0, 2.0]
    # A NaN passes through and does not reset/poison the state: s2 = 0.5*0 + 0.5*1 = 0.5.
    out = ema_smooth([0, float("nan"), 1], 0.5)
    assert out[0] == 0.0 and math.isnan(out[1]) and out[2] == 0.5
    with pytest.raises(ValueError):
        ema_smooth([1.0], 1.0)


def test_group_tags():
    tags = ["train/loss", "eval/loss", "loss/ptx", "eval/accuracy", "eval/margin", "reward/mean", "reward/std",
            "kl/mean", "response/length_max", "clipfrac/value", "entropy", "time/training", "time/generation",
            "time/experience", "train/lr", "weird/tag"]
    assert group_tags(tags) == {
        "loss": ["eval/loss", "loss/ptx", "train/loss"],
        "eval": ["eval/accuracy", "eval/margin"],
        "reward": ["reward/mean", "reward/std"],
        "kl": ["kl/mean"],
        "response": ["response/length_max"],
        "clipfrac": ["clipfrac/value"],
        "entropy": ["entropy"],
        "time": ["time/generation", "time/experience", "time/training"],  # stacking order, not alphabetical
        "lr": ["train/lr"],
        "other": ["weird/tag"],
    }
    assert classify_tag("eval/loss") == "loss"  # the loss prefix wins over the eval group
    assert classify_tag("rewards") == "other"   # "reward" only as a whole path component


def test_summarize_and_aligned():
    s = Series([0, 2, 5], [3.0, float("nan"), 1.0])
    assert summarize(s) == {"first": 3.0, "final": 1.0, "min": 1.0, "max": 3.0, "points": 3,
                            "first_step": 0, "last_step": 5}
    series = {"a": Series([0, 1, 2], [1.0, 2.0, 3.0]), "b": Series([1, 2, 3], [10.0, 20.0, 30.0])}
    assert aligned(series, ["a", "b"]) == ([1, 2], [[2.0, 3.0], [10.0, 20.0]])


def test_headlines_step3_numbers():
    series = {t: Series(*v) for t, v in STEP3.items()}
    lines = headlines(series)
    assert "reward 0.125 -> 0.875 over 4 steps" in lines
    assert "KL 0 -> 0.25 over 4 steps" in lines
    # generation 2+2.5+3+2 = 9.5, experience 0.5+0.5+0.75+0.5 = 2.25, training 1+1.25+1+1.5 = 4.75; total 16.5
    # -> 57.6% / 13.6% / 28.8%, 16.5 s / 4 steps = 4.125 s/step
    assert "time split: generation 58%, experience 14%, training 29%, 4.125 s/step" in lines


# ------------------------------------------------------------------------------------------- end to end

def test_pngs_exist_and_are_images(report):
    expected = {"step1/loss", "step1/eval", "step1/lr", "step2/loss", "step2/eval",
                "step3/loss", "step3/reward", "step3/kl", "step3/response", "step3/clipfrac", "step3/entropy",
                "step3/time", "step3/lr", "step3/other"}
    assert set(report.png_paths) == expected
    assert os.path.basename(report.png_paths["step3/time"]) == "step3_time.png"
    assert os.path.basename(report.png_paths["step1/loss"]) == "step1_loss.png"
    for path in report.png_paths.values():
        assert os.path.getsize(path) > 0
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
            im.verify()


def test_plotted_lines_equal_logged_values(report):
    loss = report.plotted["step1"]["loss"]
    assert loss["train/loss"] == {"x": [0, 1, 2, 3, 4], "y": [2.5, 2.0, 1.75, 1.5, 1.25]}
    assert loss["eval/loss"] == {"x": [0, 4], "y": [2.25, 2.0]}
    reward = report.plotted["step3"]["reward"]
    assert reward["reward/mean"]["y"] == [0.125, 0.25, 0.5, 0.875]
    assert reward["reward/score"]["y"] == [0.25, 0.375, 0.625, 1.0]
    assert "reward/std" not in reward  # std is drawn as the band, not as its own line
    # band = mean +- std: 0.125-0.5, 0.25-0.25, 0.5-0.25, 0.875-0.125 and the sums
    assert reward["reward/mean-std"]["y"] == [-0.375, 0.0, 0.25, 0.75]
    assert reward["reward/mean+std"]["y"] == [0.625, 0.5, 0.75, 1.0]
    assert report.plotted["step3"]["other"]["custom/thing"] == {"x": [0, 3], "y": [1.0, 3.0]}
    assert report.plotted["step2"]["eval"]["eval/accuracy"]["y"] == [0.5, 0.75]


def test_stacked_time_top_edge_is_sum(report):
    time = report.plotted["step3"]["time"]
    # cumulative layers: generation; generation + experience; + training
    assert time["time/generation (top edge)"]["y"] == [2.0, 2.5, 3.0, 2.0]
    assert time["time/experience (top edge)"]["y"] == [2.5, 3.0, 3.75, 2.5]
    # top edge = 2+0.5+1, 2.5+0.5+1.25, 3+0.75+1, 2+0.5+1.5
    assert time["time/training (top edge)"] == {"x": [0, 1, 2, 3], "y": [3.5, 4.25, 4.75, 4.0]}


def test_markdown_numbers_and_links(report):
    text = open(report.markdown_path, encoding="utf-8").read()
    assert "## step1" in text and "## step2" in text and "## step3" in text
    assert "- train loss 2.5 -> 1.25 over 5 steps" in text
    assert "- eval loss 2.25 -> 2 over 5 steps" in text
    assert "- pairwise accuracy 0.75" in text           # step2 has chosen/rejected scores -> pairwise
    assert "- reward 0.125 -> 0.875 over 4 steps" in text
    # table row: first, final, min, max, points
    assert "| train/loss | 2.5 | 1.25 | 1.25 | 2.5 | 5 |" in text
    assert "| loss/policy | 0.5 | 0.125 | -0.25 | 0.5 | 4 |" in text
    assert "![step3 time](step3_time.png)" in text
    assert report.final["step3"]["reward/mean"] == 0.875
    assert report.final["step1"]["eval/perplexity"] == 7.5


def test_smoothing_draws_raw_and_ema(three_stage_logs, tmp_path):
    result = write_report(str(three_stage_logs / "step1"), str(tmp_path), smooth=0.5)
    assert set(result.final) == {"step1"}  # event files directly in logdir -> run named after the dir
    loss = result.plotted["step1"]["loss"]
    assert loss["train/loss"]["y"] == [2.5, 2.0, 1.75, 1.5, 1.25]
    # EMA 0.5: 2.5; (2.5+2)/2 = 2.25; (2.25+1.75)/2 = 2; (2+1.5)/2 = 1.75; (1.75+1.25)/2 = 1.5
    assert loss["train/loss (smoothed)"]["y"] == [2.5, 2.25, 2.0, 1.75, 1.5]
    # eval curves (dataset averages) and the lr schedule are drawn raw only
    assert "eval/loss (smoothed)" not in loss and loss["eval/loss"]["y"] == [2.25, 2.0]
    assert set(result.plotted["step1"]["lr"]) == {"train/lr"}


def test_main_prints_report_path(three_stage_logs, tmp_path, capsys):
    assert main(["--logdir", str(three_stage_logs / "step2"), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(str(tmp_path), "report.md")


def test_cli_errors_exit_2(tmp_path):
    for logdir in (tmp_path / "missing", tmp_path):  # not there; exists but no event files
        proc = subprocess.run([sys.executable, "-m", "inference.report", "--logdir", str(logdir)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert proc.stdout == ""
        err = proc.stderr.strip()
        assert err.startswith("error: ") and "\n" not in err
