"""What to watch on the experience side (#14.4, #15.5): the pure definitions on hand-computed values, the
per-step stats of a hand-built experience, and the reward-hacking detectors (windowed trend, end-of-run block)."""
from types import SimpleNamespace

import pytest
import torch

from step3_rlhf.evaluate import hacking_trend, run_summary, summary_lines, warn_on_hacking_trend
from step3_rlhf.experience import Experience
from step3_rlhf.experience_stats import (empty_or_format_only, experience_stats, logprob_mismatch, max_ngram_count,
                                         overlong_penalty, repetitive, truncated_rows, zero_variance_groups)


# ---------------------------------------------------------------- pure definitions
def test_overlong_penalty_by_hand():
    # max 10 tokens, buffer 4: no penalty up to 10 - 4 = 6 tokens, then -(len - 6) / 4 * factor
    lengths = [1, 6, 7, 8, 9, 10]
    assert overlong_penalty(lengths, 10, 4, 1.0).tolist() == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0]
    assert overlong_penalty(lengths, 10, 4, 0.5).tolist() == [0.0, 0.0, -0.125, -0.25, -0.375, -0.5]
    # buffer as long as the maximum: the penalty starts at the first token (-1/10 per token)
    assert torch.allclose(overlong_penalty([0, 5, 10], 10, 10, 1.0), torch.tensor([0.0, -0.5, -1.0]))
    assert overlong_penalty(lengths, 10, 0, 1.0).tolist() == [0.0] * 6  # off


