"""Fault injection: kill each stage with SIGKILL at random points, resume it, and compare with a clean run.

    python bench/fault_injection.py                    # tiny model, 3 kills per stage, JSON on stdout
    python bench/fault_injection.py --kills 5 --stages 1,3 --model /path/to/hf_model_dir --seed 7

For each stage: one uninterrupted reference run, then the same command run again and again in a fresh
output dir, each attempt SIGKILLed at a random moment until `--kills` kills have landed, then left to finish.
Half the kills are timed at random; the other half land while a checkpoint is being written (as soon as a
`.tmp-stepN` folder appears), the case an atomic save must survive. After every kill each checkpoint folder
is verified (manifest + file sizes); a folder that fails is counted as corrupt (must be 0). The final
weights (every tensor of every saved model) are compared with the reference run's.

Step 2 and step 3 start from the reference outputs of the stages before them, so every run of a stage sees
identical inputs. Everything is CPU fp32, one process; the JSON goes to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from utils.checkpoint import Checkpointer  # noqa: E402

STAGES = {1: "step1_sft", 2: "step2_reward_model", 3: "step3_rlhf"}
PTX_TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(40))


def stage_command(stage, work, out, model, steps, save_interval):
    """The command line of one stage (what a user would type), on the bench's tiny inputs."""
    data = os.path.join(work, "data.jsonl")
    common = ["--data_path", data, "--data_split", "1,1,1", "--output_dir", out, "--dtype", "fp32",
              "--max_steps", str(steps), "--save_interval", str(save_interval), "--save_total_limit", "2",
              "--disable_progress_bar", "--threads", "1", "--seed", "7"]
    sup = ["--max_seq_len", "96", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
           "--per_device_eval_batch_size", "16", "--no-compare_before"]
    if stage == 1:  # dropout on: the resumed run must replay the dropout masks too
        return [sys.executable, "step1_sft/main.py", "--model_name_or_path", model, "--dropout", "0.1"] + sup + common
    if stage == 2:  # gradient accumulation: the resumed run must re-align DeepSpeed's micro-step counter
        return [sys.executable, "step2_reward_model/main.py", "--model_name_or_path", os.path.join(work, "ref1"),
                "--dropout", "0.1", "--gradient_accumulation_steps", "2"] + sup + common
    return [sys.executable, "step3_rlhf/main.py", "--actor_model_name_or_path", os.path.join(work, "ref1"),
            "--critic_model_name_or_path", os.path.join(work, "ref2"), "--max_prompt_seq_len", "64",
            "--max_answer_seq_len", "12", "--per_device_generation_batch_size", "4",
            "--per_device_training_batch_size", "2", "--actor_learning_rate", "1e-3", "--critic_learning_rate",
            "1e-3", "--enable_ema", "--unsupervised_dataset_name", os.path.join(work, "ptx.txt"),
            "--unsup_coef", "0.5", "--eval_prompts", "4"] + common


def model_files(stage, out):
    names = ["."] if stage < 3 else ["actor", "critic", "actor_ema"]
    return [os.path.join(out, n, "model.safetensors") for n in names]


