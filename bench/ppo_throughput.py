"""Step-3 throughput on workload W, ours against the peers, in one run; prints one JSON document.

Workload W (issues "Step 3" and "Speed and memory"): 64 prompts of hh_harmless_base_1500.jsonl after one
warm-up step, left-truncated to 128 tokens, exactly 64 new tokens each (sampling, T=1), batch 8, 1 PPO epoch,
1 process, 2 threads; actor = reference = SmolLM2-135M-Instruct, critic = reward = the same checkpoint with a
value head. GRPO: G=8, 8 prompts x 8 samples per step.

Every contender runs in its own subprocess, one after another (never concurrently), and its peak RSS is that
process's ru_maxrss (os.wait4). Ours is the product itself (RLHFConfig -> build_engines -> ExperienceMaker +
RLTrainer -> fit), driven with the same flags a user passes to step3_rlhf/main.py, under the allocator step 3
picks (tcmalloc where installed, utils/allocator.py); two extra runs of ours show what that allocator and
gradient checkpointing are worth (ours_ppo_bf16_glibc, ours_ppo_bf16_checkpointing). The bare decode loop
runs under the same allocator as ours; TRL runs as it ships (glibc). Peers: TRL's experimental PPOTrainer
(trl==1.12.0) and TRL 1.16's GRPOTrainer, each from its own `pip install --no-deps --target` dir on
PYTHONPATH (never a dependency of the toolkit), a bare PyTorch KV-cache decode loop and a matmul probe.

    flock /tmp/bench.lock python bench/ppo_throughput.py                 # everything (< 25 min on 2 cores)
    python bench/ppo_throughput.py --steps 2 --skip_peers --dtypes bf16  # a quick look at ours
Times: wall seconds (what the targets are about) and CPU seconds (robust when the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from bench.report import print_report  # noqa: E402

PEERS = os.path.join(REPO, "bench", "peers")
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "preference", "hh_harmless_base_1500.jsonl")
MODEL = "smollm2-135m-instruct"
TRL_PPO_VERSION, TRL_GRPO_VERSION = "1.12.0", "1.16.0"


# ----------------------------------------------------------------------------- workload
def w_flags(a, algo, dtype, steps, data, out_dir, value_dir):
    """The step-3 command-line flags of workload W (as a user would pass them to step3_rlhf/main.py)."""
    flags = ["--actor_model_name_or_path", MODEL, "--critic_model_name_or_path", value_dir, "--data_path", data,
             "--output_dir", out_dir, "--max_prompt_seq_len", "128", "--max_answer_seq_len", str(a.new_tokens),
             "--min_answer_seq_len", str(a.new_tokens), "--temperature", "1.0",
             "--per_device_generation_batch_size", "8", "--per_device_training_batch_size", "8",
             "--ppo_epochs", "1", "--threads", str(a.threads), "--dtype", dtype, "--max_steps", str(steps + 1),
             "--eval_prompts", "0", "--disable_progress_bar", "--no_resume", "--algo", algo]
    if algo == "grpo":
        flags += ["--num_generations", "8"]
    return flags + list(a.extra_flags)


def prepare(a):
    """The value-head checkpoint (critic = reward) and W's prompts as token ids, made once in the work dir."""
    import torch
    from step3_rlhf.config import RLHFConfig
    from step3_rlhf.prompt_data import load_prompts
    from utils.models import load_tokenizer, load_value_model, save_hf_model
    from utils.options import parse_config
    os.makedirs(a.workdir, exist_ok=True)
    value_dir = os.path.join(a.workdir, "value_model")
    if not os.path.exists(os.path.join(value_dir, "model.safetensors")):
        save_hf_model(load_value_model(MODEL, dtype=torch.float32), load_tokenizer(MODEL), value_dir)
    prompts_path = os.path.join(a.workdir, "prompts.json")
    cfg = parse_config(RLHFConfig, w_flags(a, "ppo", "fp32", 0, a.data, os.path.join(a.workdir, "prep"), value_dir))
    items, _ = load_prompts(cfg, load_tokenizer(MODEL), _Quiet())
    n = 8 * (max(a.steps, a.grpo_steps) + 1)
    if len(items) < n:
        raise SystemExit(f"{a.data}: only {len(items)} step-3 prompts, W needs {n}")
    with open(prompts_path, "w") as f:
        json.dump([it["prompt_input_ids"] for it in items[:n]], f)
    return value_dir, prompts_path


