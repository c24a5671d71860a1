"""The classic pipeline on real preference data, judged by a reward model no stage trained with (#15 point 2).

    python bench/hh_ppo_judge.py [--work_dir /tmp/hh_judge] [--ppo_steps 60] [--out bench/results]

The usable rows of preference/hh_harmless_base_1500.jsonl (non-empty prompt and replies, two different replies)
are shuffled with a fixed seed into three disjoint slices: --n_heldout rows whose prompts and pairs nobody
trains on, --n_judge rows for the JUDGE, and the rest for the pipeline. Then, each a child process:
  step 1  SFT of --model on the pipeline rows' chosen replies;
  step 2  the training reward model on the pipeline rows' pairs (from --model);
  judge   a second reward model, same recipe, on the judge rows' pairs (from --model);
  step 3  PPO: actor and reference from step 1, critic and reward from step 2, prompts of the pipeline rows;
          its before/after evaluation samples the held-out prompts (KL to the reference, per sequence).
Both reward models are also scored on the held-out PAIRS (their accuracy says how far to trust each).
Finally the step-1 actor and the final actor answer every held-out prompt greedily, and both reward models
score every answer: the mean score of each actor, the per-prompt difference (final - step 1) with a bootstrap
95% interval, and the win rate of the final actor (a tie counts half) with its interval. The judge's columns
are the measure; the training reward model's beside them show hacking (a rise the judge does not share).
A stage whose output exists is reused (an interrupted bench resumes); prints one JSON object and writes it
with a PNG to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a busy 2-core box is ~50x slower with spinning OpenMP threads
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from bench.countdown_algorithms import publish  # noqa: E402  (bench_seconds, JSON + PNG, printed)
from bench.countdown_r1 import run_child  # noqa: E402  (seconds and peak RSS of one child process)
from bench.reward_model_bench import DATA_FILE, bootstrap_ci, read_jsonl, usable, write_jsonl  # noqa: E402

STEP = {n: os.path.join(REPO, d, "main.py") for n, d in
        ((1, "step1_sft"), (2, "step2_reward_model"), (3, "step3_rlhf"))}


# ---------------------------------------------------------------- split and statistics (pure)
def split_three(n_rows: int, n_heldout: int, n_judge: int, seed: int) -> dict:
    """Disjoint index lists {"heldout", "judge", "pipeline"} of a seeded shuffle of range(n_rows)."""
    if n_heldout + n_judge >= n_rows:
        raise SystemExit(f"--n_heldout + --n_judge must leave pipeline rows (there are {n_rows} usable rows)")
    order = np.random.RandomState(seed).permutation(n_rows).tolist()
    return {"heldout": order[:n_heldout], "judge": order[n_heldout:n_heldout + n_judge],
            "pipeline": order[n_heldout + n_judge:]}


def compare(before, after, seed: int = 0) -> dict:
    """Per-prompt scores of the step-1 and final actors by one reward model: means, the mean difference with
    its bootstrap 95% interval, and the final actor's win rate (a tie counts half) with its interval."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    diff = after - before
    wins = (diff > 0) + 0.5 * (diff == 0)
    r4 = lambda x: round(float(x), 4)  # noqa: E731
    return {"step1_mean": r4(before.mean()), "final_mean": r4(after.mean()), "diff_mean": r4(diff.mean()),
            "diff_ci95": [r4(x) for x in bootstrap_ci(diff, seed=seed)], "win_rate": r4(wins.mean()),
            "win_rate_ci95": [r4(x) for x in bootstrap_ci(wins, seed=seed)], "n": int(len(diff))}


# ---------------------------------------------------------------- stages
def prepare(args, work) -> dict:
    """Writes pipeline/ and judge/ (train.jsonl + test.jsonl = the held-out rows): step 2 scores each reward
    model on the held-out pairs, step 3 evaluates on the held-out prompts. Returns {name: dir}."""
    rows = [r for r in read_jsonl(os.path.join(args.data_dir, DATA_FILE)) if usable(r)]
    parts = split_three(len(rows), args.n_heldout, args.n_judge, args.seed)
    dirs = {}
    for name in ("pipeline", "judge"):
        dirs[name] = os.path.join(work, "data", name)  # apart from the models: work/judge is the judge model
        os.makedirs(dirs[name], exist_ok=True)
        write_jsonl(os.path.join(dirs[name], "train.jsonl"), [rows[i] for i in parts[name]])
        write_jsonl(os.path.join(dirs[name], "test.jsonl"), [rows[i] for i in parts["heldout"]])
    return dirs


def common(args):
    return ["--dtype", "auto", "--threads", str(args.threads), "--seed", str(args.seed), "--disable_progress_bar"]


