"""What changed in a pipeline run, with numbers: `python -m inference.summary OUTPUT_DIR`.

Reads the `summary.json` each stage writes into OUTPUT_DIR/step1, step2, step2_dpo (e2e_rlhf.py --step2-algo dpo)
and step3 (whichever exist), and inference.heldout's OUTPUT_DIR/heldout_eval.json (answers right by rule) when
there is one.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from utils.options import opt, parse_config
from utils.report_tables import HELDOUT_FILE, before_after_table, correctness_table


def _load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _wall(summary) -> str:
    seconds = summary.get("wall_seconds")
    return f", {seconds:.0f} s wall" if seconds is not None else ""


def _step1(s1) -> list[str]:
    if not (s1 and s1.get("before")):
        return []
    b, a = s1["before"], s1["after"]
    return [f"step 1 (SFT, {s1['steps']} steps{_wall(s1)}): held-out eval loss {b['eval/loss']:.4f} -> "
            f"{a['eval/loss']:.4f}, perplexity {b['eval/perplexity']:.2f} -> {a['eval/perplexity']:.2f} "
            f"on {s1['eval_sequences']} sequences"]


def _ties(before, after) -> str:
    return f"; ties {before['eval/tie_fraction']:.0%} -> {after['eval/tie_fraction']:.0%}" \
        if "eval/tie_fraction" in before and "eval/tie_fraction" in after else ""


def _step2(s2) -> list[str]:
    if not (s2 and s2.get("after")):
        return []
    a, before = s2["after"], s2.get("before") or {}
    return [f"step 2 (reward model, {s2['steps']} steps{_wall(s2)}): pairwise accuracy on {s2['eval_pairs']} "
            f"pairs it never trained on {before.get('eval/accuracy', float('nan')):.3f} -> "
            f"{a['eval/accuracy']:.3f} (a tie counts half{_ties(before, a)}; mean chosen {a['eval/chosen_score']:.3f}, "
            f"rejected {a['eval/rejected_score']:.3f})"]


def _dpo(sd) -> list[str]:
    """step2_dpo's held-out figures: implicit rewards beta x (log pi - log pi_ref) of the chosen and rejected
    replies, their margin, the accuracy (chosen's above rejected's) and the DPO loss, before -> after."""
    if not (sd and sd.get("after")):
        return []
    a, b = sd["after"], sd.get("before") or {}
    nan = float("nan")  # a run with --compare_before false has no "before"

    def change(key, spec):
        return f"{b.get(key, nan):{spec}} -> {a[key]:{spec}}"
    return [f"step 2 (DPO, {sd['steps']} steps{_wall(sd)}): implicit-reward accuracy on {sd['eval_pairs']} pairs it "
            f"never trained on {change('eval/accuracy', '.3f')} (a tie counts half{_ties(b, a)}), margin "
            f"{change('eval/margin', '.3f')} (mean chosen {a['eval/rewards/chosen']:.3f}, rejected "
            f"{a['eval/rewards/rejected']:.3f}), DPO loss {change('eval/loss', '.4f')}"]


def _step3(s3) -> list[str]:
    if not (s3 and s3.get("after")):
        return []
    hist, lines = s3.get("history") or [], []
    if hist:
        lines.append(f"step 3 ({s3['algo']}, {s3['steps']} steps{_wall(s3)}): training reward "
                     f"{hist[0]['reward/mean']:.3f} (first step) -> {hist[-1]['reward/mean']:.3f} (last step)")
    return lines + ["", before_after_table(s3["before"], s3["after"])]


def summarize(out_dir: str) -> str:
    def load(run):
        return _load(os.path.join(out_dir, run, "summary.json"))
    lines = _step1(load("step1")) + _step2(load("step2")) + _dpo(load("step2_dpo")) + _step3(load("step3"))
    held = _load(os.path.join(out_dir, HELDOUT_FILE))  # inference.heldout: base / step 1 / step 3, right by rule
    if held and held.get("models"):
        lines += ["", correctness_table(held)]
    return "\n".join(lines) if lines else f"no stage summaries under {out_dir}"


@dataclass
class SummaryConfig:
    output_dir: str = opt("", "The pipeline's output dir (its step1/, step2/, step2_dpo/, step3/ hold the "
                             "summaries).", positional=True)


def main(argv=None):
    args = parse_config(SummaryConfig, argv, description=__doc__.splitlines()[0], prog="python -m inference.summary")
    if not os.path.isdir(args.output_dir):
        print(f"error: {args.output_dir} does not exist", file=sys.stderr)
        return 2
    print(summarize(args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
