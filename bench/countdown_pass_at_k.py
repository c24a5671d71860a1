"""How much can RL sharpen a Countdown model? Greedy accuracy against pass@k of sampled answers.

    python bench/countdown_pass_at_k.py --model WARM_START_DIR --tasks VAL.jsonl [--k 8] [--temperature 1.0]

GRPO learns from tasks where some of a prompt's samples are right: it mostly moves probability onto answers the
model can already sample. So the share of held-out tasks solved by at least one of k samples (pass@k, at the
rollout temperature) bounds what a short RL run can add to greedy accuracy; a task no sample solves gives GRPO no
signal at all. Prompts are rendered as step 3 renders them; answers are scored by the TinyZero rule (1.0 = right).
Prints JSON: greedy accuracy, pass@1 (the mean sample accuracy) ... pass@k (unbiased estimator), the share of
tasks greedy gets wrong but some sample gets right (what sharpening could add to greedy accuracy), format rate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from math import comb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.report import print_report  # noqa: E402


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task from n samples with c right (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks", required=True, help="Countdown JSONL ({target, nums}), e.g. a validation slice.")
    parser.add_argument("--k", type=int, default=8, help="Samples per task (the GRPO group size).")
    parser.add_argument("--temperature", type=float, default=1.0, help="Step 3's rollout temperature.")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per generate call.")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    import torch
    from step3_rlhf.prompt_data import _tokenize_task
    from step3_rlhf.rollout import eos_ids
    from step3_rlhf.tasks.countdown import countdown_prompt, countdown_reward, load_countdown_jsonl
    from step3_rlhf.tasks.format import format_reward
    from utils.data.datasets import collate_left_padded_prompts
    from utils.models import load_causal_lm, load_tokenizer, resolve_dtype

    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.model)
    lm = load_causal_lm(args.model, dtype=resolve_dtype("auto")).eval()
    tasks = load_countdown_jsonl(args.tasks)
    items = [_tokenize_task(tok, countdown_prompt(t, style="chat"), 10 ** 9) for t in tasks]
    stop = eos_ids(tok, lm)

    def answers(chunk, sample: bool) -> list[str]:
        batch = collate_left_padded_prompts([{"prompt_input_ids": c["prompt_input_ids"]} for c in chunk],
                                            tok.pad_token_id)
        extra = dict(do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0,
                     num_return_sequences=args.k) if sample else dict(do_sample=False)
        with torch.no_grad():
            seq = lm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=stop,
                              **extra)
        return [tok.decode(row, skip_special_tokens=True) for row in seq[:, batch["input_ids"].shape[1]:]]

    def right(text, item) -> bool:
        return countdown_reward(text, item["meta"]["target"], item["meta"]["nums"]) == 1.0

    start = time.time()
    greedy, right_counts, formatted = [], [], 0
    for i in range(0, len(items), args.batch_size):
        chunk = items[i:i + args.batch_size]
        greedy += [right(text, item) for text, item in zip(answers(chunk, False), chunk)]
        sampled = answers(chunk, True)  # k per prompt, in prompt order
        for j, item in enumerate(chunk):
            texts = sampled[j * args.k:(j + 1) * args.k]
            right_counts.append(sum(right(t, item) for t in texts))
            formatted += sum(format_reward(t) == 1.0 for t in texts)
        print(f"[pass@k] {len(right_counts)}/{len(items)} tasks, {time.time() - start:.0f} s", file=sys.stderr,
              flush=True)
    n = len(items)
    result = {"model": args.model, "tasks": args.tasks, "n_tasks": n, "k": args.k, "temperature": args.temperature,
              "max_new_tokens": args.max_new_tokens, "greedy_accuracy": sum(greedy) / n,
              "pass_at": {str(k): sum(pass_at_k(args.k, c, k) for c in right_counts) / n
                          for k in sorted({1, 2, 4, args.k}) if k <= args.k},
              "tasks_no_sample_solves": sum(c == 0 for c in right_counts) / n,
              # what greedy accuracy could still gain by sharpening: greedy wrong, yet some sample right
              "greedy_wrong_some_sample_right": sum(not g and c > 0 for g, c in zip(greedy, right_counts)) / n,
              "tasks_every_sample_solves": sum(c == args.k for c in right_counts) / n,
              "sample_format_rate": formatted / (n * args.k), "seconds": round(time.time() - start, 1),
              "greedy_right_per_task": [int(g) for g in greedy], "samples_right_per_task": right_counts}
    print_report(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
