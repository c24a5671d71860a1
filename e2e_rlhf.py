"""Run the three steps in order with DeepSpeed-Chat's driver flags: `python e2e_rlhf.py --step 1 2 3 ...`.

    python e2e_rlhf.py --step 1 2 3 --actor-model facebook/opt-1.3b --reward-model facebook/opt-350m \
        --deployment-type single_gpu --output-dir ./output
    python e2e_rlhf.py --deployment-type cpu                 # the offline CPU demo presets (SmolLM2-135M)
    python e2e_rlhf.py --deployment-type cpu --dry_run       # plan + memory estimate of each step, no training
    python e2e_rlhf.py --step2-algo dpo --deployment-type cpu  # step 1, then DPO instead of steps 2 and 3

Each step runs its preset script (STEP/training_scripts/{opt,llama}/DEPLOYMENT.sh - the family picked from the
actor model's name, as upstream picks by model - or STEP/training_scripts/demo.sh for `--deployment-type cpu`)
with the models and ZeRO stages given here. Outputs go to OUTPUT/step1, OUTPUT/step2 and OUTPUT/step3, each
step's console to OUTPUT/logs/stepN.log. A finished step leaves OUTPUT/.e2e/stepN.done; a rerun of the same
command skips finished steps (--force reruns them), so a half-finished pipeline resumes at the step that did
not finish (and that step resumes from its own last checkpoint, if it wrote any). The run ends with each
step's wall time, for the CPU demo the held-out answers of the base, step-1 and step-3 models checked by rule
(inference.heldout), the report (inference.report) and the cross-stage summary (inference.summary). A failed
step ends the driver with that step's exit code.

--step2-algo dpo runs step2_dpo as step 2 (DeepSpeed-Chat's step2_dpo_finetuning: the step-1 model as policy and,
frozen, as reference) and no step 3; its output, log and marker are OUTPUT/step2_dpo, logs/step2_dpo.log and
.e2e/step2_dpo.done, apart from the reward model's, so switching algorithms never skips or overwrites a step.
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
DPO_DIR = "step2_dpo"  # the stage dir and, in OUTPUT, the run's dir: step 2 of --step2-algo dpo
DEPLOYMENTS = ("single_gpu", "single_node", "multi_node", "cpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--step", type=int, nargs="+", default=None, choices=[1, 2, 3],
                   help="Which steps to run (in order 1, 2, 3 whatever order they are given in); default: 1 2 3, "
                        "or 1 2 with --step2-algo dpo.")
    p.add_argument("--step2-algo", default="rm", choices=["rm", "dpo"],
                   help="rm: step 2 trains a reward model and step 3 runs RL with it; dpo: step 2 is step2_dpo "
                        "(DPO of the step-1 model against a frozen copy of it) and there is no step 3.")
    p.add_argument("--actor-model", default="", help="Step-1 model (Hub name or local dir); default: the preset's "
                   "(facebook/opt-1.3b, or SmolLM2-135M-Instruct for --deployment-type cpu).")
    p.add_argument("--reward-model", default="", help="Step-2 base model; default: the preset's (facebook/opt-350m, "
                   "or the step-1 output for --deployment-type cpu).")
    p.add_argument("--actor-zero-stage", default="", help="ZeRO stage of step 1, of step 3's actor and of DPO's "
                   "policy; default: the preset's.", choices=["", "0", "1", "2", "3"])
    p.add_argument("--reward-zero-stage", default="", help="ZeRO stage of step 2's reward model and of step 3's "
                   "critic; default: the preset's.", choices=["", "0", "1", "2", "3"])
    p.add_argument("--deployment-type", default="single_gpu", choices=DEPLOYMENTS,
                   help="single_gpu / single_node / multi_node (DeepSpeed-Chat's presets; multi_node reads "
                        "HOSTFILE) or cpu (this toolkit's offline demo presets).")
    p.add_argument("--output-dir", default="./output", help="Where step1/, step2/, step3/, logs/ and report/ go.")
    p.add_argument("--dry_run", "--dry-run", action="store_true",
                   help="Pass --dry_run to every step: check options, data and model configs, print each step's "
                        "plan and peak-memory estimate, train nothing.")
    p.add_argument("--force", action="store_true", help="Rerun steps that already finished.")
    args = p.parse_args(argv)
    dpo = args.step2_algo == "dpo"
    if dpo and args.step and 3 in args.step:
        p.error("--step2-algo dpo has no step 3: DPO replaces the reward model and PPO (run --step 1 2)")
    if dpo and args.reward_model:  # DPO trains the step-1 model; a reward model given here would go unused
        p.error("--step2-algo dpo trains the step-1 model and needs no --reward-model")
    args.step = args.step or ([1, 2] if dpo else [1, 2, 3])
    return args


# DeepSpeed-Chat's e2e_rlhf.py takes OPT sizes ("--actor-model 1.3b --reward-model 350m"); they still work
UPSTREAM_SIZES = ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")


def hub_name(model: str) -> str:
    return f"facebook/opt-{model}" if model.lower() in UPSTREAM_SIZES else model


def model_family(actor_model: str) -> str:
    """The preset family: llama for Llama-style names, else OPT (DeepSpeed-Chat's two script families)."""
    return "llama" if "llama" in actor_model.lower() else "opt"


def stage_key(step: int, algo: str = "rm") -> str:
    """The name of a step's output dir, log and marker: stepN, or step2_dpo for DPO's step 2."""
    return DPO_DIR if step == 2 and algo == "dpo" else f"step{step}"


def stage_dir(step: int, algo: str = "rm") -> str:
    return DPO_DIR if step == 2 and algo == "dpo" else STEP_DIRS[step]


def preset_script(step: int, deployment: str, family: str, algo: str = "rm") -> str:
    base = os.path.join(REPO, stage_dir(step, algo), "training_scripts")
    if deployment == "cpu":
        return os.path.join(base, "demo.sh")
    return os.path.join(base, family, f"{deployment}.sh")


def _has_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _default_model(args, role: str) -> str:
    if args.deployment_type == "cpu":
        return "smollm2-135m-instruct"
    return "facebook/opt-1.3b" if role == "actor" else "facebook/opt-350m"


def dpo_args(args, out: str) -> list[str]:
    """step2_dpo's preset arguments (STEP1_DIR OUTPUT [ZERO_STAGE]): the step-1 model is policy and reference, and
    it is the actor, so --actor-zero-stage sets its ZeRO stage."""
    s1, s2 = os.path.join(out, "step1"), os.path.join(out, DPO_DIR)
    cpu = args.deployment_type == "cpu"
    pos = [s1, s2] if cpu else [s1, s2, args.actor_zero_stage]
    flags = []
    if args.dry_run and not _has_model(s1):  # plan from the base model that step 1 would start from
        flags += ["--model_name_or_path", args.actor_model or _default_model(args, "actor")]
    flags += ["--zero_stage", args.actor_zero_stage] if cpu and args.actor_zero_stage else []
    return pos + flags + (["--dry_run"] if args.dry_run else [])


def step_args(step: int, args, out: str) -> list[str]:
    """The preset's positional arguments, then the flags that override its defaults (later flags win)."""
    if step == 2 and args.step2_algo == "dpo":
        return dpo_args(args, out)
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


def marker_path(out: str, step: int, algo: str = "rm") -> str:
    return os.path.join(out, ".e2e", f"{stage_key(step, algo)}.done")


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
    algo = args.step2_algo
    script = preset_script(step, args.deployment_type, family, algo)
    if not os.path.isfile(script):
        print(f"error: no preset {os.path.relpath(script, REPO)} for --deployment-type {args.deployment_type}",
              file=sys.stderr)
        return 2, 0.0
    cmd = ["bash", script] + step_args(step, args, out)
    log_path = os.path.join(out, "logs", f"{stage_key(step, algo)}.log")
    print(f"---=== step {step}: {os.path.relpath(script, REPO)} (log: {log_path}) ===---", flush=True)
    start = time.time()
    rc = run_logged(cmd, log_path)
    seconds = time.time() - start
    if rc == 0 and not args.dry_run:
        os.makedirs(os.path.dirname(marker_path(out, step, algo)), exist_ok=True)
        with open(marker_path(out, step, algo), "w") as f:
            json.dump({"step": step, "seconds": round(seconds, 1), "command": cmd}, f)
    return rc, seconds


def finished_seconds(out: str, step: int, algo: str = "rm"):
    """Wall seconds of a finished step (from its marker), None when it has not finished."""
    try:
        with open(marker_path(out, step, algo)) as f:
            return json.load(f)["seconds"]
    except (OSError, ValueError, KeyError):
        return None


def plan_line(steps, algo: str) -> str:
    """The steps this run covers; with DPO, also why there is no step 3."""
    names = ", ".join(f"step {s} ({stage_dir(s, algo)})" for s in steps)
    why = "; no step 3: DPO trains the step-1 model (policy, and a frozen copy as reference) in place of the " \
          "reward model and PPO" if algo == "dpo" else ""
    return f"---=== plan: {names}{why} ===---"


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


def wrap_up(out: str, times: dict, algo: str = "rm", base: str | None = None) -> int:
    print("\n================ wall time per step ================", flush=True)
    for step, (seconds, how) in sorted(times.items()):
        print(f"step {step} ({stage_dir(step, algo)}): {seconds:.0f} s{how}", flush=True)
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
    times, algo = {}, args.step2_algo
    print(plan_line(sorted(set(args.step)), algo), flush=True)
    for step in sorted(set(args.step)):
        done = finished_seconds(out, step, algo)
        if done is not None and not args.force and not args.dry_run:
            print(f"---=== step {step}: finished before ({done:.0f} s), skipped (--force reruns it) ===---",
                  flush=True)
            times[step] = (done, ", earlier run")
            continue
        rc, seconds = run_step(step, args, out)
        if rc != 0:
            log = os.path.join(out, "logs", f"{stage_key(step, algo)}.log")
            print(f"error: step {step} failed with exit code {rc} after {seconds:.0f} s; see {log}. Run the same "
                  f"command again to resume from step {step}.", file=sys.stderr, flush=True)
            return rc
        times[step] = (seconds, "")
    if args.dry_run:
        print("dry run: every step's plan is above; nothing was trained"
              + (" (no step 3: DPO is the last step)" if algo == "dpo" else ""), flush=True)
        return 0
    # the demo's data is the synthetic set (exact answers); other presets train on Hub sets without them
    base = (args.actor_model or _default_model(args, "actor")) if args.deployment_type == "cpu" else None
    return wrap_up(out, times, algo, base)


if __name__ == "__main__":
    sys.exit(main())