def test_truncated_rows_are_those_without_an_eos():
    eos = [2, 9]
    responses = torch.tensor([[5, 6, 7], [5, 2, 0], [9, 0, 0], [5, 6, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.float)
    # row 3 ended (masked) without an EOS of ours among its actions: it is counted as truncated too
    assert truncated_rows(responses, mask, eos).tolist() == [True, False, False, True]
    # an EOS after the action tokens (a pad that equals the EOS) does not end a response
    assert truncated_rows(torch.tensor([[5, 6, 2]]), torch.tensor([[1.0, 1, 0]]), eos).tolist() == [True]


def test_repetition_by_hand():
    assert max_ngram_count([1, 2, 3, 4] * 5) == 5  # (1, 2, 3, 4) five times
    assert max_ngram_count(list(range(20))) == 1
    assert max_ngram_count([1, 2, 3]) == 0  # shorter than n
    loop = [7, 7, 7, 7, 7, 7]  # (7, 7, 7, 7) at 3 offsets: 3 is not "more than 3"
    assert max_ngram_count(loop) == 3 and not repetitive(loop)
    assert repetitive(loop + [7])  # 4 occurrences
    assert repetitive([1, 2, 3] * 5, n=3, max_count=4) and not repetitive([1, 2, 3] * 4, n=3, max_count=4)


@pytest.mark.parametrize("text,expected", [
    ("", True), ("  \n\t", True), ("<think></think><answer> </answer>", True), ("</answer>", True),
    ("<think>\n</think>\n<answer></answer>", True), ("<answer>4</answer>", False), ("hello", False),
    ("<think>try 3+4</think>", False), ("1 < 2 > 0", False)])
def test_empty_or_format_only(text, expected):
    assert empty_or_format_only(text) is expected


def test_logprob_mismatch_by_hand():
    rollout = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    exp = torch.tensor([[-1.1, -2.0, -2.0], [-0.5, -0.7, -9.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])  # the -9 is masked
    mean, worst = logprob_mismatch(rollout, exp, mask)
    # |diffs| on masked tokens: 0.1, 0, 1, 0, 0.2 -> mean 1.3 / 5 = 0.26, max 1
    assert mean == pytest.approx(0.26, abs=1e-6) and worst == pytest.approx(1.0)
    assert logprob_mismatch(rollout, exp, torch.zeros(2, 3)) == (0.0, 0.0)


def test_zero_variance_groups():
    scores = torch.tensor([1.0, 1, 1, 0, 2, 2, 0.5, 0.5])
    assert zero_variance_groups(scores, 2).tolist() == [True, False, True, True]
    assert zero_variance_groups(scores, 4).tolist() == [False, False]


# ---------------------------------------------------------------- the per-step stats
def _experience(rollout=True):
    """4 rows, G = 2, P = 1, R = 7, EOS id 2: lengths 3 (EOS), 7 (truncated), 7 (a loop, truncated), 1 (EOS)."""
    seq = torch.tensor([[4, 5, 6, 2, 0, 0, 0, 0],
                        [4, 5, 6, 7, 8, 9, 10, 11],
                        [4, 5, 5, 5, 5, 5, 5, 5],
                        [4, 2, 0, 0, 0, 0, 0, 0]])
    action = torch.tensor([[1.0, 1, 1, 0, 0, 0, 0], [1] * 7, [1] * 7, [1, 0, 0, 0, 0, 0, 0]])
    attn = torch.cat([torch.ones(4, 1, dtype=torch.long), action.long()], 1)
    logp = -torch.ones(4, 7) * action
    exp = Experience(seq, attn, action, 1, logp, logp - 0.5 * action, None, torch.tensor([1.0, 1.0, 0.0, 2.0]),
                     responses=["<answer>3</answer>", "words here", "5 5 5", "<think> </think>"],
                     components={"reward/rule": torch.tensor([1.0, 1.0, 0.0, 2.0])},
                     rollout_logprobs=logp + 0.1 * action if rollout else None,
                     truncated=truncated_rows(seq[:, 1:], action, [2]))
    return exp


def test_experience_stats_by_hand():
    exp = _experience()
    s = experience_stats([exp], group_size=2)
    assert s["response/length"] == pytest.approx((3 + 7 + 7 + 1) / 4) and s["response/length_max"] == 7
    assert s["response/truncated_frac"] == 0.5
    assert s["response/repetition_frac"] == 0.25   # row 3: (5, 5, 5, 5) at 4 offsets of 7 tokens
    assert s["response/empty_frac"] == 0.25        # "<think> </think>"
    assert s["groups/zero_variance_frac"] == 0.5   # (1, 1) equal, (0, 2) not
    assert s["kl/mean"] == pytest.approx(0.5 * 18 / 4)  # 0.5 per token, 18 tokens over 4 rows
    assert s["logprob_mismatch/rollout_mean"] == pytest.approx(0.1) and s["logprob_mismatch/rollout_max"] == pytest.approx(0.1)
    assert s["reward/rule"] == 1.0 and s["reward/mean"] == 1.0
    # --overlong_filter zeroes the truncated rows' action mask: the length, KL and mismatch figures still see
    # what was generated (the attention mask's response part)
    exp.action_mask = exp.action_mask * (~exp.truncated).float()[:, None]
    assert experience_stats([exp], group_size=2) == s
    # no rollout log-probs (hf/hybrid backends), one sample per prompt: those stats are left out
    s1 = experience_stats([_experience(rollout=False)], group_size=1)
    assert "logprob_mismatch/rollout_mean" not in s1 and "groups/zero_variance_frac" not in s1


# ---------------------------------------------------------------- reward-hacking detectors
def _history(rewards, kls, **extra):
    return [{"reward/mean": r, "kl/mean": k, "response/length": 10.0, **extra} for r, k in zip(rewards, kls)]


def test_hacking_trend_windows():
    rising, flat = [0.1, 0.1, 0.2, 0.3], [0.3, 0.3, 0.3, 0.3]
    fast, slow = [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.02, 0.02]
    # window 2: KL 0 -> 0.5 over 2 steps = 0.25 nats/step > 0.1, reward 0.1 -> 0.25: the signature
    assert hacking_trend(rising, fast, 2, 0.1)
    assert not hacking_trend(flat, fast, 2, 0.1)       # reward not rising
    assert not hacking_trend(rising, slow, 2, 0.1)     # 0.01 nats/step
    assert not hacking_trend(rising[1:], fast[1:], 2, 0.1)  # fewer than 2 windows
    assert not hacking_trend(rising, [None] * 4, 2, 0.1)    # no reference: no KL


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(msg)


def test_warning_printed_once_when_the_trend_starts():
    cfg = SimpleNamespace(detector_window=2, detector_kl_growth=0.1)
    log, history = _Log(), []
    rewards, kls = [0.1, 0.1, 0.2, 0.3, 0.4, 0.5], [0.0, 0.0, 0.5, 0.5, 1.0, 1.5]
    for step, (r, k) in enumerate(zip(rewards, kls), 1):
        stats = {"reward/mean": r, "kl/mean": k}
        stats["detect/hacking_trend"] = warn_on_hacking_trend(history, stats, cfg, log, step)
        history.append(stats)
    assert [h["detect/hacking_trend"] for h in history] == [0, 0, 0, 1, 1, 1]
    assert len(log.lines) == 1 and log.lines[0].startswith("WARNING step 4: training reward 0.1 -> 0.25")


def test_run_summary_first_vs_last_and_the_signature():
    history = _history([0.1, 0.1, 0.5, 0.6], [0.0, 0.0, 1.0, 1.2], **{"response/truncated_frac": 0.25})
    before, after = {"reward_mean": 0.3}, {"reward_mean": 0.2}
    block = run_summary(history, before, after, window=2, kl_growth=0.1)
    assert block["window"] == 2
    assert block["metrics"]["reward"] == {"first": 0.1, "last": pytest.approx(0.55)}
    assert block["metrics"]["KL"] == {"first": 0.0, "last": pytest.approx(1.1)}
    assert block["metrics"]["truncation"] == {"first": 0.25, "last": 0.25}
    assert "repetition" not in block["metrics"]  # not in this history
    # reward up, KL +1.1 over 2 steps (0.55/step > 0.1), held-out 0.3 -> 0.2: the full signature
    assert len(block["warnings"]) == 1 and block["warnings"][0].startswith("reward hacking: training reward 0.1")
    lines = summary_lines(block)
    assert lines[0].startswith("detectors, first 2 vs last 2 step(s): reward 0.1 -> 0.55 | KL 0 -> 1.1")
    assert lines[1] == "held-out reward 0.3 -> 0.2" and lines[2].startswith("WARNING reward hacking")
    # the held-out reward rose: no warning; no held-out measure: no end-of-run warning either
    assert run_summary(history, before, {"reward_mean": 0.4}, 2, 0.1)["warnings"] == []
    assert run_summary(history, None, None, 2, 0.1)["warnings"] == []
    # a trend that fired during the run is listed with its step
    flagged = [{**h, "detect/hacking_trend": float(i >= 3)} for i, h in enumerate(history)]
    assert run_summary(flagged, None, None, 2, 0.1)["warnings"][0].startswith("step 4: training reward 0.1")
    assert summary_lines(run_summary([], None, None, 2, 0.1)) == ["detectors: no steps"]
