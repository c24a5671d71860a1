"""Step 3's algorithms side by side on one Countdown workload, each for the same RL wall time.

    python bench/countdown_algorithms.py [--budget_s 480] [--algos ppo,grpo,rloo,reinforce,reinforce_pp]
    python bench/countdown_algorithms.py --heldout val --runs "lr1e-5=grpo --actor_learning_rate 1e-5" ...

One step-1 warm start (SmolLM2-135M-Instruct on the project's own solver's solutions, as
bench/countdown_r1.py makes it; --warm_start DIR reuses one), then for each run a step-3 process from it with
the same prompts (3-number training tasks no warm-start row used), 4 prompts x 8 samples per step, the
Countdown rule + format reward, the same learning rate and KL weight, and `--max_train_seconds BUDGET`: the
run stops after the step during which BUDGET seconds of rollouts + updates have passed (its evaluations are
not counted). Held-out accuracy (greedy, 128 new tokens, the TinyZero score is 1) on --n_heldout tasks is
taken before, every --eval_interval steps and after - the curve; the last point is the result.
--heldout test scores the shared test tasks; --heldout val a validation slice carved off the END of the
training tasks (disjoint from the warm-start and RL prompts), for choosing a recipe without looking at the
test tasks; `--heldout val --test_after N` then scores the warm start and each final actor once on N shared
test tasks, with each run's paired gain. Each run is a child process, so its peak RSS is its own (os.wait4).
Prints one JSON object and writes it with a PNG of the training reward and held-out accuracy curves to --out
(default bench/results).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a busy 2-core box is ~50x slower with spinning OpenMP threads
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from bench.countdown_r1 import child, run_child  # noqa: E402  (a child process: its seconds and peak RSS)
from bench.reward_model_bench import bootstrap_ci  # noqa: E402

STEP1, STEP3 = os.path.join(REPO, "step1_sft", "main.py"), os.path.join(REPO, "step3_rlhf", "main.py")
ALGOS = "ppo,grpo,rloo,reinforce,reinforce_pp"


# ---------------------------------------------------------------- data
def prepare(args, work):
    """JSONL files: warm-start rows (train tasks), RL prompts (the next train tasks), held-out tasks (the
    shared test tasks, or a validation slice off the end of the train tasks). All 3-number tasks."""
    from step3_rlhf.tasks.countdown import load_countdown_jsonl
    from step3_rlhf.warm_start import countdown_rows, write_jsonl
    data = os.path.join(args.data_dir, "countdown")
    keep3 = lambda rows: [r for r in rows if len(r["nums"]) == 3]  # noqa: E731
    train = keep3(load_countdown_jsonl(os.path.join(data, "train.jsonl")))
    if args.sft_rows + args.rl_rows + args.n_val > len(train):
        raise SystemExit(f"--sft_rows + --rl_rows + --n_val exceed the {len(train)} 3-number training tasks")
    sft, rl, val = train[:args.sft_rows], train[args.sft_rows:args.sft_rows + args.rl_rows], train[-args.n_val:]
    heldout = val if args.heldout == "val" else keep3(load_countdown_jsonl(os.path.join(data, "test.jsonl")))
    paths = {name: os.path.join(work, f"{name}.jsonl") for name in ("sft", "rl", "heldout")}
    write_jsonl(countdown_rows(sft, trace=args.warm_trace, max_tries=args.max_tries), paths["sft"])
    write_jsonl(rl, paths["rl"])
    write_jsonl(heldout[:args.n_heldout], paths["heldout"])
    return paths


def warm_start(args, paths, work):
    """The step-1 model every run starts from: --warm_start, or made here (seconds it took, or None)."""
    if args.warm_start:
        return args.warm_start, None
    out = os.path.join(work, "sft")
    cmd = [sys.executable, STEP1, "--model_name_or_path", args.model, "--data_path", paths["sft"], "--data_split",
           "1,0,0", "--max_seq_len", "320", "--per_device_train_batch_size", "8", "--learning_rate", "1e-4",
           "--lr_scheduler_type", "cosine", "--num_warmup_steps", "5", "--max_steps", str(args.sft_steps),
           "--max_eval_samples", "64", "--no-compare_before", "--dtype", "auto", "--threads", str(args.threads),
           "--disable_progress_bar", "--output_dir", out, "--no_resume"]
    seconds, _ = run_child(cmd, os.path.join(work, "sft.log"))
    return out, seconds


# ---------------------------------------------------------------- one run
def runs_of(args):
    """[(label, algo, extra flags)]: --runs "LABEL=ALGO flags..." entries, else one per --algos name."""
    if args.runs:
        out = []
        for spec in args.runs:
            label, _, rest = spec.partition("=")
            words = shlex.split(rest)
            if not label or not words:
                raise SystemExit(f"--runs {spec!r}: expected LABEL=ALGO [flags]")
            out.append((label, words[0], words[1:]))
        return out
    return [(a, a, []) for a in args.algos.split(",")]


def rl_command(args, actor, paths, out, algo, extra):
    kl = ["--kl_ctl", str(args.kl)] if algo in ("ppo", "reinforce_pp") else ["--beta", str(args.kl)]
    return [sys.executable, STEP3, "--actor_model_name_or_path", actor, "--algo", algo, "--task", "countdown",
            "--data_path", paths["rl"], paths["heldout"], "--reward", "countdown", "format=0.5",
            "--max_prompt_seq_len", "256", "--max_answer_seq_len", "128", "--num_generations", "8",
            "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "16",
            "--actor_learning_rate", str(args.lr), "--critic_learning_rate", str(args.lr), *kl,
            "--lr_scheduler_type", "constant", "--max_steps", "100000", "--max_train_seconds", str(args.budget_s),
            "--eval_prompts", str(args.n_heldout), "--eval_interval", str(args.eval_interval),
            "--eval_temperature", "0", "--per_device_eval_batch_size", str(args.eval_batch), "--seed", str(args.seed),
            "--dtype", "auto", "--threads", str(args.threads), "--disable_progress_bar", "--no_resume",
            "--output_dir", out, *extra]


def run_one(args, actor, paths, work, label, algo, extra):
    """One algorithm's run: its curves, throughput, peak RSS and held-out figures. A finished run's result
    (WORK/LABEL.result.json) is reused, so an interrupted bench resumes at the run it was in. Every run starts
    from the same warm start and evaluates greedily, so the before-RL evaluation is the same for all: the first
    run's eval_before.json is handed to the others (step 3 reads it instead of evaluating again)."""
    done = os.path.join(work, f"{label}.result.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    out = os.path.join(work, label)
    shutil.rmtree(out, ignore_errors=True)
    cmd = rl_command(args, actor, paths, out, algo, extra)
    shared_before = os.path.join(work, "eval_before.json")
    if os.path.isfile(shared_before):
        os.makedirs(out)
        shutil.copy(shared_before, os.path.join(out, "eval_before.json"))
        cmd.remove("--no_resume")  # a fresh directory: no checkpoint to resume, only the evaluation to read
    seconds, rss = run_child(cmd, os.path.join(work, f"{label}.log"))
    if not os.path.isfile(shared_before):
        shutil.copy(os.path.join(out, "eval_before.json"), shared_before)
    result = summarize_run(out, algo, extra, seconds, rss)
    with open(done, "w") as f:
        json.dump(result, f, indent=1)
    return result


def summarize_run(out, algo, extra, seconds, rss):
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    history, before, after = summary["history"], summary["before"], summary["after"]
    step_seconds = [sum(v for k, v in h.items() if k.startswith("time/")) for h in history]
    # sampled sequences: prompts x 8 a step (4 unless the run's flags say otherwise), as many again per
    # --dynamic_sampling refill round; the last of repeated flags wins, as in step 3's parser
    prompts = ([4] + [int(v) for k, v in zip(extra, extra[1:]) if k == "--per_device_generation_batch_size"])[-1]
    samples = sum(prompts * 8 * (1 + h.get("dynamic_sampling/refill_rounds", 0)) for h in history)
    r4 = lambda x: None if x is None else round(float(x), 4)  # noqa: E731  (float32 noise off the shares)
    curve = [(0, r4(before["full_marks"]["countdown"]))]
    curve += [(i + 1, r4(h["eval/countdown_full"])) for i, h in enumerate(history) if "eval/countdown_full" in h]
    curve.append((len(history), r4(after["full_marks"]["countdown"])))
    return {"algo": algo, "flags": extra, "steps": len(history), "rl_seconds": round(sum(step_seconds), 1),
            "process_seconds": seconds, "peak_rss_mb": rss,
            "samples_per_second": round(samples / sum(step_seconds), 3),  # sampled and trained on
            "heldout_accuracy_before": curve[0][1], "heldout_accuracy": curve[-1][1],
            "heldout_format_rate": r4(after["full_marks"]["format"]), "heldout_accuracy_curve": curve,
            "kl_last": r4(history[-1].get("kl/mean")),
            "train_reward_curve": [round(h["reward/mean"], 4) for h in history],
            "train_countdown_curve": [round(h.get("reward/countdown", 0.0), 4) for h in history],
            "samples": [s for s in after["samples"][:3]]}


# ---------------------------------------------------------------- picture
def plot(report, path):
    """Training reward per step and held-out accuracy against RL seconds, one line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, run in report["runs"].items():
        if "failed" in run:
            continue
        per_step = run["rl_seconds"] / max(run["steps"], 1)
        rewards = run["train_reward_curve"]
        left.plot([per_step * (i + 1) for i in range(len(rewards))], rewards, marker=".", label=label)
        xs, ys = zip(*run["heldout_accuracy_curve"])
        right.plot([per_step * x for x in xs], ys, marker="o", label=label)
    left.set(title="training reward (countdown + 0.5 x format)", xlabel="RL seconds", ylabel="mean reward")
    right.set(title=f"held-out accuracy ({report['heldout']}, n={report['n_heldout']}, greedy)",
              xlabel="RL seconds", ylabel="accuracy")
    right.legend(fontsize=8)
    fig.suptitle(f"same {report['budget_s']:g} s of RL each from one warm start ({report['model']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(REPO), "shared", "data"),
                   help="Holds countdown/train.jsonl and countdown/test.jsonl.")
    p.add_argument("--work_dir", default="/tmp/countdown_algorithms")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"), help="Where the JSON and PNG go.")
    p.add_argument("--name", default="countdown_algorithms", help="File name of the JSON and PNG.")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--warm_start", default="", help="A step-1 warm-start model to reuse (else made here).")
    p.add_argument("--sft_steps", type=int, default=100)
    p.add_argument("--sft_rows", type=int, default=2000, help="Warm-start rows (the first train tasks).")
    p.add_argument("--warm_trace", choices=["direct", "search"], default="direct",
                   help="Warm-start solutions: direct steps, or failed attempts first (warm_start.py --trace).")
    p.add_argument("--max_tries", type=int, default=2, help="--warm_trace search: at most this many failed "
                   "attempts before the solution (2 makes 29%% of 3-number traces longer than 128 tokens; 1 none).")
    p.add_argument("--rl_rows", type=int, default=1000, help="RL prompts (the train tasks after them).")
    p.add_argument("--n_val", type=int, default=200, help="Validation slice: the last train tasks.")
    p.add_argument("--heldout", choices=["test", "val"], default="test")
    p.add_argument("--n_heldout", type=int, default=200, help="Held-out tasks scored for the curve.")
    p.add_argument("--eval_interval", type=int, default=5, help="Steps between held-out evaluations.")
    p.add_argument("--eval_batch", type=int, default=50)
    p.add_argument("--algos", default=ALGOS)
    p.add_argument("--runs", nargs="*", default=[], help='"LABEL=ALGO [step-3 flags]" runs instead of --algos.')
    p.add_argument("--budget_s", type=float, default=480, help="RL seconds per run (rollouts + updates).")
    p.add_argument("--lr", type=float, default=2e-5, help="Actor (and critic) learning rate of every run.")
    p.add_argument("--kl", type=float, default=0.001, help="KL weight: --beta, or --kl_ctl for ppo/reinforce_pp.")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--test_after", type=int, default=0,
                   help="After the runs, score the warm start and each final actor once on this many shared test "
                        "tasks (use with --heldout val: choose on validation, then measure on test).")
    args = p.parse_args(argv)

    work = args.work_dir
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    paths = prepare(args, work)
    actor, sft_seconds = warm_start(args, paths, work)
    report = {"model": args.model, "warm_start": actor, "warm_trace": args.warm_trace, "max_tries": args.max_tries,
              "warm_start_seconds": sft_seconds, "heldout": args.heldout, "n_heldout": args.n_heldout,
              "eval_interval": args.eval_interval, "budget_s": args.budget_s, "lr": args.lr,
              "kl": args.kl, "workload": "4 prompts x 8 samples a step unless a run's flags say otherwise, "
                                         "countdown + 0.5 x format, 128 new tokens",
              "cpu": _cpu(), "runs": {}}
    for label, algo, extra in runs_of(args):
        try:
            report["runs"][label] = run_one(args, actor, paths, work, label, algo, extra)
        except RuntimeError as err:  # one failing run is reported, the others still run
            report["runs"][label] = {"algo": algo, "failed": str(err).strip().splitlines()[-1][:400]}
        brief = {k: v for k, v in report["runs"][label].items() if "curve" not in k and k != "samples"}
        print(f"[bench] {label}: {json.dumps(brief)}", file=sys.stderr, flush=True)
    if args.test_after:
        report["test"] = test_once(args, actor, report["runs"], work)
    publish(report, args.out, args.name, plot, t0)


# ---------------------------------------------------------------- the test tasks, once
def test_once(args, actor, runs, work) -> dict:
    """--test_after N: the warm start and each run's final actor answer the first N 3-number shared test tasks
    greedily (128 new tokens, as step 3 renders and scores them), once, after the recipe was chosen on the
    validation slice. Accuracy with its 95% interval, and each run's paired gain over the warm start (the same
    tasks, so the bootstrap resamples tasks) with its interval. Each model's result is kept in work/ and reused."""
    from step3_rlhf.tasks.countdown import load_countdown_jsonl
    from step3_rlhf.warm_start import write_jsonl
    tests = os.path.join(work, f"test_{args.test_after}.jsonl")
    rows = [r for r in load_countdown_jsonl(os.path.join(args.data_dir, "countdown", "test.jsonl"))
            if len(r["nums"]) == 3][:args.test_after]
    write_jsonl(rows, tests)

    def score(name, model):
        out = os.path.join(work, f"test_{args.test_after}_{name}.json")
        if not os.path.isfile(out):
            run_child(child("eval", model, tests, out, args.eval_batch, 128, args.threads),
                      os.path.join(work, f"test_{name}.log"))
        with open(out) as f:
            r = json.load(f)
        flags = np.asarray(r["correct_per_task"], dtype=np.float64)
        return flags, {"accuracy": round(r["accuracy"], 4),
                       "accuracy_ci95": [round(x, 4) for x in bootstrap_ci(flags)],
                       "format_rate": round(r["format_rate"], 4),
                       "mean_response_tokens": round(r["mean_response_tokens"], 1)}

    base_flags, result = score("warm_start", actor)
    report = {"n": len(rows), "warm_start": result, "runs": {}}
    for label, run in runs.items():
        if "failed" in run:
            continue
        flags, result = score(label, os.path.join(work, label, "actor"))
        gain = flags - base_flags
        report["runs"][label] = {**result, "gain": round(float(gain.mean()), 4),
                                 "gain_ci95": [round(x, 4) for x in bootstrap_ci(gain)]}
    return report


def publish(report, out, name, plot_fn, t0):
    """Adds the bench's wall seconds, writes OUT/NAME.json and NAME.png (by plot_fn) and prints the JSON."""
    report["bench_seconds"] = round(time.time() - t0)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot_fn(report, os.path.join(out, f"{name}.png"))
    print(json.dumps(report, indent=1))


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        name = "?"
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
