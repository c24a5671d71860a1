"""What changed in a pipeline run, with numbers: `python -m inference.summary OUTPUT_DIR`.

Reads the `summary.json` each stage writes into OUTPUT_DIR/step1, step2 and step3 (whichever exist).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


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
        from step3_rlhf.evaluate import before_after_table
        hist = s3.get("history") or []
        if hist:
            lines.append(f"step 3 ({s3['algo']}, {s3['steps']} steps{_wall(s3)}): training reward "
                         f"{hist[0]['reward/mean']:.3f} (first step) -> {hist[-1]['reward/mean']:.3f} (last step)")
        lines += ["", before_after_table(s3["before"], s3["after"])]
    return "\n".join(lines) if lines else f"no stage summaries under {out_dir}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output_dir")
    args = p.parse_args(argv)
    if not os.path.isdir(args.output_dir):
        print(f"error: {args.output_dir} does not exist", file=sys.stderr)
        return 2
    print(summarize(args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