def max_weight_diff(stage, out_a, out_b) -> float:
    from safetensors.torch import load_file
    worst = 0.0
    for fa, fb in zip(model_files(stage, out_a), model_files(stage, out_b)):
        a, b = load_file(fa), load_file(fb)
        if a.keys() != b.keys():
            return float("inf")
        for k in a:
            worst = max(worst, (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0)
    return worst


def corrupt_checkpoints(out) -> list[str]:
    ckpt = Checkpointer(out)
    return [f"{t}: {p}" for t in ckpt.tags() if (p := ckpt.verify(t))]


TRAINING_STARTS = ("optimizer steps", "training prompts")  # the line each stage logs just before its loop


def run_once(cmd, env, log_path, kill=None, markers=TRAINING_STARTS):
    """Run `cmd`. `kill` = ("time", seconds after a line with one of `markers` is logged) or ("save", n: during
    the n-th checkpoint write) sends SIGKILL. Returns (exit code or 'killed', its log, seconds since marker)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seen_tmp, out = set(), cmd[cmd.index("--output_dir") + 1]
    root = os.path.join(out, "checkpoints")
    killed, train_start = False, None
    while proc.poll() is None:
        if train_start is None:
            with open(log_path, errors="replace") as f:
                text = f.read()
            if any(m in text for m in markers):
                train_start = time.time()
        if kill and kill[0] == "time" and train_start is not None:
            killed = time.time() - train_start >= kill[1]
        elif kill and kill[0] == "save" and os.path.isdir(root):
            seen_tmp.update(d for d in os.listdir(root) if d.startswith(".tmp-"))
            killed = len(seen_tmp) >= kill[1]
        if killed:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.005)
    with open(log_path, errors="replace") as f:
        text = f.read()
    code = "killed" if killed and proc.returncode == -signal.SIGKILL else proc.returncode
    return code, text, time.time() - (train_start or time.time())


def bench_stage(stage, work, model, args, rng):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = os.path.join(work, f"ref{stage}")
    cmd_ref = stage_command(stage, work, ref, model, args.steps[stage - 1], args.save_interval[stage - 1])
    code, _, train_seconds = run_once(cmd_ref, env, os.path.join(work, f"ref{stage}.log"))
    if code != 0:
        raise SystemExit(f"reference run of {STAGES[stage]} failed ({code}); see {work}/ref{stage}.log")
    out = os.path.join(work, f"faulted{stage}")
    cmd = stage_command(stage, work, out, model, args.steps[stage - 1], args.save_interval[stage - 1])
    attempts = kills = kills_in_save = resume_attempts = resumes_ok = 0
    corrupt, codes = [], []
    while True:
        attempts += 1
        done = Checkpointer(out).latest()  # what this attempt must resume from
        kill, markers = None, TRAINING_STARTS
        if done:
            resume_attempts += 1
            markers = (f"resuming from {os.path.join(out, 'checkpoints', done[0])} ",)
        if kills < args.kills:  # alternate: a random moment of training, then the middle of a save
            left = 1 - (done[1]["step"] if done else 0) / args.steps[stage - 1]  # share of training still to do
            spread = left * train_seconds / (args.kills - kills + 1)  # leave room for the kills still to come
            kill = ("save", rng.randint(1, 2)) if kills % 2 else ("time", rng.uniform(0.1, 1.0) * spread)
        code, text, _ = run_once(cmd, env, os.path.join(work, f"faulted{stage}.{attempts}.log"), kill, markers)
        codes.append(code)
        resumes_ok += bool(done) and markers[0] in text and code in (0, "killed")
        if code == "killed":
            kills += 1
            kills_in_save += kill[0] == "save"
            corrupt += corrupt_checkpoints(out)
            continue
        if code != 0:  # 0: finished (a planned kill may come too late for a short resumed run)
            raise SystemExit(f"{STAGES[stage]} attempt {attempts} exited {code}; see "
                             f"{work}/faulted{stage}.{attempts}.log")
        break
    result = {"runs": attempts, "kills": kills, "kills_during_save": kills_in_save,
              "resume_attempts": resume_attempts, "resumes_that_succeeded": resumes_ok, "exit_codes": codes,
              "max_weight_diff_vs_uninterrupted": max_weight_diff(stage, ref, out),
              "checkpoints_found_corrupt": len(corrupt), "corrupt": corrupt[:5],
              "reference_training_seconds": round(train_seconds, 1)}
    print(f"[fault_injection] {STAGES[stage]}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def prepare(work, model_arg):
    from tests.tiny import build_tiny_model_dir
    from utils.data.synthetic import make_synthetic_preferences, write_jsonl
    write_jsonl(make_synthetic_preferences(300, seed=3), os.path.join(work, "data.jsonl"))
    with open(os.path.join(work, "ptx.txt"), "w") as f:
        f.write(PTX_TEXT)
    if model_arg:
        return model_arg
    return build_tiny_model_dir(os.path.join(work, "tiny"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="HF model dir for the actor/base (default: a tiny random Llama)")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs per stage")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--steps", default="60,40,16", help="optimizer/RL steps of stage 1,2,3")
    p.add_argument("--save_interval", default="4,3,2", help="checkpoint interval of stage 1,2,3")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--workdir", default="", help="keep everything here (default: a temp dir, removed)")
    args = p.parse_args(argv)
    args.steps = [int(x) for x in args.steps.split(",")]
    args.save_interval = [int(x) for x in args.save_interval.split(",")]
    stages = sorted(int(s) for s in args.stages.split(","))
    work = args.workdir or tempfile.mkdtemp(prefix="fault_injection_")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(args.seed)
    model = prepare(work, args.model)
    results = {}
    try:
        for stage in (1, 2, 3):
            needed = stage in stages or any(s > stage for s in stages)  # later stages start from this one's output
            if not needed:
                continue
            if stage in stages:
                results[STAGES[stage]] = bench_stage(stage, work, model, args, rng)
            else:
                ref = os.path.join(work, f"ref{stage}")
                cmd = stage_command(stage, work, ref, model, args.steps[stage - 1], args.save_interval[stage - 1])
                if run_once(cmd, os.environ.copy(), os.path.join(work, f"ref{stage}.log"))[0] != 0:
                    raise SystemExit(f"{STAGES[stage]} failed; see {work}/ref{stage}.log")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    total = {k: sum(r[k] for r in results.values()) for k in
             ("runs", "kills", "kills_during_save", "resume_attempts", "resumes_that_succeeded",
              "checkpoints_found_corrupt")}
    total["max_weight_diff_vs_uninterrupted"] = max(r["max_weight_diff_vs_uninterrupted"] for r in results.values())
    print(json.dumps({"model": args.model or "tiny random llama (tests/tiny.py)", "kills_per_stage": args.kills,
                      "stages": results, "total": total}, indent=2))
    return 0 if total["checkpoints_found_corrupt"] == 0 and total["max_weight_diff_vs_uninterrupted"] <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