class _Quiet:
    def info(self, msg):
        pass


# ----------------------------------------------------------------------------- ours (runs in a child)
def run_ours(a):
    """One contender of ours, in this (child) process: the product's own trainer on W; prints one JSON line."""
    import resource
    import time as _time
    from contextlib import contextmanager
    from functools import partial

    from step3_rlhf.config import RLHFConfig
    from step3_rlhf.engines import build_engines
    from step3_rlhf.experience_maker import ExperienceMaker
    from step3_rlhf.loop import fit
    from step3_rlhf.main import plan_steps
    from step3_rlhf.prompt_data import collate_prompts
    from step3_rlhf.trainer import RLTrainer
    from utils.allocator import active_allocator
    from utils.models import load_tokenizer, unwrap
    from utils.options import parse_config
    from utils.stage import start_stage

    steps = a.steps if a.algo == "ppo" else a.grpo_steps
    cfg = parse_config(RLHFConfig, w_flags(a, a.algo, a.dtype, steps, a.data,
                                           os.path.join(a.workdir, f"ours_{a.algo}_{a.dtype}"), a.value_dir))
    ctx = start_stage(cfg)
    tok = load_tokenizer(MODEL)
    with open(a.prompts) as f:
        ids = json.load(f)[: 8 * (steps + 1)]
    items = [{"prompt_input_ids": p, "prompt": tok.decode(p), "meta": {}} for p in ids]
    _, actor_updates, _ = plan_steps(cfg, len(items), 1)
    engines = build_engines(cfg, ctx, actor_updates, ctx.log)
    maker = ExperienceMaker(cfg, engines, tok, ctx, partial(collate_prompts, pad_id=tok.pad_token_id))
    trainer = RLTrainer(cfg, engines, ctx)

    cpu = {}  # CPU seconds per timer, beside the logger's wall seconds
    wall_timer = ctx.log.timer

    @contextmanager
    def dual_timer(name):
        c = _time.process_time()
        with wall_timer(name):
            yield
        cpu[name] = cpu.get(name, 0.0) + _time.process_time() - c

    ctx.log.timer = dual_timer
    tokens = []  # real (unpadded) tokens per experience batch, for the FLOP rates
    make = maker.make_experience

    def counted(batch, *args, **kw):
        exp = make(batch, *args, **kw)
        tokens.append(int(exp.attention_mask.sum()))
        return exp

    maker.make_experience = counted
    cpu_per_step = []
    pop = ctx.log.pop_timers

    def pop_both():
        cpu_per_step.append({k: v for k, v in cpu.items()})
        cpu.clear()
        return pop()

    ctx.log.pop_timers = pop_both
    history = fit(maker, trainer, items, steps + 1)
    timed, timed_cpu, timed_tokens = history[1:], cpu_per_step[1:], tokens[1:]
    phases = ("generation", "experience", "training")
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    sec = {p: mean([h.get(f"time/{p}", 0.0) for h in timed]) for p in phases}
    cpu_sec = {p: mean([c.get(f"time/{p}", 0.0) for c in timed_cpu]) for p in phases}
    total = sum(sec.values())
    samples = 8 * cfg.num_generations
    count = lambda engine: sum(p.numel() for p in unwrap(engine).parameters())  # noqa: E731
    actor = count(engines.actor)
    reward = count(engines.reward_fn.reward_engine) if engines.reward_fn.reward_engine is not None else 0
    critic = count(engines.critic) if engines.critic is not None else 0
    reused = maker.reuses_policy_forward(samples)
    ref = actor if (engines.reference is not None or engines.reference_is_lora_off) else 0
    # passes actually run per step: no-grad forwards in the experience phase, forward+backward of the trained
    # models (the actor's forward is in the experience phase when it is reused there)
    out = {"name": f"ours_{a.algo}", "dtype": a.dtype, "steps": len(timed), "samples_per_step": samples,
           "sec_per_step": total, "phase_sec_per_step": sec, "phase_cpu_sec_per_step": cpu_sec,
           "step_seconds": [sum(h.get(f"time/{p}", 0.0) for p in phases) for h in timed],
           "samples_per_s": samples / total, "gen_tokens_per_s": samples * a.new_tokens / sec["generation"],
           "gen_sec_per_batch_of_8": sec["generation"] / cfg.num_generations,
           "tokens_per_step": mean(timed_tokens), "reuses_policy_forward": reused,
           "params": {"actor": actor, "critic": critic, "reference": ref, "reward": reward},
           "no_grad_forward_params": [x for x in (ref, critic, reward) if x] + ([] if reused else [actor]),
           "trained_params": [x for x in (actor, critic) if x],
           "reward_mean_first_last": [history[0]["reward/mean"], history[-1]["reward/mean"]],
           "peak_rss_gb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
           "allocator": active_allocator(), "attention": unwrap(engines.actor).config._attn_implementation}
    print(json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- the parent
def run_child(name, cmd, env=None):
    """Runs one contender; returns its JSON (last stdout line) plus wall time and peak RSS (os.wait4)."""
    t = time.perf_counter()
    out_path, log_path = (os.path.join(ARGS.workdir, f"{name}.{ext}") for ext in ("out", "log"))
    with open(out_path, "w") as out, open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=out, stderr=log, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage, not the sum over all children
    code = os.waitstatus_to_exitcode(status)
    with open(out_path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.startswith("{")]
    if code != 0 or not lines:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        return {"name": name, "error": f"exit {code}", "log_tail": tail, "log": log_path}
    result = json.loads(lines[-1])
    result["process_wall_s"] = round(time.perf_counter() - t, 1)
    result["peak_rss_gb"] = round(usage.ru_maxrss / 2 ** 20, 3)  # ru_maxrss is in KiB on Linux
    return result


def summarize(results, dtypes, a):
    """The report: every contender, and the ratios the issue's targets are about."""
    get = lambda name: results.get(name) if results.get(name) and "error" not in results[name] else None  # noqa
    best = lambda prefix: max((r for d in dtypes if (r := get(f"{prefix}_{d}"))), default=None,  # noqa: E731
                              key=lambda r: r["samples_per_s"])
    ratios, targets = {}, {}
    ours, trl = best("ours_ppo"), best("trl_ppo")
    if ours and trl:
        ratios["ppo_samples_per_s_ours_over_trl"] = ours["samples_per_s"] / trl["samples_per_s"]
        ratios["ppo_peak_rss_ours_over_trl"] = ours["peak_rss_gb"] / trl["peak_rss_gb"]
        targets["ppo_2x_trl"] = ratios["ppo_samples_per_s_ours_over_trl"] >= 2
        targets["rss_half_of_trl"] = ratios["ppo_peak_rss_ours_over_trl"] <= 0.5
        ratios["best_dtype"] = {"ours": ours["dtype"], "trl_ppo": trl["dtype"]}
    for d in dtypes:
        o, t = get(f"ours_ppo_{d}"), get(f"trl_ppo_{d}")
        if o and t:
            ratios[f"ppo_samples_per_s_ours_over_trl_{d}"] = o["samples_per_s"] / t["samples_per_s"]
            ratios[f"ppo_peak_rss_ours_over_trl_{d}"] = o["peak_rss_gb"] / t["peak_rss_gb"]
    mm = get("matmul")
    ckpt = get("ours_ppo_bf16_checkpointing")
    if ckpt and trl:  # every PPO target for this one configuration too
        ratios["ppo_peak_rss_ours_checkpointing_over_trl"] = ckpt["peak_rss_gb"] / trl["peak_rss_gb"]
        ratios["ppo_samples_per_s_ours_checkpointing_over_trl"] = ckpt["samples_per_s"] / trl["samples_per_s"]
        checks = {"ppo_2x_trl": ratios["ppo_samples_per_s_ours_checkpointing_over_trl"] >= 2,
                  "rss_half_of_trl": ratios["ppo_peak_rss_ours_checkpointing_over_trl"] <= 0.5}
        more_ratios, more_checks = speed_checks(ckpt, get("bare_decode_bf16"), mm and mm["bf16"])
        ratios.update({f"{k}_checkpointing": v for k, v in more_ratios.items()})
        targets["with_checkpointing"] = {**checks, **more_checks}
    glibc = get("ours_ppo_bf16_glibc")
    if glibc and trl:
        ratios["ppo_peak_rss_ours_glibc_over_trl"] = glibc["peak_rss_gb"] / trl["peak_rss_gb"]
        ratios["ppo_samples_per_s_ours_glibc_over_trl"] = glibc["samples_per_s"] / trl["samples_per_s"]
    og, tg = get(f"ours_grpo_{a.grpo_dtype}"), get(f"trl_grpo_{a.grpo_dtype}")
    if og and tg:
        ratios["grpo_samples_per_s_ours_over_trl"] = og["samples_per_s"] / tg["samples_per_s"]
        targets["grpo_2x_trl"] = ratios["grpo_samples_per_s_ours_over_trl"] >= 2
    for d in dtypes:
        o = get(f"ours_ppo_{d}")
        if o:
            more_ratios, more_checks = speed_checks(o, get(f"bare_decode_{d}"), mm and mm[d])
            ratios.update({f"{k}_{d}": v for k, v in more_ratios.items()})
            targets.update({f"{k}_{d}": v for k, v in more_checks.items()})
    return {"workload": {"prompts": 8 * a.steps, "warmup_steps": 1, "max_prompt_tokens": 128,
                         "new_tokens": a.new_tokens, "batch": 8, "ppo_epochs": 1, "threads": a.threads,
                         "model": MODEL, "grpo": {"prompts_per_step": 8, "G": 8, "steps": a.grpo_steps}},
            "results": results, "ratios": ratios, "targets_met": targets}


def speed_checks(run, bare, matmul_rate):
    """Generation against the bare decode loop and the phases after it against the matmul rate, for one run of
    ours: (ratios, target checks), each left out when its reference did not run."""
    ratios, checks = {}, {}
    if bare:
        ratios["generation_over_bare_decode"] = run["gen_sec_per_batch_of_8"] / bare["sec_per_batch"]
        checks["generation_within_1.25x_bare"] = ratios["generation_over_bare_decode"] <= 1.25
    if matmul_rate:
        run["flop_rates_gflops"] = rates = flop_rates(run)
        for phase in rates:
            ratios[f"{phase}_flop_rate_over_matmul"] = rates[phase] / matmul_rate
        checks["training_50pct_matmul"] = ratios["experience_and_training_flop_rate_over_matmul"] >= 0.5
    return ratios, checks


def flop_rates(r):
    """GFLOP/s of the phases after generation, counting 6 x params x tokens per trained model and 2 x params x
    tokens per forward-only pass (tokens = the real, unpadded tokens of the step's sequences), on the passes
    actually run (a reused actor forward is counted once, in the experience phase where it runs)."""
    n_tok, sec = r["tokens_per_step"], r["phase_sec_per_step"]
    shifted = 2 * r["params"]["actor"] * n_tok if r["reuses_policy_forward"] else 0
    exp_flops = 2 * sum(r["no_grad_forward_params"]) * n_tok + shifted
    train_flops = 6 * sum(r["trained_params"]) * n_tok - shifted
    return {"training": train_flops / sec["training"] / 1e9, "experience": exp_flops / sec["experience"] / 1e9,
            "experience_and_training": (exp_flops + train_flops) / (sec["training"] + sec["experience"]) / 1e9}


def trl_env(version):
    target = os.path.join(ARGS.trl_root, f"trl{version.replace('.', '')}")
    if not os.path.isdir(os.path.join(target, "trl")):
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, f"trl=={version}"]
        subprocess.run(cmd, check=True)  # --no-deps: pip never touches torch; trl's own deps are installed here
    env = dict(os.environ, PYTHONPATH=target, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    return env


def main(argv=None):
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="hh_harmless_base_1500.jsonl")
    ap.add_argument("--steps", type=int, default=8, help="timed PPO steps (of 8 prompts) after a warm-up step")
    ap.add_argument("--grpo_steps", type=int, default=1, help="timed GRPO steps (8 prompts x 8) after a warm-up")
    ap.add_argument("--peer_steps", type=int, default=0, help="timed TRL PPO steps (default: --steps)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="dtypes of our PPO (and of TRL PPO)")
    ap.add_argument("--grpo_dtype", default="bf16")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip_peers", action="store_true", help="only ours (no TRL, bare decode, matmul)")
    ap.add_argument("--skip_grpo", action="store_true")
    ap.add_argument("--skip_glibc", action="store_true", help="no extra run of ours under glibc's malloc")
    ap.add_argument("--skip_lowmem", action="store_true", help="no extra run of ours with gradient checkpointing")
    ap.add_argument("--only", default="", help="comma list of contenders to run (names as in the JSON)")
    ap.add_argument("--workdir", default="/tmp/rlhfkit_bench")
    ap.add_argument("--trl_root", default="/tmp", help="where the trl==X target dirs are (or get installed)")
    ap.add_argument("--out", default="", help="also write the JSON here")
    ap.add_argument("--from_json", default="", help="re-summarize the results of an earlier run's JSON")
    ap.add_argument("--extra_flags", nargs=argparse.REMAINDER, default=[],
                    help="extra step-3 flags for our runs (last on the command line)")
    # child roles
    ap.add_argument("--role", default="", help=argparse.SUPPRESS)
    ap.add_argument("--algo", default="ppo", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    ap.add_argument("--value_dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", default="", help=argparse.SUPPRESS)
    a = ARGS = ap.parse_args(argv)
    if a.from_json:  # the summary of an earlier run's measurements (e.g. after the summary gained a ratio)
        with open(a.from_json) as f:
            report = summarize(json.load(f)["results"], [d for d in a.dtypes.split(",") if d], a)
        print(json.dumps(report, indent=2))
        return
    if a.role == "ours":
        from utils.allocator import use_tcmalloc
        use_tcmalloc()  # as step3_rlhf/main.py does (before torch is imported); --allocator system keeps glibc
        return run_ours(a)
    value_dir, prompts = prepare(a)
    dtypes = [d for d in a.dtypes.split(",") if d]
    py, me = sys.executable, os.path.abspath(__file__)
    common = ["--data", a.data, "--workdir", a.workdir, "--value_dir", value_dir, "--prompts", prompts,
              "--threads", str(a.threads), "--new_tokens", str(a.new_tokens), "--steps", str(a.steps),
              "--grpo_steps", str(a.grpo_steps)]
    extra = (["--extra_flags", *a.extra_flags] if a.extra_flags else [])
    plan = [(f"ours_ppo_{d}", [py, me, "--role", "ours", "--algo", "ppo", "--dtype", d, *common, *extra], None)
            for d in dtypes]
    if "bf16" in dtypes and not a.skip_glibc:  # ours under glibc's malloc too: what the allocator is worth
        plan.append(("ours_ppo_bf16_glibc", [py, me, "--role", "ours", "--algo", "ppo", "--dtype", "bf16", *common,
                                             *extra], "glibc"))
    if "bf16" in dtypes and not a.skip_lowmem:  # ours with gradient checkpointing: the memory it buys, its cost
        plan.append(("ours_ppo_bf16_checkpointing", [py, me, "--role", "ours", "--algo", "ppo", "--dtype", "bf16",
                                                     *common, "--extra_flags", *a.extra_flags,
                                                     "--actor_gradient_checkpointing",
                                                     "--critic_gradient_checkpointing"], None))
    if not a.skip_grpo:
        plan.append((f"ours_grpo_{a.grpo_dtype}", [py, me, "--role", "ours", "--algo", "grpo", "--dtype",
                                                   a.grpo_dtype, *common, *extra], None))
    if not a.skip_peers:
        model_dir = _model_dir()
        plan.append(("matmul", [py, os.path.join(PEERS, "matmul_rate.py"), "--threads", str(a.threads)], None))
        for d in dtypes:
            plan.append((f"bare_decode_{d}", [py, os.path.join(PEERS, "bare_decode.py"), "--model", model_dir,
                                              "--prompts", prompts, "--dtype", d, "--threads", str(a.threads),
                                              "--new_tokens", str(a.new_tokens)], "same_allocator"))
        peer_steps = str(a.peer_steps or a.steps)
        for d in dtypes:
            plan.append((f"trl_ppo_{d}", [py, os.path.join(PEERS, "trl_ppo.py"), "--policy", model_dir, "--value",
                                          value_dir, "--prompts", prompts, "--dtype", d, "--steps", peer_steps,
                                          "--threads", str(a.threads), "--new_tokens", str(a.new_tokens),
                                          "--output_dir", os.path.join(a.workdir, "trl_ppo")],
                         "ppo"))
        if not a.skip_grpo:
            plan.append((f"trl_grpo_{a.grpo_dtype}", [py, os.path.join(PEERS, "trl_grpo.py"), "--policy", model_dir,
                                                      "--reward", value_dir, "--prompts", prompts, "--dtype",
                                                      a.grpo_dtype, "--steps", str(a.grpo_steps), "--threads",
                                                      str(a.threads), "--new_tokens", str(a.new_tokens),
                                                      "--output_dir", os.path.join(a.workdir, "trl_grpo")], "grpo"))
    only = {x for x in a.only.split(",") if x}
    results = {}
    for name, cmd, env_kind in plan:  # env_kind: None, "glibc", "same_allocator", or the TRL "ppo"/"grpo"
        if only and name not in only:
            continue
        env = None
        if env_kind == "glibc":
            env = dict(os.environ, RLHFKIT_ALLOCATOR="system")
        elif env_kind == "same_allocator":  # the bare loop runs under the allocator our stages use
            from utils.allocator import find_tcmalloc
            lib = find_tcmalloc()
            env = dict(os.environ, LD_PRELOAD=lib) if lib and os.environ.get("RLHFKIT_ALLOCATOR") != "system" else None
        elif env_kind:
            try:
                env = trl_env(TRL_PPO_VERSION if env_kind == "ppo" else TRL_GRPO_VERSION)
            except subprocess.CalledProcessError as e:
                results[name] = {"name": name, "error": f"pip install failed: {e}"}
                continue
        print(f"[bench] running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_child(name, cmd, env)
        print(f"[bench] {name}: {json.dumps(_brief(results[name]))}", file=sys.stderr, flush=True)
    report = summarize(results, dtypes, a)
    print_report(report, a.out, indent=2)


def _brief(r):
    keys = ("sec_per_step", "samples_per_s", "peak_rss_gb", "phase_sec_per_step", "sec_per_batch", "fp32", "bf16",
            "error")
    return {k: r[k] for k in keys if k in r}


def _model_dir():
    from utils.models import resolve_model_path
    return resolve_model_path(MODEL)


ARGS = None

if __name__ == "__main__":
    main()
