"""Run the three steps in order with DeepSpeed-Chat's driver flags: `python e2e_rlhf.py --step 1 2 3 ...`.

    python e2e_rlhf.py --step 1 2 3 --actor-model facebook/opt-1.3b --reward-model facebook/opt-350m \
        --deployment-type single_gpu --output-dir ./output
    python e2e_rlhf.py --deployment-type cpu                 # the offline CPU demo presets (SmolLM2-135M)
    python e2e_rlhf.py --deployment-type cpu --dry_run       # plan + memory estimate of each step, no training

Each step runs its preset script (STEP/training_scripts/{opt,llama}/DEPLOYMENT.sh - the family picked from the
actor model's name, as upstream picks by model - or STEP/training_scripts/demo.sh for `--deployment-type cpu`)
with the models and ZeRO stages given here. Outputs go to OUTPUT/step1, OUTPUT/step2 and OUTPUT/step3, each
step's console to OUTPUT/logs/stepN.log. A finished step leaves OUTPUT/.e2e/stepN.done; a rerun of the same
command skips finished steps (--force reruns them), so a half-finished pipeline resumes at the step that did
not finish (and that step resumes from its own last checkpoint, if it wrote any). The run ends with each
step's wall time, for the CPU demo the held-out answers of the base, step-1 and step-3 models checked by rule
(inference.heldout), the report (inference.report) and the cross-stage summary (inference.summary). A failed
step ends the driver with that step's exit code.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.abspath(__file__))
STEP_DIRS = {1: "step1_sft", 2: "step2_reward_model", 3: "step3_rlhf"}
DEPLOYMENTS = ("single_gpu", "single_node", "multi_node", "cpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--step", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                   help="Which steps to run (in order 1, 2, 3 whatever order they are given in).")
    p.add_argument("--actor-model", default="", help="Step-1 model (Hub name or local dir); default: the preset's "
                   "(facebook/opt-1.3b, or SmolLM2-135M-Instruct for --deployment-type cpu).")
    p.add_argument("--reward-model", default="", help="Step-2 base model; default: the preset's (facebook/opt-350m, "
                   "or the step-1 output for --deployment-type cpu).")
    p.add_argument("--actor-zero-stage", default="", help="ZeRO stage of step 1 and of step 3's actor; default: "
                   "the preset's.", choices=["", "0", "1", "2", "3"])
    p.add_argument("--reward-zero-stage", default="", help="ZeRO stage of step 2 and of step 3's critic; default: "
                   "the preset's.", choices=["", "0", "1", "2", "3"])
    p.add_argument("--deployment-type", default="single_gpu", choices=DEPLOYMENTS,
                   help="single_gpu / single_node / multi_node (DeepSpeed-Chat's presets; multi_node reads "
                        "HOSTFILE) or cpu (this toolkit's offline demo presets).")
    p.add_argument("--output-dir", default="./output", help="Where step1/, step2/, step3/, logs/ and report/ go.")
    p.add_argument("--dry_run", "--dry-run", action="store_true",
                   help="Pass --dry_run to every step: check options, data and model configs, print each step's "
                        "plan and peak-memory estimate, train nothing.")
    p.add_argument("--force", action="store_true", help="Rerun steps that already finished.")
    return p.parse_args(argv)


# DeepSpeed-Chat's e2e_rlhf.py takes OPT sizes ("--actor-model 1.3b --reward-model 350m"); they still work
UPSTREAM_SIZES = ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")


def hub_name(model: str) -> str:
    return f"facebook/opt-{model}" if model.lower() in UPSTREAM_SIZES else model


def model_family(actor_model: str) -> str:
    """The preset family: llama for Llama-style names, else OPT (DeepSpeed-Chat's two script families)."""
    return "llama" if "llama" in actor_model.lower() else "opt"


def preset_script(step: int, deployment: str, family: str) -> str:
    base = os.path.join(REPO, STEP_DIRS[step], "training_scripts")
    if deployment == "cpu":
        return os.path.join(base, "demo.sh")
    return os.path.join(base, family, f"{deployment}.sh")


def _has_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _default_model(args, role: str) -> str:
    if args.deployment_type == "cpu":
        return "smollm2-135m-instruct"
    return "facebook/opt-1.3b" if role == "actor" else "facebook/opt-350m"


def step_args(step: int, args, out: str) -> list[str]:
    """The preset's positional arguments, then the flags that override its defaults (later flags win)."""
    s1, s2, s3 = (os.path.join(out, f"step{i}") for i in (1, 2, 3))
    cpu = args.deployment_type == "cpu"
    planning = args.dry_run  # a dry run of steps not yet run plans from the base models instead of their outputs
    flags = []
    if step == 1:
        pos = [s1] if cpu else [s1, args.actor_zero_stage]
        flags += ["--model_name_or_path", args.actor_model] if args.actor_model else []
        flags += ["--zero_stage", args.actor_zero_stage] if cpu and args.actor_zero_stage else []
    elif step == 2:
        pos = [s1, s2] if cpu else [s2, args.reward_zero_stage]
        base = args.reward_model or (args.actor_model or _default_model(args, "actor")
                                     if cpu and planning and not _has_model(s1) else "")
        flags += ["--model_name_or_path", base] if base else []
        flags += ["--zero_stage", args.reward_zero_stage] if cpu and args.reward_zero_stage else []
    else:
        pos = [s1, s2, s3] + ([] if cpu else [args.actor_zero_stage, args.reward_zero_stage])
        if planning and not _has_model(s1):
            flags += ["--actor_model_name_or_path", args.actor_model or _default_model(args, "actor")]
        if planning and not _has_model(s2):
            # the CPU demo's reward model starts from the step-1 model, so its stand-in is the actor's base
            critic = args.reward_model or (args.actor_model if cpu else "") or _default_model(args, "reward")
            flags += ["--critic_model_name_or_path", critic]
        flags += ["--actor_zero_stage", args.actor_zero_stage] if cpu and args.actor_zero_stage else []
        flags += ["--critic_zero_stage", args.reward_zero_stage] if cpu and args.reward_zero_stage else []
    return pos + flags + (["--dry_run"] if args.dry_run else [])


def marker_path(out: str, step: int) -> str:
    return os.path.join(out, ".e2e", f"step{step}.done")


def run_logged(cmd: list[str], log_path: str) -> int:
    """Run `cmd`, its stdout+stderr both to the console and to `log_path`; returns its exit code."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # chunks, not lines: progress bars use \r
            log.write(chunk)
            log.flush()
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        return proc.wait()


def run_step(step: int, args, out: str) -> tuple[int, float]:
    family = model_family(args.actor_model or "opt")
    script = preset_script(step, args.deployment_type, family)
    if not os.path.isfile(script):
        print(f"error: no preset {os.path.relpath(script, REPO)} for --deployment-type {args.deployment_type}",
              file=sys.stderr)
        return 2, 0.0
    cmd = ["bash", script] + step_args(step, args, out)
    log_path = os.path.join(out, "logs", f"step{step}.log")
    print(f"---=== step {step}: {os.path.relpath(script, REPO)} (log: {log_path}) ===---", flush=True)
    start = time.time()
    rc = run_logged(cmd, log_path)
    seconds = time.time() - start
    if rc == 0 and not args.dry_run:
        os.makedirs(os.path.dirname(marker_path(out, step)), exist_ok=True)
        with open(marker_path(out, step), "w") as f:
            json.dump({"step": step, "seconds": round(seconds, 1), "command": cmd}, f)
    return rc, seconds


def finished_seconds(out: str, step: int):
    """Wall seconds of a finished step (from its marker), None when it has not finished."""
    try:
        with open(marker_path(out, step)) as f:
            return json.load(f)["seconds"]
    except (OSError, ValueError, KeyError):
        return None


def heldout_check(out: str, base: str) -> None:
    """The CPU demo trains on the synthetic set, whose answers are exact: base, step-1 and step-3 models answer
    the same held-out prompts and inference.heldout counts the right ones by rule (OUTPUT/heldout_eval.json,
    shown by the report and the summary)."""
    if not _has_model(os.path.join(out, "step1")):
        return
    print("\n================ held-out answers, checked by rule ================", flush=True)
    stale = os.path.join(out, "heldout_eval.json")  # utils.report_tables.HELDOUT_FILE (the driver imports no torch)
    if os.path.exists(stale):  # an earlier run's models: never shown beside this run's
        os.remove(stale)
    if run_logged([sys.executable, "-m", "inference.heldout", out, "--base", base, "--quiet"],
                  os.path.join(out, "logs", "heldout.log")):
        print(f"(no held-out check: see {os.path.join(out, 'logs', 'heldout.log')}; the models are trained)",
              flush=True)


def wrap_up(out: str, times: dict, base: str | None = None) -> int:
    print("\n================ wall time per step ================", flush=True)
    for step, (seconds, how) in sorted(times.items()):
        print(f"step {step} ({STEP_DIRS[step]}): {seconds:.0f} s{how}", flush=True)
    print(f"total: {sum(s for s, _ in times.values()):.0f} s", flush=True)
    if base:
        heldout_check(out, base)
    if run_logged([sys.executable, "-m", "inference.report", "--logdir", out, "--out", os.path.join(out, "report")],
                  os.path.join(out, "logs", "report.log")):
        print("(no training report: the steps wrote no TensorBoard logs; the models are trained)", flush=True)
    print("\n================ what changed ================", flush=True)
    return run_logged([sys.executable, "-m", "inference.summary", out], os.path.join(out, "logs", "summary.log"))


def main(argv=None) -> int:
    args = parse_args(argv)
    args.actor_model, args.reward_model = hub_name(args.actor_model), hub_name(args.reward_model)
    out = os.path.abspath(args.output_dir)
    times = {}
    for step in sorted(set(args.step)):
        done = finished_seconds(out, step)
        if done is not None and not args.force and not args.dry_run:
            print(f"---=== step {step}: finished before ({done:.0f} s), skipped (--force reruns it) ===---",
                  flush=True)
            times[step] = (done, ", earlier run")
            continue
        rc, seconds = run_step(step, args, out)
        if rc != 0:
            print(f"error: step {step} failed with exit code {rc} after {seconds:.0f} s; see "
                  f"{os.path.join(out, 'logs', f'step{step}.log')}. Run the same command again to resume from "
                  f"step {step}.", file=sys.stderr, flush=True)
            return rc
        times[step] = (seconds, "")
    if args.dry_run:
        print("dry run: every step's plan is above; nothing was trained", flush=True)
        return 0
    # the demo's data is the synthetic set (exact answers); other presets train on Hub sets without them
    base = (args.actor_model or _default_model(args, "actor")) if args.deployment_type == "cpu" else None
    return wrap_up(out, times, base)


if __name__ == "__main__":
    sys.exit(main())
