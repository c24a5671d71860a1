"""Matmul-rate probe: the FLOP rate a 2048x2048 x 2048x2048 matmul reaches here, per dtype, on N threads.

It is the ceiling the step-3 bench compares its training FLOP rate with. Prints one JSON line
{"fp32": GFLOP/s, "bf16": GFLOP/s, ...}; the best of several timed repeats (the machine may be shared).
"""
import argparse
import json
import time

import torch


def matmul_gflops(dtype, n=2048, repeats=5, inner=4):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up (oneDNN picks its kernel here)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - t) / inner)
    return 2 * n ** 3 / best / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=2048)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = {"name": "matmul_rate", "n": a.n, "threads": a.threads}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[name] = round(matmul_gflops(dt, a.n), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