def run_stage(name, cmd, out, work, timings):
    """Runs one stage unless its output is complete (summary.json written last); records seconds and RSS in
    `timings` and work/timings.json, so a reused stage keeps the figures of the run that made it."""
    record = os.path.join(work, "timings.json")
    if os.path.isfile(os.path.join(out, "summary.json")):
        kept = {}
        if os.path.isfile(record):
            with open(record) as f:
                kept = json.load(f)
        timings.setdefault(name, kept.get(name, {"reused": out}))
        return
    print(f"[hh_judge] {name}: {shlex.join(cmd[1:4])} ...", file=sys.stderr, flush=True)
    seconds, rss = run_child(cmd + ["--output_dir", out, "--no_resume"], os.path.join(work, f"{name}.log"))
    timings[name] = {"seconds": seconds, "peak_rss_mb": rss}
    with open(record, "w") as f:
        json.dump(timings, f, indent=1)


def train_all(args, dirs, work) -> tuple[dict, dict]:
    out = {n: os.path.join(work, n) for n in ("step1", "step2", "judge", "step3")}
    timings = {}
    run_stage("step1", [sys.executable, STEP[1], "--model_name_or_path", args.model, "--data_path", dirs["pipeline"],
                        "--data_split", "10,0,0", "--max_seq_len", str(args.max_seq_len),
                        "--per_device_train_batch_size", "8", "--learning_rate", str(args.sft_lr),
                        "--lr_scheduler_type", "cosine", "--num_warmup_steps", "5", "--num_train_epochs", "1",
                        "--max_eval_samples", "64", "--no-compare_before", *common(args),
                        *shlex.split(args.step1_args)], out["step1"], work, timings)
    for name, data in (("step2", dirs["pipeline"]), ("judge", dirs["judge"])):  # one recipe, disjoint pairs
        run_stage(name, [sys.executable, STEP[2], "--model_name_or_path", args.model, "--data_path", data,
                         "--data_split", "0,10,0", "--max_seq_len", str(args.max_seq_len),
                         "--per_device_train_batch_size", "8", "--num_train_epochs", "1", *common(args),
                         *shlex.split(args.rm_args)], out[name], work, timings)
    run_stage("step3", [sys.executable, STEP[3], "--actor_model_name_or_path", out["step1"],
                        "--critic_model_name_or_path", out["step2"], "--data_path", dirs["pipeline"],
                        "--data_split", "0,0,10", "--max_prompt_seq_len", str(args.max_prompt_seq_len),
                        "--max_answer_seq_len", str(args.max_answer_seq_len),
                        "--per_device_generation_batch_size", "8", "--per_device_training_batch_size", "8",
                        "--actor_learning_rate", str(args.actor_lr), "--critic_learning_rate", str(args.critic_lr),
                        "--kl_ctl", str(args.kl_ctl), "--temperature", str(args.temperature),
                        "--lr_scheduler_type", "constant", "--max_steps", str(args.ppo_steps),
                        "--eval_prompts", str(args.n_heldout), "--eval_interval", str(args.eval_interval),
                        "--per_device_eval_batch_size", "16", *common(args), *shlex.split(args.step3_args)],
              out["step3"], work, timings)
    return out, timings


# ---------------------------------------------------------------- held-out answers and both judges
def answer_and_score(args, dirs, out) -> dict:
    """Greedy answers of the step-1 and final actors to the held-out prompts, scored by both reward models."""
    import torch
    from inference.common import load_for_inference, quiet_transformers, score_items
    from inference.heldout import generate_greedy
    from utils.data.splits import load_stage_rows
    quiet_transformers()
    torch.set_num_threads(args.threads)
    _, rows, _ = load_stage_rows([dirs["pipeline"]], "0,0,10", 2, args.seed)  # the source's test.jsonl
    messages = [list(r.prompt) for r in rows[:args.n_heldout]]
    answers = {}
    for label, path in (("step1", out["step1"]), ("final", os.path.join(out["step3"], "actor"))):
        model, tok = load_for_inference(path, dtype="auto")
        answers[label] = generate_greedy(model, tok, messages, args.max_answer_seq_len, batch_size=8)
        del model
        gc.collect()
    scores = {}
    for rm in ("judge", "step2"):
        model, tok = load_for_inference(out[rm], kind="value", dtype="auto")
        scores[rm] = {label: score_items(model, tok, list(zip(messages, replies)), batch_size=8)[0]
                      for label, replies in answers.items()}
        del model
        gc.collect()
    examples = [{"prompt": m[-1]["content"][-300:], "step1": answers["step1"][i], "final": answers["final"][i],
                 "judge": [round(scores["judge"]["step1"][i], 3), round(scores["judge"]["final"][i], 3)]}
                for i, m in enumerate(messages[:3])]  # the first three, in order
    return {"n": len(messages), "answers": answers, "scores": scores, "examples": examples}


