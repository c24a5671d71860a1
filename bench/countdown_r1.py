"""Countdown R1 bench: SmolLM2-135M-Instruct before and after a warm start, then after RL, vs TRL's cold start.

    python bench/countdown_r1.py [--data_dir ../shared/data] [--n_test 200] [--sft_steps N] [--rl_steps N]

Phases, each a child process (so every one gets its own peak RSS, read with os.wait4):
  1. base    - the offline default model, evaluated on N held-out 3-number test tasks (greedy, 128 tokens);
  2. sft     - step 1 on warm-start rows (step3_rlhf/warm_start.py: the project's solver writes each solution
               in the <think>/<answer> format, rendered exactly as step 3 renders its prompts), then evaluated;
  3. rl      - step 3 GRPO from the SFT model with the Countdown rule + format reward, then evaluated;
  4. memory  - one PPO step with the same batch (critic started from the actor): what a critic costs;
  5. trl     - TRL's GRPOTrainer cold-started from the base model for the wall-clock time that phases 2+3
               trained, then evaluated (only if `trl` imports with PYTHONPATH=--trl_path; else the reason).
Prints one JSON object. Format = the response is exactly <think>...</think> <answer>...</answer>;
accuracy = the TinyZero Countdown score is 1 (correct equation, each number once).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a busy 2-core box is ~50x slower with spinning OpenMP threads
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
STEP1, STEP3 = os.path.join(REPO, "step1_sft", "main.py"), os.path.join(REPO, "step3_rlhf", "main.py")


# ---------------------------------------------------------------- child processes
def run_child(cmd, log_path, env=None):
    """Run `cmd` with output to `log_path`; (seconds, peak RSS in MB of that process) or raise with the log tail."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}):\n{tail}")
    return round(time.time() - start, 1), round(usage.ru_maxrss / 1024)  # ru_maxrss is in KB on Linux


def child(phase, *args):
    return [sys.executable, os.path.abspath(__file__), "--phase", phase, *map(str, args)]


def evaluate_in_child(model, tests, work, name, args):
    out = os.path.join(work, f"eval_{name}.json")
    seconds, rss = run_child(child("eval", model, tests, out, args.eval_batch, args.max_new_tokens, args.threads),
                             os.path.join(work, f"eval_{name}.log"))
    with open(out) as f:
        result = json.load(f)
    return {**result, "eval_seconds": seconds, "eval_peak_rss_mb": rss}


# ---------------------------------------------------------------- phase: eval (runs in a child)
def phase_eval(model, tests, out, batch_size, max_new_tokens, threads):
    """Greedy answers to the test prompts (rendered exactly as step 3 renders them); format rate and accuracy."""
    import torch
    from step3_rlhf.rollout import eos_ids
    from step3_rlhf.prompt_data import _tokenize_task
    from step3_rlhf.tasks.countdown import countdown_prompt, countdown_reward, load_countdown_jsonl
    from step3_rlhf.tasks.format import format_reward
    from utils.data.datasets import collate_left_padded_prompts
    from utils.models import load_causal_lm, load_tokenizer, resolve_dtype
    torch.set_num_threads(int(threads))
    tok = load_tokenizer(model)
    lm = load_causal_lm(model, dtype=resolve_dtype("auto")).eval()
    tasks = load_countdown_jsonl(tests)
    items = [_tokenize_task(tok, countdown_prompt(t, style="chat"), 10 ** 9) for t in tasks]
    fmt, correct, lengths, samples = [], [], [], []
    for start in range(0, len(items), int(batch_size)):
        chunk = items[start:start + int(batch_size)]
        batch = collate_left_padded_prompts([{"prompt_input_ids": c["prompt_input_ids"]} for c in chunk], tok.pad_token_id)
        with torch.no_grad():
            seq = lm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                              max_new_tokens=int(max_new_tokens), pad_token_id=tok.pad_token_id,
                              eos_token_id=eos_ids(tok, lm))
        for c, row in zip(chunk, seq[:, batch["input_ids"].shape[1]:]):
            text = tok.decode(row, skip_special_tokens=True)
            fmt.append(format_reward(text) == 1.0)
            correct.append(countdown_reward(text, c["meta"]["target"], c["meta"]["nums"]) == 1.0)
            lengths.append(int((~torch.isin(row, torch.tensor(eos_ids(tok, lm) + [tok.pad_token_id]))).sum()))
            if len(samples) < 3:
                samples.append({"nums": c["meta"]["nums"], "target": c["meta"]["target"], "response": text[:300]})
    n = len(fmt)
    result = {"n": n, "formatted": sum(fmt), "correct": sum(correct), "format_rate": sum(fmt) / n,
              "accuracy": sum(correct) / n, "mean_response_tokens": sum(lengths) / n, "samples": samples,
              "correct_per_task": [int(c) for c in correct]}  # for paired comparisons of two models
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


