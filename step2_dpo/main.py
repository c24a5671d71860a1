"""Step 2 by DPO: the step-1 model trained on chosen/rejected pairs against a frozen reference (a copy of
itself), instead of a reward model and step 3 (DeepSpeed-Chat's training/step2_dpo_finetuning).

    deepspeed step2_dpo/main.py --data_path Dahoas/rm-static --model_name_or_path out/actor --beta 0.1 ...
    python step2_dpo/main.py --model_name_or_path output/demo/step1   # offline CPU
The loss math is in utils/preference_losses.py; the output is a causal LM in HF format (AutoModelForCausalLM).
"""
import functools
import os
import sys
import time

if __package__ in (None, ""):  # `python step2_dpo/main.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # before torch is imported: re-exec once under tcmalloc where the machine has it
    from utils.allocator import use_tcmalloc
    use_tcmalloc()

import math  # noqa: E402

import torch  # noqa: E402

from step2_dpo.config import DPOConfig  # noqa: E402
from step2_dpo.plan import dpo_plan  # noqa: E402
from utils.data.datasets import collate_pairs  # noqa: E402
from utils.data.pipeline import pair_datasets  # noqa: E402
from utils.engine import build_frozen_engine, build_supervised_engine  # noqa: E402
from utils.models import load_causal_lm, load_tokenizer, save_hf_model  # noqa: E402
from utils.options import parse_config  # noqa: E402
from utils.plan import dry_run  # noqa: E402
from utils.preference_losses import dpo_loss, pairwise_outcomes, sequence_logprobs  # noqa: E402
from utils.stage import finish_stage, run_main, start_stage  # noqa: E402
from utils.train_loop import steps_per_epoch, train  # noqa: E402


def collate_dpo(batch, pad_id):
    """collate_pairs' [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] right-padded batch, plus loss_mask:
    1 on each row's reply tokens (from its prompt_len to its end), 0 on the prompt and on padding."""
    out = collate_pairs(batch, pad_id)
    prompt_len = torch.tensor([b["prompt_len"] for b in batch] * 2).unsqueeze(-1)
    cols = torch.arange(out["input_ids"].shape[1]).unsqueeze(0)
    out["loss_mask"] = out["attention_mask"] * (cols >= prompt_len).long()
    return out


def pair_logprobs(engine, batch, average=False, chunk=None):
    """Sequence log-probs of the replies of a collate_dpo batch -> (chosen [B], rejected [B]) in float32."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"], average, chunk or None)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def reference_logprobs(reference, batch, average=False, chunk=None):
    """The frozen reference's (chosen, rejected) log-probs, without a graph; zeros when reference-free."""
    if reference is None:
        zeros = torch.zeros(batch["input_ids"].shape[0] // 2, device=batch["input_ids"].device)
        return zeros, zeros
    with torch.no_grad():
        return pair_logprobs(reference, batch, average, chunk)


def dpo_step(policy, reference, batch, cfg):
    """One micro-batch: (loss, metrics). The reference runs first, so its logits are freed before the policy's
    forward builds its graph."""
    average = cfg.loss_type == "ipo"  # IPO is defined on per-token mean log-probs (as the paper and TRL)
    ref_c, ref_r = reference_logprobs(reference, batch, average, cfg.logprob_chunk)
    pol_c, pol_r = pair_logprobs(policy, batch, average, cfg.logprob_chunk)
    loss, stats = dpo_loss(pol_c, pol_r, ref_c, ref_r, cfg.beta, cfg.loss_type, cfg.label_smoothing)
    return loss, {"train/loss": loss.detach(), **stats, "logps/chosen": pol_c.detach().mean(),
                  "logps/rejected": pol_r.detach().mean()}


def eval_batches(n, batch_size):
    """This rank's eval batches (strided indices), topped up with None to rank 0's count (it has the most): at
    ZeRO-3 every forward gathers weights collectively, so every rank must run as many forwards (a rank with one
    batch fewer leaves the others waiting forever; tests/test_dpo.py runs that case)."""
    import torch.distributed as dist
    mine = list(range(dist.get_rank(), n, dist.get_world_size()))
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    most = math.ceil(math.ceil(n / dist.get_world_size()) / batch_size)
    return batches + [None] * (most - len(batches))


@torch.no_grad()
def eval_logprobs(policy, reference, dataset, collate, cfg, device, ref_cache):
    """[(index, policy chosen, policy rejected, reference chosen, reference rejected)] for every eval pair,
    gathered from all ranks, in index order. The reference's numbers never change: `ref_cache` keeps them
    from the first evaluation (every rank skips those forwards alike)."""
    import torch.distributed as dist
    policy.eval()
    average = cfg.loss_type == "ipo"
    mine = []
    for i, idx in enumerate(eval_batches(len(dataset), cfg.per_device_eval_batch_size)):
        batch = {k: v.to(device) for k, v in collate([dataset[j] for j in (idx or [0])]).items()}
        pol = pair_logprobs(policy, batch, average, cfg.logprob_chunk)
        if i not in ref_cache:
            ref_cache[i] = reference_logprobs(reference, batch, average, cfg.logprob_chunk)
        if idx:  # a top-up batch (None) only keeps the collectives in step
            rows = [t.double().cpu().tolist() for t in (*pol, *ref_cache[i])]
            mine.extend(zip(idx, *rows))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return sorted(t for part in every for t in part)


def eval_metrics(rows, cfg):
    """The DPO loss, the mean implicit rewards and margin, and the reward accuracy (a tie counts half; strict
    and tie fraction beside it) over the held-out pairs."""
    if not rows:
        return {}
    pc, pr, rc, rr = (torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in range(1, 5))
    loss, stats = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_type, cfg.label_smoothing)
    outcomes = pairwise_outcomes((cfg.beta * (pc - rc)).tolist(), (cfg.beta * (pr - rr)).tolist())
    # accuracy and margin under step 2's names (eval/accuracy, eval/margin), which the report and summary read
    return {"eval/loss": loss.item(), "eval/rewards/chosen": stats["rewards/chosen"].item(),
            "eval/rewards/rejected": stats["rewards/rejected"].item(), "eval/margin": stats["rewards/margins"].item(),
            **{f"eval/{k}": v for k, v in outcomes.items()},
            "eval/logps/chosen": pc.mean().item(), "eval/logps/rejected": pr.mean().item()}