def report_of(args, out, timings, scored) -> dict:
    s = {n: json.load(open(os.path.join(out[n], "summary.json"))) for n in out}
    history = s["step3"]["history"]
    rm_acc = lambda n: round(s[n]["after"]["eval/accuracy"], 4)  # noqa: E731  (a tie counts half)
    return {
        "data": DATA_FILE, "model": args.model, "seed": args.seed, "n_heldout": scored["n"],
        "n_judge_pairs": args.n_judge, "ppo_steps": len(history),
        "settings": {k: getattr(args, k) for k in ("max_seq_len", "max_prompt_seq_len", "max_answer_seq_len",
                                                   "sft_lr", "actor_lr", "critic_lr", "kl_ctl", "temperature",
                                                   "rm_args", "step1_args", "step3_args")},
        "heldout_pair_accuracy": {"step2": rm_acc("step2"), "judge": rm_acc("judge")},
        "judge": compare(scored["scores"]["judge"]["step1"], scored["scores"]["judge"]["final"], args.seed),
        "training_rm": compare(scored["scores"]["step2"]["step1"], scored["scores"]["step2"]["final"], args.seed),
        "kl_to_reference": {"before": s["step3"]["before"].get("kl_mean"), "after": s["step3"]["after"].get("kl_mean"),
                            "how": f"per sequence, nats, sampled at {args.temperature} on the held-out prompts"},
        "step3_train_reward_curve": [round(h["reward/mean"], 4) for h in history],
        "step3_kl_curve": [round(h.get("kl/mean", 0.0), 4) for h in history],
        "timings": timings, "examples": scored["examples"]}


def plot(report, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 4))
    FigureCanvasAgg(fig)
    a, b, c = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    for x, (key, label) in enumerate((("judge", "judge RM"), ("training_rm", "training RM"))):
        r = report[key]
        a.bar([x - 0.2, x + 0.2], [r["step1_mean"], r["final_mean"]], width=0.4,
              color=["tab:gray", "tab:blue"], label=["step-1 actor", "final actor"] if x == 0 else None)
        lo, hi = r["win_rate_ci95"]
        b.errorbar([x], [r["win_rate"]], yerr=[[r["win_rate"] - lo], [hi - r["win_rate"]]], fmt="o", capsize=6)
    a.set_xticks([0, 1], ["judge RM", "training RM"])
    a.set(title=f"mean score on {report['n_heldout']} held-out prompts", ylabel="reward")
    a.legend(fontsize=8)
    b.axhline(0.5, color="gray", lw=0.8, ls="--")
    b.set_xticks([0, 1], ["judge RM", "training RM"])
    b.set(title="win rate of the final actor vs step 1 (95% CI)", ylim=(0, 1), xlim=(-0.6, 1.6))
    steps = range(1, len(report["step3_train_reward_curve"]) + 1)
    c.plot(steps, report["step3_train_reward_curve"], label="training reward")
    c.plot(steps, report["step3_kl_curve"], label="KL (per sequence)")
    c.set(title="step 3 (PPO)", xlabel="step")
    c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(REPO), "shared", "data"))
    p.add_argument("--work_dir", default="/tmp/hh_judge")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--name", default="hh_ppo_judge")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--n_heldout", type=int, default=150, help="Rows whose prompts and pairs no model trains on.")
    p.add_argument("--n_judge", type=int, default=600, help="Rows the judge reward model trains on.")
    p.add_argument("--max_seq_len", type=int, default=512, help="Steps 1 and 2 (and the judge).")
    p.add_argument("--max_prompt_seq_len", type=int, default=256)
    p.add_argument("--max_answer_seq_len", type=int, default=64)
    p.add_argument("--sft_lr", type=float, default=2e-5)
    p.add_argument("--actor_lr", type=float, default=1e-5)
    p.add_argument("--critic_lr", type=float, default=3e-5)
    p.add_argument("--kl_ctl", type=float, default=0.4,
                   help="Step 3's KL weight: 0.1 ended at 1.17 nats a sequence, 0.4 at 0.22 (#15 asks < 0.5).")
    p.add_argument("--temperature", type=float, default=0.7, help="Step 3's rollout (and KL evaluation) temperature.")
    p.add_argument("--ppo_steps", type=int, default=60)
    p.add_argument("--eval_interval", type=int, default=0, help="Step 3's held-out curve (0 = before/after only).")
    p.add_argument("--rm_args", default="", help="Extra step-2 flags for both reward models.")
    p.add_argument("--step1_args", default="", help="Extra step-1 flags (e.g. '--max_steps 20').")
    p.add_argument("--step3_args", default="", help="Extra step-3 flags.")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    work = args.work_dir
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    dirs = prepare(args, work)
    out, timings = train_all(args, dirs, work)
    scored_path = os.path.join(work, "scored.json")
    if not os.path.isfile(scored_path):
        with open(scored_path, "w") as f:
            json.dump(answer_and_score(args, dirs, out), f)
    with open(scored_path) as f:
        scored = json.load(f)
    publish(report_of(args, out, timings, scored), args.out, args.name, plot, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
