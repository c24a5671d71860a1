"""What changed in a pipeline run, with numbers: `python -m inference.summary OUTPUT_DIR`.

Reads the `summary.json` each stage writes into OUTPUT_DIR/step1, step2 and step3 (whichever exist), and
inference.heldout's OUTPUT_DIR/heldout_eval.json (answers right by rule) when there is one.
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


def summarize(out_dir: str) -> str:
    lines = []
    s1 = _load(os.path.join(out_dir, "step1", "summary.json"))
    if s1 and s1.get("before"):
        b, a = s1["before"], s1["after"]
        lines.append(f"step 1 (SFT, {s1['steps']} steps{_wall(s1)}): held-out eval loss {b['eval/loss']:.4f} -> "
                     f"{a['eval/loss']:.4f}, perplexity {b['eval/perplexity']:.2f} -> {a['eval/perplexity']:.2f} "
                     f"on {s1['eval_sequences']} sequences")
    s2 = _load(os.path.join(out_dir, "step2", "summary.json"))
    if s2 and s2.get("after"):
        a = s2["after"]
        before = s2.get("before") or {}
        ties = f"; ties {before['eval/tie_fraction']:.0%} -> {a['eval/tie_fraction']:.0%}" \
            if "eval/tie_fraction" in before and "eval/tie_fraction" in a else ""
        lines.append(f"step 2 (reward model, {s2['steps']} steps{_wall(s2)}): pairwise accuracy on {s2['eval_pairs']} "
                     f"pairs it never trained on {before.get('eval/accuracy', float('nan')):.3f} -> "
                     f"{a['eval/accuracy']:.3f} (a tie counts half{ties}; mean chosen {a['eval/chosen_score']:.3f}, "
                     f"rejected {a['eval/rejected_score']:.3f})")
    s3 = _load(os.path.join(out_dir, "step3", "summary.json"))
    if s3 and s3.get("after"):
        hist = s3.get("history") or []
        if hist:
            lines.append(f"step 3 ({s3['algo']}, {s3['steps']} steps{_wall(s3)}): training reward "
                         f"{hist[0]['reward/mean']:.3f} (first step) -> {hist[-1]['reward/mean']:.3f} (last step)")
        lines += ["", before_after_table(s3["before"], s3["after"])]
    held = _load(os.path.join(out_dir, HELDOUT_FILE))  # inference.heldout: base / step 1 / step 3, right by rule
    if held and held.get("models"):
        lines += ["", correctness_table(held)]
    return "\n".join(lines) if lines else f"no stage summaries under {out_dir}"


@dataclass
class SummaryConfig:
    output_dir: str = opt("", "The pipeline's output dir (its step1/, step2/, step3/ hold the summaries).",
                          positional=True)


def main(argv=None):
    args = parse_config(SummaryConfig, argv, description=__doc__.splitlines()[0], prog="python -m inference.summary")
    if not os.path.isdir(args.output_dir):
        print(f"error: {args.output_dir} does not exist", file=sys.stderr)
        return 2
    print(summarize(args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