# ---------------------------------------------------------------- phase: trl cold start (runs in a child)
def phase_trl(model, prompts_path, out_dir, budget_s, threads, lr, max_new_tokens):
    """TRL GRPOTrainer from the base model, 4 prompts x 8 samples per optimizer step, stopped at `budget_s`."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from step3_rlhf.tasks.countdown import countdown_prompt, countdown_reward, load_countdown_jsonl
    from step3_rlhf.tasks.format import format_reward
    from utils.models import load_tokenizer, resolve_model_path
    torch.set_num_threads(int(threads))
    path = resolve_model_path(model)
    tok = load_tokenizer(path)
    rows = [{"prompt": countdown_prompt(t, style="chat").render(tok), "target": t["target"], "nums": t["nums"]}
            for t in load_countdown_jsonl(prompts_path)]

    def countdown(prompts, completions, target, nums, **_):
        return [countdown_reward(c, t, n) for c, t, n in zip(completions, target, nums)]

    def fmt(prompts, completions, **_):
        return [format_reward(c) for c in completions]

    class Budget(TrainerCallback):
        def __init__(self):
            self.start = None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.time()

        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = time.time() - self.start >= float(budget_s)

    cfg = GRPOConfig(output_dir=out_dir, num_generations=8, per_device_train_batch_size=8,
                     gradient_accumulation_steps=4, max_completion_length=int(max_new_tokens), learning_rate=float(lr),
                     beta=0.001, max_steps=10 ** 6, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     bf16=True, reward_weights=[1.0, 0.5], seed=1234, disable_tqdm=True)
    budget = Budget()
    trainer = GRPOTrainer(model=path, reward_funcs=[countdown, fmt], args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[budget])
    trainer.train()
    seconds = time.time() - budget.start
    trainer.save_model(os.path.join(out_dir, "model"))
    tok.save_pretrained(os.path.join(out_dir, "model"))
    logs = [h for h in trainer.state.log_history if "reward" in h]
    with open(os.path.join(out_dir, "trl_summary.json"), "w") as f:
        json.dump({"steps": trainer.state.global_step, "train_seconds": seconds,
                   "reward_per_step": [h["reward"] for h in logs]}, f)


def trl_available(trl_path):
    """None when `import trl; GRPOTrainer` works with PYTHONPATH=trl_path, else the reason (one line)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (trl_path, REPO) if p)}
    probe = subprocess.run([sys.executable, "-c", "import trl; from trl import GRPOTrainer; print(trl.__version__)"],
                           capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        return "trl does not import: " + (probe.stderr.strip().splitlines() or ["?"])[-1][:300]
    return None


# ---------------------------------------------------------------- orchestration
def prepare(args, work):
    """Held-out test tasks, warm-start SFT rows and RL prompts (disjoint train tasks), all 3-number."""
    from step3_rlhf.tasks.countdown import load_countdown_jsonl
    from step3_rlhf.warm_start import countdown_rows, write_jsonl
    data = os.path.join(args.data_dir, "countdown")
    keep3 = lambda rows: [r for r in rows if len(r["nums"]) == 3]  # noqa: E731
    test = keep3(load_countdown_jsonl(os.path.join(data, "test.jsonl")))[:args.n_test]
    train = keep3(load_countdown_jsonl(os.path.join(data, "train.jsonl")))
    sft_tasks, rl_tasks = train[:args.sft_rows], train[args.sft_rows:args.sft_rows + args.rl_rows]
    paths = {name: os.path.join(work, f"{name}.jsonl") for name in ("test", "sft", "rl")}
    write_jsonl(test, paths["test"])
    write_jsonl(countdown_rows(sft_tasks), paths["sft"])
    write_jsonl(rl_tasks, paths["rl"])
    return paths


def rl_command(args, actor, prompts, out, algo="grpo", steps=None, beta=None):
    cmd = [sys.executable, STEP3, "--actor_model_name_or_path", actor, "--algo", algo, "--task", "countdown",
           "--data_path", prompts, "--reward", "countdown", "format=0.5", "--max_prompt_seq_len", "256",
           "--max_answer_seq_len", str(args.max_new_tokens), "--actor_learning_rate", str(args.rl_lr),
           "--lr_scheduler_type", "constant", "--max_steps", str(steps or args.rl_steps), "--eval_prompts", "0",
           "--dtype", "auto", "--threads", str(args.threads), "--disable_progress_bar", "--no_resume",
           "--output_dir", out, "--per_device_training_batch_size", str(args.rl_micro_batch)]
    if algo == "ppo":  # the same 32 sequences per step, one sample per prompt; critic from the actor
        return cmd + ["--per_device_generation_batch_size", str(args.rl_prompts * args.num_generations),
                      "--kl_ctl", "0.001"]
    return cmd + ["--per_device_generation_batch_size", str(args.rl_prompts), "--num_generations",
                  str(args.num_generations), "--beta", str(args.beta if beta is None else beta)]


def built_line(log_path):
    with open(log_path) as f:
        return next((line.split("] ", 1)[1].strip() for line in f if ": built " in line), None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(REPO), "shared", "data"),
                   help="Holds countdown/train.jsonl and countdown/test.jsonl.")
    p.add_argument("--work_dir", default="/tmp/countdown_r1_bench")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--n_test", type=int, default=200, help="Held-out 3-number test tasks.")
    p.add_argument("--sft_rows", type=int, default=2000, help="Warm-start rows (train tasks).")
    p.add_argument("--sft_steps", type=int, default=60, help="Step-1 optimizer steps.")
    p.add_argument("--sft_batch", type=int, default=8)
    p.add_argument("--sft_lr", type=float, default=1e-4)
    p.add_argument("--rl_rows", type=int, default=1000, help="RL prompts (train tasks after the SFT ones).")
    p.add_argument("--rl_steps", type=int, default=6, help="Step-3 GRPO steps.")
    p.add_argument("--rl_prompts", type=int, default=4, help="Prompts per RL step.")
    p.add_argument("--num_generations", type=int, default=8, help="Samples per prompt (G).")
    p.add_argument("--rl_micro_batch", type=int, default=16, help="Sequences per RL optimizer step.")
    p.add_argument("--rl_lr", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.001)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--eval_batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip_memory", action="store_true", help="No PPO memory probe.")
    p.add_argument("--trl_path", default="/tmp/trl116", help="Where trl is installed (pip install --target).")
    p.add_argument("--skip_trl", action="store_true")
    p.add_argument("--trl_budget_s", type=float, default=0, help="TRL training seconds (0 = what SFT + RL took).")
    p.add_argument("--phase", default="", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.phase == "eval":
        return phase_eval(*rest)
    if args.phase == "trl":
        return phase_trl(*rest)

    work = args.work_dir
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    paths = prepare(args, work)
    report = {"model": args.model, "n_test": args.n_test, "greedy_max_new_tokens": args.max_new_tokens,
              "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    report["base"] = evaluate_in_child(args.model, paths["test"], work, "base", args)

    sft_dir = os.path.join(work, "sft")
    sft_cmd = [sys.executable, STEP1, "--model_name_or_path", args.model, "--data_path", paths["sft"],
               "--data_split", "1,0,0", "--max_seq_len", "320", "--per_device_train_batch_size", str(args.sft_batch),
               "--learning_rate", str(args.sft_lr), "--lr_scheduler_type", "cosine", "--num_warmup_steps", str(min(5, args.sft_steps // 4)),
               "--max_steps", str(args.sft_steps), "--max_eval_samples", "64", "--no-compare_before",
               "--dtype", "auto", "--threads", str(args.threads), "--disable_progress_bar", "--output_dir", sft_dir,
               "--no_resume"]
    sft_s, sft_rss = run_child(sft_cmd, os.path.join(work, "sft.log"))
    report["sft"] = {"steps": args.sft_steps, "batch": args.sft_batch, "lr": args.sft_lr, "train_seconds": sft_s,
                     "seconds_per_step": round(sft_s / args.sft_steps, 2), "peak_rss_mb": sft_rss,
                     **evaluate_in_child(sft_dir, paths["test"], work, "sft", args)}

    rl_dir = os.path.join(work, "rl")
    rl_s, rl_rss = run_child(rl_command(args, sft_dir, paths["rl"], rl_dir), os.path.join(work, "rl.log"))
    with open(os.path.join(rl_dir, "summary.json")) as f:
        history = json.load(f)["history"]
    step_s = [sum(v for k, v in h.items() if k.startswith("time/")) for h in history]
    report["rl"] = {"algo": "grpo", "steps": len(history), "prompts_x_samples": f"{args.rl_prompts}x{args.num_generations}",
                    "lr": args.rl_lr, "beta": args.beta, "process_seconds": rl_s,
                    "seconds_per_step": round(sum(step_s) / len(step_s), 1), "peak_rss_mb": rl_rss,
                    "built": built_line(os.path.join(work, "rl.log")),
                    "reward_per_step": [round(h["reward/mean"], 3) for h in history],
                    "countdown_per_step": [round(h.get("reward/countdown", 0.0), 3) for h in history],
                    **evaluate_in_child(os.path.join(rl_dir, "actor"), paths["test"], work, "rl", args)}

    if not args.skip_memory:  # one step each, the same 32 sequences per step as the GRPO run
        report["memory"] = {"grpo_run_peak_rss_mb": rl_rss, "grpo_built": report["rl"]["built"],
                            "note": "PPO adds a critic (from the actor) and its optimizer state; REINFORCE with "
                                    "beta 0 drops the reference model too"}
        for algo, beta in (("ppo", None), ("reinforce", 0.0)):
            log = os.path.join(work, f"{algo}_probe.log")
            secs, rss = run_child(rl_command(args, sft_dir, paths["rl"], os.path.join(work, f"{algo}_probe"), algo, 1,
                                             beta), log)
            report["memory"].update({f"{algo}_1_step_peak_rss_mb": rss, f"{algo}_built": built_line(log),
                                     f"{algo}_1_step_process_seconds": secs})

    if args.skip_trl:
        report["trl"] = {"skipped": "--skip_trl"}
    elif (reason := trl_available(args.trl_path)) is not None:
        report["trl"] = {"skipped": reason}
    else:
        budget = args.trl_budget_s or round(sft_s + rl_s)
        trl_dir = os.path.join(work, "trl")
        env = {"PYTHONPATH": os.pathsep.join((args.trl_path, REPO))}
        try:
            trl_s, trl_rss = run_child(child("trl", args.model, paths["rl"], trl_dir, budget, args.threads, args.rl_lr,
                                             args.max_new_tokens), os.path.join(work, "trl.log"), env)
            with open(os.path.join(trl_dir, "trl_summary.json")) as f:
                trl = json.load(f)
            report["trl"] = {"version": "1.16.0", "budget_seconds": budget, **trl, "process_seconds": trl_s,
                             "seconds_per_step": round(trl["train_seconds"] / max(trl["steps"], 1), 1),
                             "peak_rss_mb": trl_rss,
                             **evaluate_in_child(os.path.join(trl_dir, "model"), paths["test"], work, "trl", args)}
        except RuntimeError as err:
            report["trl"] = {"failed": str(err).splitlines()[-1][:400], "log": os.path.join(work, "trl.log")}
    report["bench_seconds"] = round(time.time() - t0)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
