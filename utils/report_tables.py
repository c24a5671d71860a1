"""Plain-text tables of a run's results, shared by the stage that measures them and `inference.summary`."""
from __future__ import annotations

import json
import os

from utils.data.templates import last_user_message

HELDOUT_FILE = "heldout_eval.json"  # inference.heldout's result in the pipeline's output dir


def before_after_table(before, after, n_examples=3, width=60):
    """A plain-text table: mean reward and KL before/after, then answers side by side."""
    def cut(text):
        return _cut(text, width)

    lines = [f"{'':24}{'step-1 actor':>16}{'final actor':>16}",
             f"{'mean reward':24}{before['reward_mean']:>16.4f}{after['reward_mean']:>16.4f}"]
    if "kl_mean" in after:
        lines.append(f"{'mean KL to reference':24}{before.get('kl_mean', 0.0):>16.4f}{after['kl_mean']:>16.4f}")
    if "graded" in before and "graded" in after:  # synthetic prompts: answers right by rule, not by the reward
        cells = [correct_cell({"n": s["graded"], "correct": s["correct"]}) for s in (before, after)]
        lines.append(f"{'correct (by rule)':24}{cells[0]:>16}{cells[1]:>16}")
    lines.append(f"({after['n']} held-out prompts neither model trained on; the first {n_examples} in order)")

    def mark(s):
        return f"{'correct' if s['correct'] else 'wrong'}, " if "correct" in s else ""
    for b, a in list(zip(before["samples"], after["samples"]))[:n_examples]:
        lines += ["", f"prompt : {cut(last_user_message(b['prompt']))}",
                  f"before : {cut(b['response'])}  [{mark(b)}reward {b['score']:.3f}]",
                  f"after  : {cut(a['response'])}  [{mark(a)}reward {a['score']:.3f}]"]
    return "\n".join(lines)


def _cut(text, width):
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def correct_cell(part: dict) -> str:
    """"correct N/M (x%)" of one model's held-out results."""
    n = part["n"]
    return f"{part['correct']}/{n} ({100 * part['correct'] / n:.0f}%)" if n else "0/0"


def correctness_table(result, n_examples=3, width=60):
    """Held-out correctness (inference.heldout's result): per model the answers right by rule and the mean
    reward, then the first `n_examples` prompts in held-out order (a fixed rule, never a pick), each answer
    marked right or wrong."""
    models = result["models"]
    labels = list(models)
    lines = [f"{'':24}" + "".join(f"{label:>16}" for label in labels),
             f"{'correct (by rule)':24}" + "".join(f"{correct_cell(models[k]):>16}" for k in labels)]
    if all(models[k]["reward_mean"] is not None for k in labels):
        lines.append(f"{'mean reward':24}" + "".join(f"{models[k]['reward_mean']:>16.4f}" for k in labels))
        audit = reward_audit(models)
        if audit and audit["wrong_liked"] is not None:
            lines.append(f"{'wrong, yet RM-liked':24}" + "".join(f"{audit['wrong_liked'][k]:>16}" for k in labels))
            lines.append("(RM-liked = scored at least as high as the right answer to the same prompt)")
        if audit:
            lines.append(f"(over all these answers the reward model ranks a right one above a wrong one "
                         f"{audit['right_over_wrong']:.0%} of the time)")
    lines.append(f"({result['prompts']} held-out synthetic prompts no stage trained on, {result['decoding']}; "
                 "correct = checked by rule, not by the reward model)")
    shown = min(n_examples, result["prompts"])
    if shown:
        lines += ["", f"the first {shown} held-out prompts, in order:"]
    for i in range(shown):
        lines += ["", f"{'prompt':8}: {_cut(models[labels[0]]['samples'][i]['prompt'], width)}"]
        for label in labels:
            s = models[label]["samples"][i]
            reward = f", reward {s['score']:.3f}" if "score" in s else ""
            lines.append(f"{label:8}: {_cut(s['response'], width)}  [{'correct' if s['correct'] else 'wrong'}{reward}]")
    return "\n".join(lines)


def reward_audit(models: dict) -> dict | None:
    """How well the reward model tells right from wrong on the held-out answers of every model:
    right_over_wrong = P(a right answer scores above a wrong one), pooled over the models, ties half (the AUC);
    wrong_liked[label] = that model's wrong answers scoring at least the data set's right answer to the same
    prompt (`reference_score`, inference.heldout) - garbage the reward model likes. None without scores or
    without both right and wrong answers; wrong_liked is None without reference scores."""
    samples = [s for part in models.values() for s in part["samples"]]
    if not samples or any("score" not in s for s in samples):
        return None
    right = [s["score"] for s in samples if s["correct"]]
    wrong = [s["score"] for s in samples if not s["correct"]]
    if not right or not wrong:
        return None
    wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    liked = None
    if all("reference_score" in s for s in samples):
        liked = {label: sum(1 for s in part["samples"] if not s["correct"] and s["score"] >= s["reference_score"])
                 for label, part in models.items()}
    return {"right_over_wrong": wins / (len(right) * len(wrong)), "wrong_liked": liked}


def heldout_section(logdir: str) -> list[str]:
    """inference.heldout's table (answers right by rule, base / step 1 / step 3) when the pipeline wrote one."""
    path = os.path.join(logdir, HELDOUT_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    return ["## Held-out answers, checked by rule", "", "```", correctness_table(result, n_examples=5), "```", ""]
