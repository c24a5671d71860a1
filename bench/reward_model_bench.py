"""Reward-model bench: our step 2 against TRL's RewardTrainer on the same hh-rlhf split and budget.

    flock /tmp/bench.lock python bench/reward_model_bench.py            # 1200 train / 300 eval pairs
    python bench/reward_model_bench.py --n_train 400 --eval_on dev       # tuning: never looks at the test pairs

The rows of preference/hh_harmless_base_1500.jsonl (rows with an empty reply dropped first, as step 2
would) are shuffled with a fixed seed: the first --n_train form the training pool and the next --n_eval the
test pairs. `--eval_on dev` instead scores the last --n_dev rows of the training pool (and trains on the
first --n_train of what is left), so settings can be chosen without touching the test pairs.

Both trainers see identical token sequences: the split is written as a directory with train.jsonl and
test.jsonl that step 2 reads as a source with its own eval split (`--data_split 0,10,0`: every train row
goes to step 2), and the TRL worker tokenises the same files with step 2's own PairDataset (chat template,
truncation) and hands TRL the token ids. Each side is scored its own way (ours: the value at the last
non-pad token; TRL: the HF sequence-classification head), per pair, then a bootstrap gives the 95% CI.

TRL is a bench-only dependency, installed outside site-packages so pip never touches torch:
    pip install --no-deps --target /tmp/trl_rm trl==1.16.0
(its other requirements - accelerate, datasets, pandas, pyarrow ... - are already installed here).
Each trainer runs in its own subprocess, so its peak RSS is its own (os.wait4).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_FILE = os.path.join("preference", "hh_harmless_base_1500.jsonl")
POOL = 1200  # the training pool; the test pairs are the shuffled rows after it (298 of the 1498 usable)


# ---------------------------------------------------------------- split and statistics (pure)


def usable(row: dict) -> bool:
    """Rows step 2 would keep: non-empty prompt and replies, and two different replies."""
    fields = [row.get(k) for k in ("prompt", "chosen", "rejected")]
    return all(isinstance(v, str) and v.strip() for v in fields) and row["chosen"].strip() != row["rejected"].strip()


def split_rows(rows: list, n_train: int, n_eval: int, seed: int, eval_on: str = "test", n_dev: int = 200):
    """(train, eval) rows. The seeded shuffle puts the training pool (POOL rows) first and the test pairs
    after it, whatever n_train is; eval_on="dev" carves n_dev pairs off the END of the pool instead (never the test ones)."""
    order = np.random.RandomState(seed).permutation(len(rows)).tolist()
    pool, test = order[:POOL], order[POOL:POOL + n_eval]
    if eval_on == "dev":
        pool, test = pool[:len(pool) - n_dev], pool[len(pool) - n_dev:]
    if n_train > len(pool):
        raise SystemExit(f"--n_train {n_train} is more than the {len(pool)} training rows available")
    return [rows[i] for i in pool[:n_train]], [rows[i] for i in test]


def bootstrap_ci(correct, n_boot: int = 10000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap CI of the mean of a 0/1 vector (pairs resampled with replacement)."""
    correct = np.asarray(correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(n_boot, len(correct)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def score_summary(chosen, rejected) -> dict:
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    correct = chosen > rejected  # a tie counts as wrong
    return {"accuracy": round(float(correct.mean()), 4), "accuracy_ci95": [round(x, 4) for x in bootstrap_ci(correct)],
            "chosen_score": round(float(chosen.mean()), 4), "rejected_score": round(float(rejected.mean()), 4),
            "n_pairs": int(len(correct))}


def paired_diff_ci(ours_correct, trl_correct, n_boot: int = 10000, seed: int = 0):
    """95% CI of accuracy(ours) - accuracy(TRL), resampling the same pairs for both."""
    diff = np.asarray(ours_correct, dtype=np.float64) - np.asarray(trl_correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


# ---------------------------------------------------------------- running the two trainers


def read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, rows: list) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def run_measured(cmd: list, log_path: str, env=None) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS in MiB) of one subprocess; its output goes to log_path."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024.0  # ru_maxrss is KiB on Linux


def scores_of(path: str) -> tuple[list, list]:
    rows = sorted(read_jsonl(path), key=lambda r: r["index"])
    return [r["chosen"] for r in rows], [r["rejected"] for r in rows]


def run_ours(args, split_dir: str, out: str) -> dict:
    out_dir = os.path.join(out, "ours")
    scores = os.path.join(out, "ours_scores.jsonl")
    cmd = [sys.executable, os.path.join(REPO, "step2_reward_model", "main.py"),
           "--model_name_or_path", args.model, "--data_path", split_dir, "--data_split", "0,10,0",
           "--output_dir", out_dir, "--data_output_path", os.path.join(out, "cache"),
           "--max_seq_len", str(args.max_seq_len), "--per_device_train_batch_size", str(args.batch_size),
           "--per_device_eval_batch_size", str(args.batch_size), "--num_train_epochs", "1",
           "--dtype", args.dtype, "--seed", str(args.seed), "--eval_scores_path", scores,
           "--no-compare_before", "--disable_progress_bar", "--no_resume"] + shlex.split(args.ours_args)
    return finish("ours", cmd, os.path.join(out, "ours.log"), scores,
                  lambda: json.load(open(os.path.join(out_dir, "summary.json")))["train_seconds"])


def run_trl(args, split_dir: str, out: str) -> dict:
    spec = {"split_dir": split_dir, "model": args.model, "out": os.path.join(out, "trl"), "seed": args.seed,
            "max_seq_len": args.max_seq_len, "batch_size": args.batch_size, "lr": args.trl_lr,
            "dtype": args.dtype, "scores": os.path.join(out, "trl_scores.jsonl"), "extra": args.trl_args}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.trl_path, REPO, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--trl_worker", json.dumps(spec)]
    return finish("trl", cmd, os.path.join(out, "trl.log"), spec["scores"],
                  lambda: json.load(open(os.path.join(spec["out"], "timing.json")))["train_seconds"], env)


def finish(name, cmd, log_path, scores_path, train_seconds, env=None) -> dict:
    print(f"[bench] {name}: {' '.join(shlex.quote(c) for c in cmd)}", file=sys.stderr, flush=True)
    code, wall, rss = run_measured(cmd, log_path, env)
    if code != 0:
        tail = open(log_path).read()[-3000:]
        raise SystemExit(f"[bench] {name} failed (exit {code}); last output of {log_path}:\n{tail}")
    chosen, rejected = scores_of(scores_path)
    result = score_summary(chosen, rejected)
    result.update(train_seconds=round(float(train_seconds()), 1), wall_seconds=round(wall, 1),
                  peak_rss_mib=round(rss, 1))
    result["_correct"] = (np.asarray(chosen) > np.asarray(rejected)).tolist()
    print(f"[bench] {name}: accuracy {result['accuracy']} in {result['train_seconds']} s", file=sys.stderr,
          flush=True)
    return result


def side_from(side: str, out: str) -> dict:
    """One side's result as an earlier run of the same split left it in `out`: its per-pair scores, its training
    seconds and, when that run finished, the wall time and peak RSS its report.json recorded."""
    chosen, rejected = scores_of(os.path.join(out, f"{side}_scores.jsonl"))
    result = score_summary(chosen, rejected)
    timing = os.path.join(out, "ours", "summary.json") if side == "ours" else os.path.join(out, "trl", "timing.json")
    earlier = {}
    if os.path.exists(os.path.join(out, "report.json")):
        earlier = json.load(open(os.path.join(out, "report.json"))).get(side, {})
    result.update(train_seconds=json.load(open(timing))["train_seconds"], wall_seconds=earlier.get("wall_seconds"),
                  peak_rss_mib=earlier.get("peak_rss_mib"), from_run=out)
    result["_correct"] = (np.asarray(chosen) > np.asarray(rejected)).tolist()
    return result


# ---------------------------------------------------------------- the TRL side (runs in its own process)


def trl_worker(spec: dict) -> None:
    """Train with trl.RewardTrainer on step 2's token ids, then score every eval pair with the HF head."""
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from utils.data.datasets import PairDataset
    from utils.data.readers import read_source
    from utils.models import load_tokenizer, resolve_model_path

    model_path = resolve_model_path(spec["model"])
    tokenizer = load_tokenizer(model_path)
    source = read_source(spec["split_dir"], "skip")

    def token_pairs(rows):
        ds = PairDataset(rows, tokenizer, spec["max_seq_len"])
        return {"chosen_ids": ds.data["chosen_input_ids"], "rejected_ids": ds.data["rejected_input_ids"]}

    train_pairs, eval_pairs = token_pairs(source.train.rows), token_pairs(source.eval.rows)
    bf16 = spec["dtype"] == "bf16"
    config = RewardConfig(output_dir=spec["out"], use_cpu=True, bf16=bf16, learning_rate=spec["lr"],
                          per_device_train_batch_size=spec["batch_size"], num_train_epochs=1, seed=spec["seed"],
                          max_length=spec["max_seq_len"], gradient_checkpointing=False, report_to="none",
                          save_strategy="no", eval_strategy="no", logging_steps=10, disable_tqdm=True,
                          model_init_kwargs={"dtype": torch.float32}, **json.loads(spec["extra"] or "{}"))
    trainer = RewardTrainer(model=model_path, args=config, train_dataset=Dataset.from_dict(train_pairs),
                            processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    os.makedirs(spec["out"], exist_ok=True)
    json.dump({"train_seconds": seconds, "train_pairs": len(train_pairs["chosen_ids"])},
              open(os.path.join(spec["out"], "timing.json"), "w"))

    model = trainer.model.eval()
    pad = tokenizer.pad_token_id
    rows = []
    pairs = list(zip(eval_pairs["chosen_ids"], eval_pairs["rejected_ids"]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(pairs), spec["batch_size"]):
            chunk = pairs[start:start + spec["batch_size"]]
            seqs = [c for c, _ in chunk] + [r for _, r in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float().tolist()
            half = len(chunk)
            rows += [{"index": start + i, "chosen": scores[i], "rejected": scores[half + i]} for i in range(half)]
    write_jsonl(spec["scores"], rows)


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data"), help="The shared data folder.")
    p.add_argument("--out", default="/tmp/rm_bench", help="Scratch folder (split files, models, logs).")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--n_train", type=int, default=1200, help="Training pairs (the issue's budget: 1200).")
    p.add_argument("--n_eval", type=int, default=300, help="Test pairs (the issue: the other 300).")
    p.add_argument("--eval_on", choices=["test", "dev"], default="test",
                   help="dev: score on --n_dev pairs held out of the training pool, for choosing settings.")
    p.add_argument("--n_dev", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--trl_lr", type=float, default=5e-5, help="TRL's learning rate (the issue's run: 5e-5).")
    p.add_argument("--trl_path", default="/tmp/trl_rm", help="Where trl was pip-installed with --target.")
    p.add_argument("--ours_args", default="", help="Extra step-2 flags, e.g. '--learning_rate 2e-5'.")
    p.add_argument("--trl_args", default="", help="Extra RewardConfig fields as JSON, e.g. '{\"warmup_steps\": 5}'.")
    p.add_argument("--ours_from", default="", help="Take our side from an earlier run's --out folder (same split).")
    p.add_argument("--trl_from", default="", help="Take TRL's side from an earlier run's --out folder (same split).")
    p.add_argument("--skip", choices=["none", "trl", "ours"], default="none", help="Run only one side.")
    p.add_argument("--trl_worker", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.trl_worker:
        sys.path.insert(0, REPO)
        return trl_worker(json.loads(args.trl_worker))
    started = time.perf_counter()
    rows = [r for r in read_jsonl(os.path.join(args.data, DATA_FILE)) if usable(r)]
    train_rows, eval_rows = split_rows(rows, args.n_train, args.n_eval, args.seed, args.eval_on, args.n_dev)
    split_dir = os.path.join(args.out, f"split_{args.eval_on}_{args.n_train}_{len(eval_rows)}_{args.seed}")
    os.makedirs(split_dir, exist_ok=True)
    write_jsonl(os.path.join(split_dir, "train.jsonl"), train_rows)
    write_jsonl(os.path.join(split_dir, "test.jsonl"), eval_rows)
    report = {"data": os.path.join(args.data, DATA_FILE), "usable_rows": len(rows), "eval_on": args.eval_on,
              "train_pairs": len(train_rows), "eval_pairs": len(eval_rows), "max_seq_len": args.max_seq_len,
              "batch_size": args.batch_size, "epochs": 1, "dtype": args.dtype, "seed": args.seed,
              "ours_args": args.ours_args, "trl_lr": args.trl_lr, "trl_args": args.trl_args}
    if args.ours_from:  # our side from an earlier run of this split (e.g. when the peer's run had to be redone)
        report["ours"] = side_from("ours", args.ours_from)
    elif args.skip != "ours":
        report["ours"] = run_ours(args, split_dir, args.out)
    if args.trl_from:
        report["trl"] = side_from("trl", args.trl_from)
    elif args.skip != "trl":
        report["trl"] = run_trl(args, split_dir, args.out)
    if "ours" in report and "trl" in report:
        ours, trl = report["ours"], report["trl"]
        report["ratio"] = {"accuracy": round(ours["accuracy"] / max(trl["accuracy"], 1e-9), 3),
                           "train_seconds": round(ours["train_seconds"] / max(trl["train_seconds"], 1e-9), 3),
                           "peak_rss": (round(ours["peak_rss_mib"] / max(trl["peak_rss_mib"], 1e-9), 3)
                                        if ours["peak_rss_mib"] and trl["peak_rss_mib"] else None)}
        report["accuracy_diff_ci95"] = paired_diff_ci(ours["_correct"], trl["_correct"])
    for side in ("ours", "trl"):
        report.get(side, {}).pop("_correct", None)
    report["bench_wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
