"""Why greedy Countdown answers fail: each answer of a step-3 evaluation sorted into one class, as JSON.

Reads the `samples` (prompt, response) of step 3's held-out evaluations - OUTPUT_DIR/eval_before.json (the
warm start) and the "after" part of OUTPUT_DIR/summary.json (the final actor) - and classifies every answer by
the TinyZero score and by the worked steps of its LAST attempt (the text after the last ", not N." of a search
trace, see step3_rlhf/warm_start.py):

- right: the answer scores 1.0;
- no_answer: no gradable answer (no answer tags: cut at --max_answer_seq_len or looping);
- false_step: the last attempt has a step "a op b = c" that is false (the model makes a result up);
- no_step: the last attempt writes no step at all - after a try it marked "not N" the model claims it "reaches" the
  target anyway and answers with a rejected equation;
- true_steps_miss: every step of the last attempt is true, but its result is not the target;
- other: the steps are true and reach the target, yet the answer scores below 1.0.

    python bench/countdown_failures.py /tmp/cd1/search1 /tmp/cd2/t07 --out bench/results/countdown_failures.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from step3_rlhf.tasks.countdown import _STEP, countdown_reward, step_result  # noqa: E402

CLASSES = ("right", "no_answer", "false_step", "no_step", "true_steps_miss", "other")
# the task line of the countdown prompt (step3_rlhf/tasks/countdown.py)
_TASK = re.compile(r"Using the numbers \[([\d, ]+)\], create an equation that equals (\d+)")
_FAILED_TRY_END = re.compile(r", not \d+\.")


def task_of(prompt: str) -> tuple[list[int], int]:
    m = _TASK.search(prompt)
    if m is None:
        raise ValueError(f"not a Countdown prompt: {prompt[-200:]!r}")
    return [int(x) for x in m[1].split(",")], int(m[2])


def classify(response: str, nums: list[int], target: int) -> str:
    """One of CLASSES for one answer (see the module docstring)."""
    score = countdown_reward(response, target, nums)
    if score == 1.0:
        return "right"
    if score == 0.0:
        return "no_answer"
    think = response.split("</think>")[0]
    tries = _FAILED_TRY_END.split(think)
    steps = list(_STEP.finditer(tries[-1]))
    if any(step_result(m) != int(m[4]) for m in steps):  # a division by zero (None) is false too
        return "false_step"
    if not steps:
        return "no_step"
    if int(steps[-1][4]) != target:
        return "true_steps_miss"
    return "other"


def summarize(samples: list[dict]) -> dict:
    counts = dict.fromkeys(CLASSES, 0)
    examples = {}
    for s in samples:
        nums, target = task_of(s["prompt"])
        c = classify(s["response"], nums, target)
        counts[c] += 1
        examples.setdefault(c, s["response"].strip()[:300])
    n = len(samples)
    return {"n": n, "counts": counts, "shares": {c: round(k / n, 3) for c, k in counts.items()},
            "first_example": examples}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="step-3 output dirs (eval_before.json, summary.json)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    report = {"what": "greedy held-out Countdown answers by failure class (bench/countdown_failures.py)", "runs": {}}
    for run in a.runs:
        entry = {}
        before = os.path.join(run, "eval_before.json")
        if os.path.isfile(before):
            with open(before) as f:
                entry["before_rl"] = summarize(json.load(f)["samples"])
        summary = os.path.join(run, "summary.json")
        if os.path.isfile(summary):
            with open(summary) as f:
                entry["after_rl"] = summarize(json.load(f)["after"]["samples"])
        if not entry:
            raise SystemExit(f"{run}: neither eval_before.json nor summary.json")
        report["runs"][run] = entry
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