def build_models(cfg, ctx, total):
    """(policy engine, frozen reference engine or None): both from --model_name_or_path; the reference gets
    ZeRO-3 when the policy has it (else stage 0, whole on each process), as DeepSpeed-Chat's step2_dpo."""
    common = dict(dtype=ctx.dtype, trust_remote_code=cfg.trust_remote_code, attention=cfg.attn_implementation,
                  fused_layers=cfg.fused_layers)
    model = load_causal_lm(cfg.model_name_or_path, dropout=cfg.dropout, disable_dropout=cfg.disable_dropout,
                           gradient_checkpointing=cfg.gradient_checkpointing, lora_dim=cfg.lora_dim,
                           lora_alpha=cfg.lora_alpha, lora_module_name=cfg.lora_module_name,
                           lora_only=cfg.only_optimize_lora, **common)
    policy = build_supervised_engine(model, cfg, ctx, total)
    if cfg.reference_free:
        return policy, None
    ref = load_causal_lm(cfg.model_name_or_path, disable_dropout=True, **common)
    reference = build_frozen_engine(ref, micro_batch=cfg.per_device_train_batch_size, world_size=ctx.world_size,
                                    zero_stage=cfg.zero_stage, offload=cfg.offload_reference_model, dtype=ctx.dtype)
    return policy, reference


def main(argv=None):
    cfg = parse_config(DPOConfig, argv)
    if cfg.dry_run:  # plan + memory estimate, no training (utils/plan.py, step2_dpo/plan.py)
        return dry_run(cfg, dpo_plan)
    ctx = start_stage(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
    if cfg.chat_template == "none":
        tokenizer.chat_template = None  # DeepSpeed-Chat's hh text instead (utils/data/templates.py)
    train_set, eval_set, _ = pair_datasets(cfg, tokenizer, ctx.log)
    collate = functools.partial(collate_dpo, pad_id=tokenizer.pad_token_id)
    total = cfg.max_steps or cfg.num_train_epochs * steps_per_epoch(
        len(train_set), cfg.per_device_train_batch_size, ctx.world_size, cfg.gradient_accumulation_steps)
    policy, reference = build_models(cfg, ctx, total)
    clock, ref_cache = {"seconds": 0.0}, {}

    def ev():
        start = time.perf_counter()
        metrics = eval_metrics(eval_logprobs(policy, reference, eval_set, collate, cfg, ctx.device, ref_cache), cfg)
        clock["seconds"] += time.perf_counter() - start
        return metrics

    before = ev() if cfg.compare_before else {}
    ctx.log.scalars(before, 0)  # the report then shows before -> after
    clock["seconds"] = 0.0
    ctx.log.info(f"{len(train_set)} training / {len(eval_set)} eval pairs, {total} optimizer steps, "
                 f"{cfg.loss_type} loss, beta {cfg.beta}" + (", reference-free" if reference is None else ""))

    def step_fn(engine, batch):
        return dpo_step(engine, reference, {k: v.to(ctx.device) for k, v in batch.items()}, cfg)

    start = time.perf_counter()
    after, steps = train(cfg, policy, train_set, collate, step_fn, ev, ctx.log, ctx.rank, ctx.world_size,
                         cfg.stage_name)
    train_seconds = time.perf_counter() - start - clock["seconds"]  # the loop's evals are not training
    save_hf_model(policy, tokenizer, cfg.output_dir, rank=ctx.rank)
    summary = {"stage": cfg.stage_name, "steps": steps, "before": before, "after": after,
               "train_pairs": len(train_set), "eval_pairs": len(eval_set), "train_seconds": round(train_seconds, 1),
               "wall_seconds": ctx.log.elapsed()}
    change = [f"implicit-reward accuracy on {len(eval_set)} held-out pairs {before['eval/accuracy']:.3f} -> "
              f"{after['eval/accuracy']:.3f} (a tie counts half), margin {before['eval/margin']:.3f} -> "
              f"{after['eval/margin']:.3f}, DPO loss {before['eval/loss']:.4f} -> {after['eval/loss']:.4f}"] \
        if before and after else []
    finish_stage(ctx, cfg, summary, change + [f"saved the DPO-trained model (AutoModelForCausalLM, HF format) to "
                                              f"{cfg.output_dir}"])


if __name__ == "__main__":
    run_main(main)
