"""Can a reward model check arithmetic? Right against near-miss answers to sums, differences and products.

    python bench/reward_arithmetic_probe.py --reward_model output/demo/step2 [more reward models] [--out R.json]

The demo's reward model likes some wrong answers in the right form ("17 x 14 = 224." over "= 238."; #15). This
scores --n pairs of the synthetic arithmetic task - the right answer against one off by 1, 2, 10 or 9/11 (a carry),
or, for a product, by one of its factors (a row off, as 224 = 16 x 14) - on prompts that are NOT in the demo's
synthetic set (utils.data.synthetic, 2000 rows, seed 1234), so no stage trained on them. Prints JSON: per reward
model, the pairwise accuracy (a tie counts half) with its bootstrap 95% CI, overall and per operation; 0.5 is chance.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.report import print_report  # noqa: E402
from inference.common import load_for_inference, quiet_transformers, score_items  # noqa: E402
from inference.score import pairwise_summary  # noqa: E402
from utils.data.synthetic import (ARITHMETIC_SIGNS, arithmetic_texts, arithmetic_value,  # noqa: E402
                                  make_synthetic_preferences)


def probe_pairs(n: int, seed: int, avoid: set) -> list[dict]:
    """n (op, prompt, right, wrong) dicts with unique prompts outside `avoid`, in the synthetic task's wording."""
    rng, pairs, seen = random.Random(seed), [], set(avoid)
    while len(pairs) < n:
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 19), rng.randint(2, 19)) if op == "*" else (rng.randint(2, 99), rng.randint(2, 99))
        if op == "-" and b > a:
            a, b = b, a
        value = arithmetic_value(a, op, b)
        prompt, right = arithmetic_texts(a, op, b, value)
        if prompt in seen:
            continue
        seen.add(prompt)
        wrong = value + rng.choice((-10, -2, -1, 1, 2, 10) + ((a, -a, b, -b) if op == "*" else (9, -9, 11, -11)))
        pairs.append({"op": op, "prompt": prompt, "right": right, "wrong": arithmetic_texts(a, op, b, wrong)[1]})
    return pairs


def probe(reward_model: str, pairs: list[dict], dtype: str) -> dict:
    model, tokenizer = load_for_inference(reward_model, kind="value", dtype=dtype)
    items = [([{"role": "user", "content": p["prompt"]}], reply) for p in pairs for reply in (p["right"], p["wrong"])]
    scores, _ = score_items(model, tokenizer, items)
    right, wrong = scores[0::2], scores[1::2]
    out = {"all": pairwise_summary(right, wrong)}
    for op in "+-*":
        idx = [i for i, p in enumerate(pairs) if p["op"] == op]
        out[ARITHMETIC_SIGNS[op]] = pairwise_summary([right[i] for i in idx], [wrong[i] for i in idx])
    return {name: {k: part[k] for k in ("n_pairs", "accuracy", "ci95", "mean_margin")} for name, part in out.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reward_model", nargs="+", required=True, help="Step-2 output dirs.")
    parser.add_argument("--labels", nargs="*", default=[], help="A name for each reward model (default: its path).")
    parser.add_argument("--n", type=int, default=200, help="Pairs (unique prompts).")
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--out", default="", help="Also write the JSON here.")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.reward_model):
        parser.error(f"--labels: {len(args.labels)} names for {len(args.reward_model)} reward models")
    quiet_transformers()
    demo_prompts = {row.prompt[-1]["content"] for row in make_synthetic_preferences(2000, seed=1234)}
    pairs = probe_pairs(args.n, args.seed, demo_prompts)
    result = {"pairs": len(pairs), "seed": args.seed, "chance": 0.5,
              "reward_models": {label: {"path": path, **probe(path, pairs, args.dtype)}
                                for label, path in zip(args.labels or args.reward_model, args.reward_model)}}
    print_report(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
