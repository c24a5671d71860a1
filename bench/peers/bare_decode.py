"""Bare decode loop: plain PyTorch sampling with a KV cache, nothing else - the floor a generator is judged by.

Same model, dtype and batch as workload W: left-padded prompts, prefill once, then one token per forward with
the model's own DynamicCache, softmax sampling at T=1, no stopping criteria, no logits processors.
Prints one JSON line: {"seconds": [...per repeat], "tokens": B * new_tokens, ...}.

    python bench/peers/bare_decode.py --model DIR --prompts prompts.json --dtype bf16 --threads 2
"""
import argparse
import json
import resource
import time

import torch

from utils.hf_compat import cache_kwargs  # the KV-cache keyword of the installed transformers


@torch.no_grad()
def bare_decode(model, ids, mask, new_tokens):
    """Prefill then `new_tokens` single-token steps; returns the [B, new_tokens] sampled ids."""
    from transformers import DynamicCache
    cache = DynamicCache()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache), use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    out = []
    for t in range(new_tokens):
        tok = torch.multinomial(torch.softmax(logits.float(), -1), 1)
        out.append(tok)
        if t == new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        pos = pos[:, -1:] + 1
        logits = model(input_ids=tok, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache),
                       use_cache=True).logits[:, -1]
    return torch.cat(out, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists (the workload's prompts)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, default=3, help="timed batches (after one warm-up batch)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval()
    prompts = json.load(open(a.prompts))
    seconds, cpu = [], []
    for b in range(a.batches + 1):
        rows = prompts[b * a.batch:(b + 1) * a.batch]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        t, c = time.perf_counter(), time.process_time()
        bare_decode(model, ids, mask, a.new_tokens)
        if b:  # batch 0 warms up
            seconds.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    print(json.dumps({"name": "bare_decode", "dtype": a.dtype, "batch": a.batch, "new_tokens": a.new_tokens,
                      "seconds": seconds, "cpu_seconds": cpu, "sec_per_batch": min(seconds),
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))


if __name__ == "__main__":
    main()
