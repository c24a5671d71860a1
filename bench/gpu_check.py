#!/usr/bin/env python3
"""GPU check: the three stages through the `deepspeed` launcher on one CUDA GPU, and DeepSpeed's hybrid engine
against the model's own generate() on the same weights. Prints JSON (and writes it to --out after every phase,
so a run stopped part-way still reports what it got).

No Hub access is needed: the models are built from configs with random weights - SmolLM2-135M's shape (the
offline default, a LLaMA family with grouped-query attention), the same with one key/value head per query
head, and an OPT-125m shape (the family DeepSpeed-Chat's hybrid engine was written for) - all with the
tokenizer in --tokenizer. Step 1 trains the SmolLM2-shaped model on the built-in synthetic set, so the
weights step 2, step 3 and the fidelity check start from produce text with structure.

Hybrid-engine fidelity: both backends sample (T 1) and decode greedily from the same prompts with the same
weights; the sampled tokens are then scored by the training forward. If the inference kernels compute the
model, their samples' mean log-prob matches generate()'s (up to sampling noise) and greedy decodes agree on
most tokens (bf16 kernels round differently, so a late divergence is expected).

  python bench/gpu_check.py --tokenizer DIR --work_dir /tmp/gpu_check --out gpu_check.json [--budget_s 480]

DIR holds SmolLM2-135M-Instruct's tokenizer files and config.json (the converted model's folder minus its weights,
3.5 MB). On a machine without DeepSpeed, install a `DS_BUILD_OPS=0 pip wheel deepspeed` wheel with hjson and
pydantic first (its kernels compile there on first use; TORCH_CUDA_ARCH_LIST=9.0 keeps that to one target).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", help="A folder with the tokenizer files (SmolLM2-135M-Instruct's).")
    p.add_argument("--work_dir", default="/tmp/gpu_check")
    p.add_argument("--out", default="", help="Also write the JSON here.")
    p.add_argument("--budget_s", type=float, default=480, help="Skip phases that would start after this.")
    p.add_argument("--sft_steps", type=int, default=150)
    p.add_argument("--rm_steps", type=int, default=40)
    p.add_argument("--ppo_steps", type=int, default=8)
    p.add_argument("--rm_zero_stage", type=int, default=3)
    p.add_argument("--skip_fidelity", action="store_true", help="Only the stages (the fidelity check run before).")
    p.add_argument("--rm_chunk_compare", action="store_true",
                   help="Also run step 2 with --forward_chunk 4 (the CPU default), to time it against the GPU's 0.")
    p.add_argument("--fidelity", default="", help=argparse.SUPPRESS)  # internal: one model's fidelity check
    p.add_argument("--zero_stage", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--plain_only", action="store_true", help=argparse.SUPPRESS)  # CPU dry run of the check
    return p.parse_args(argv)


# ---------------------------------------------------------------- models with random weights
def make_model(kind, tokenizer_dir, out_dir, seed=0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, OPTConfig
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if kind == "opt":
        config = OPTConfig(vocab_size=len(tok), hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                           num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                           dropout=0.0, attention_dropout=0.0)
    else:
        config = AutoConfig.from_pretrained(tokenizer_dir)  # SmolLM2-135M's config.json
        if kind == "llama_mha":
            config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- one model's fidelity (its own process)
def fidelity(model_dir, zero_stage, plain_only=False, n_prompts=32, new_tokens=48, seed=0):
    import torch
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29611"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                 ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    import deepspeed
    deepspeed.init_distributed()
    from step3_rlhf.config import RLHFConfig
    from step3_rlhf.rollout.hf_generate import HFRollout
    from step3_rlhf.rollout.hybrid_engine import HybridRollout
    from utils.data.synthetic import make_synthetic_preferences
    from utils.engine import build_train_engine
    from utils.losses import gather_logprobs
    from utils.models import load_causal_lm, load_tokenizer, unwrap

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16
    tok = load_tokenizer(model_dir)
    tok.padding_side = "left"
    rows = make_synthetic_preferences(n_prompts, seed=seed)
    prompts = [tok.apply_chat_template(list(r.prompt), tokenize=False, add_generation_prompt=True) for r in rows]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    model = load_causal_lm(model_dir, dtype=dtype)
    use_hybrid = cuda and not plain_only
    engine = build_train_engine(model, lr=1e-6, weight_decay=0.0, total_steps=1, warmup_steps=0,
                                scheduler="constant", micro_batch=n_prompts, grad_accum=1, world_size=1,
                                zero_stage=zero_stage, offload=False, dtype=dtype, grad_clip=1.0,
                                enable_hybrid_engine=use_hybrid,
                                max_out_tokens=batch["input_ids"].shape[1] + new_tokens)
    device = engine.device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    out = {"engine": type(engine).__name__, "zero_stage": zero_stage, "prompts": n_prompts,
           "prompt_tokens_max": int(ids.shape[1]), "new_tokens": new_tokens,
           "inference_containers": len(getattr(engine, "_inference_containers", []) or [])}
    backends = {"hf": HFRollout}
    if use_hybrid:
        out["hybrid_why_not"] = HybridRollout.why_not(engine, use_hybrid=True)
        backends["hybrid"] = HybridRollout

    def score(seqs, action_mask):
        """Mean log-prob per generated token under the training forward (engine.train() + module eval())."""
        engine.train()
        unwrap(engine).eval()
        with torch.no_grad():
            full_mask = torch.cat([mask, action_mask.long()], dim=1)
            logits = engine(input_ids=seqs, attention_mask=full_mask).logits.float()
            lp = gather_logprobs(logits[:, ids.shape[1] - 1:-1], seqs[:, ids.shape[1]:])
        return float((lp * action_mask).sum() / action_mask.sum().clamp(min=1))

    greedy = {}
    for name, cls in backends.items():
        res = {}
        for mode, temp in (("sample", 1.0), ("greedy", 0.0)):
            cfg = RLHFConfig(actor_model_name_or_path=model_dir, critic_model_name_or_path=model_dir,
                             max_answer_seq_len=new_tokens, temperature=temp, top_k=0, top_p=1.0,
                             min_answer_seq_len=new_tokens if mode == "sample" else 0)
            roll = cls(cfg, engine, tok)
            torch.manual_seed(seed)
            try:
                roll.generate(ids[:2], mask[:2])  # warm-up (kernel builds, caches)
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                seqs, amask = roll.generate(ids, mask)[:2]
                if cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            except Exception as e:  # the check reports a broken backend instead of stopping
                res[mode] = {"error": f"{type(e).__name__}: {e}"[:400]}
                continue
            n_tok = int(amask.sum())
            res[mode] = {"seconds": round(dt, 3), "tokens": n_tok, "tokens_per_second": round(n_tok / dt, 1)}
            if mode == "sample":
                res[mode]["mean_logprob"] = round(score(seqs, amask), 4)
            else:
                greedy[name] = seqs[:, ids.shape[1]:]
                res[mode]["first_answer"] = tok.decode(greedy[name][0], skip_special_tokens=True)[:200]
        out[name] = res
    if "hybrid" in greedy and "hf" in greedy:
        a, b = greedy["hybrid"], greedy["hf"]
        n = min(a.shape[1], b.shape[1])
        same = (a[:, :n] == b[:, :n]).long()
        prefix = same.cumprod(dim=1).sum(dim=1).float()  # tokens equal before the first difference
        out["greedy_equal_prefix_mean"] = round(float(prefix.mean()), 2)
        out["greedy_identical_rows"] = int((prefix == n).sum())
    if cuda:
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    return out


# ---------------------------------------------------------------- the driver
def run_logged(cmd, log_path, timeout):
    t0 = time.time()
    with open(log_path, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    with open(log_path, errors="replace") as f:
        tail = f.read()[-1500:]
    return rc, round(time.time() - t0, 1), tail


def launcher():
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29612"]


def stage_summary(out_dir):
    path = os.path.join(out_dir, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        s = json.load(f)
    hist = s.get("history") or []
    keep = {k: v for k, v in s.items() if not isinstance(v, (list, dict))}
    if hist:
        last = hist[-1]
        keep["last"] = {k: last[k] for k in sorted(last) if k.startswith(("time/", "reward/mean", "kl/mean",
                                                                          "loss/", "response/length"))}
        keep["generation_seconds_mean"] = round(sum(h.get("time/generation", 0) for h in hist[1:]) /
                                                max(len(hist) - 1, 1), 3)  # the first step builds kernels
    return keep


def grep(path, *needles):
    with open(path, errors="replace") as f:
        return [line.strip()[:300] for line in f if any(n in line for n in needles)
                and "launch.py" not in line and "runner.py" not in line][:6]  # not the launcher's command lines


def main(argv=None):
    args = parse_args(argv)
    if args.fidelity:
        print("FIDELITY " + json.dumps(fidelity(args.fidelity, args.zero_stage, args.plain_only)))
        return 0
    import torch
    t_start = time.time()
    os.makedirs(args.work_dir, exist_ok=True)
    logs = os.path.join(args.work_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    report = {"env": {"python": sys.version.split()[0], "torch": torch.__version__,
                      "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                      else None}}
    try:
        import deepspeed
        import transformers
        report["env"].update(deepspeed=deepspeed.__version__, transformers=transformers.__version__)
        from deepspeed.accelerator import get_accelerator
        report["env"]["accelerator"] = get_accelerator().device_name()
    except Exception as e:
        report["env"]["import_error"] = repr(e)[:300]

    def save():
        report["wall_seconds"] = round(time.time() - t_start, 1)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)

    def left():
        return args.budget_s - (time.time() - t_start)

    models = os.path.join(args.work_dir, "models")
    report["models"] = {}
    for kind in ("llama_gqa", "llama_mha", "opt"):
        d = os.path.join(models, kind)
        try:
            report["models"][kind] = {"parameters": make_model(kind, args.tokenizer, d)}
        except Exception as e:
            report["models"][kind] = {"error": repr(e)[:300]}
    save()

    w = args.work_dir
    s1, s2 = os.path.join(w, "step1"), os.path.join(w, "step2")
    data = ["--data_path", "synthetic", "--data_split", "2,4,4", "--dtype", "auto", "--seed", "1234"]
    stages = [
        ("step1_zero2", launcher() + ["step1_sft/main.py", "--model_name_or_path", os.path.join(models, "llama_gqa"),
                                      "--max_seq_len", "128", "--per_device_train_batch_size", "16",
                                      "--learning_rate", "1e-3", "--lr_scheduler_type", "cosine",
                                      "--num_warmup_steps", str(args.sft_steps // 10),
                                      "--max_steps", str(args.sft_steps),
                                      "--max_eval_samples", "64", "--zero_stage", "2", "--output_dir", s1] + data, s1),
    ]
    step2 = ["step2_reward_model/main.py", "--model_name_or_path", s1, "--max_seq_len", "128",
             "--per_device_train_batch_size", "16", "--learning_rate", "5e-5", "--max_steps", str(args.rm_steps),
             "--zero_stage", str(args.rm_zero_stage)] + data
    stages.append((f"step2_zero{args.rm_zero_stage}", launcher() + step2 + ["--output_dir", s2], s2))
    if args.rm_chunk_compare:  # the CPU default's chunks of 4 against the GPU default (one forward per batch)
        out = os.path.join(w, "step2_chunk4")
        stages.append((f"step2_zero{args.rm_zero_stage}_chunk4",
                       launcher() + step2 + ["--forward_chunk", "4", "--output_dir", out], out))
    ppo = ["step3_rlhf/main.py", "--actor_model_name_or_path", s1, "--critic_model_name_or_path", s2,
           "--max_prompt_seq_len", "96", "--max_answer_seq_len", "48", "--per_device_generation_batch_size", "32",
           "--per_device_training_batch_size", "16", "--actor_learning_rate", "1e-5", "--critic_learning_rate",
           "3e-5", "--max_steps", str(args.ppo_steps), "--temperature", "1.0", "--eval_prompts", "0"] + data
    for label, extra in (("step3_ppo_hybrid_zero2", ["--enable_hybrid_engine", "--actor_zero_stage", "2",
                                                     "--critic_zero_stage", "2"]),
                         ("step3_ppo_plain_zero2", ["--actor_zero_stage", "2", "--critic_zero_stage", "2"]),
                         ("step3_grpo_hybrid_zero3", ["--algo", "grpo", "--num_generations", "4",
                                                      "--enable_hybrid_engine", "--actor_zero_stage", "3"])):
        out = os.path.join(w, label)
        stages.append((label, launcher() + ppo + extra + ["--output_dir", out], out))

    # the SFT model first: the fidelity check means most on weights whose outputs have structure
    plan = [("stage",) + stages[0], ("fidelity", "llama_gqa_sft", s1, 2),
            ("fidelity", "opt", os.path.join(models, "opt"), 2),
            ("fidelity", "llama_mha", os.path.join(models, "llama_mha"), 2)] + \
        [("stage",) + st for st in stages[1:]] + [("fidelity", "llama_gqa_sft_zero3", s1, 3)]
    if args.skip_fidelity:
        plan = [item for item in plan if item[0] != "fidelity"]
    for item in plan:
        if left() < 45:
            report.setdefault("skipped", []).append(item[1])
            continue
        if item[0] == "fidelity":
            _, kind, model_dir, zs = item
            cmd_f = [sys.executable, os.path.abspath(__file__), "--fidelity", model_dir, "--zero_stage", str(zs)]
            rc, secs, tail = run_logged(cmd_f, os.path.join(logs, f"fidelity_{kind}.log"), min(left(), 300))
            found = [ln for ln in tail.splitlines() if ln.startswith("FIDELITY ")]
            report.setdefault("hybrid_fidelity", {})[kind] = (
                {**json.loads(found[-1][9:]), "seconds": secs} if found and rc == 0
                else {"rc": rc, "seconds": secs, "tail": tail[-800:]})
            save()
            continue
        _, label, cmd, out = item
        log = os.path.join(logs, f"{label}.log")
        rc, secs, tail = run_logged(cmd, log, left())
        entry = {"rc": rc, "seconds": secs, **stage_summary(out),
                 "notices": grep(log, "generation backend", "hybrid", "Hybrid", "peak", "eval loss", "accuracy",
                                 "Error", "error")}
        if rc != 0:
            entry["tail"] = tail[-800:]
        report.setdefault("stages", {})[label] = entry
        save()
    save()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
