"""What the peer runners share: their flags, the workload's prompts, step timing, and the one-line JSON they print."""
import argparse
import json
import resource
import time


def peer_args(doc, model_flag, steps, steps_help, output_dir, sizes=()):
    """Parse a TRL runner's flags: --policy, its second checkpoint (`model_flag`: --reward or --value), the
    workload's prompts and sizes (`sizes`: extra (flag, default) ints), then set torch's thread count."""
    import torch
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    for flag in ("--policy", model_flag, "--prompts"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    for flag, default in (*sizes, ("--new_tokens", 64), ("--threads", 2)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--output_dir", default=output_dir)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    return a


def load_prompt_ids(path):
    """The workload's prompts as token-id lists (written by bench/ppo_throughput.py from the product's own
    prompt pipeline, so every contender sees the same tokens)."""
    with open(path) as f:
        return json.load(f)


class StepClock:
    """Wall and CPU seconds between calls of `tick()`; the first interval (the warm-up step) is dropped."""

    def __init__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        self.wall, self.cpu = [], []

    def tick(self):
        t, c = time.perf_counter(), time.process_time()
        self.wall.append(t - self.t)
        self.cpu.append(c - self.c)
        self.t, self.c = t, c

    def timed(self):
        return self.wall[1:], self.cpu[1:]


def report(name, dtype, samples_per_step, new_tokens, wall, cpu, extra=None):
    """Print the runner's result as one JSON line (the parent reads the last line of stdout)."""
    mean = sum(wall) / max(len(wall), 1)
    out = {"name": name, "dtype": dtype, "steps": len(wall), "samples_per_step": samples_per_step,
           "sec_per_step": mean, "step_seconds": wall, "step_cpu_seconds": cpu,
           "samples_per_s": samples_per_step / mean if mean else None,
           "gen_tokens_per_s": samples_per_step * new_tokens / mean if mean else None,
           "peak_rss_gb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    out.update(extra or {})
    print(json.dumps(out), flush=True)
