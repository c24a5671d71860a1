"""Step 1: supervised fine-tuning of the actor on prompt + chosen response.

    deepspeed step1_sft/main.py --data_path Dahoas/rm-static --model_name_or_path facebook/opt-1.3b ...
    python step1_sft/main.py                      # offline default: SmolLM2-135M-Instruct + synthetic data
"""
import os
import sys

if __package__ in (None, ""):  # `python step1_sft/main.py` / `deepspeed step1_sft/main.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # before torch is imported: re-exec once under tcmalloc where the machine has it
    from utils.allocator import use_tcmalloc
    use_tcmalloc()

import math  # noqa: E402

import torch  # noqa: E402

from step1_sft.config import SFTConfig  # noqa: E402
from utils.data.pipeline import sft_datasets  # noqa: E402
from utils.engine import build_supervised_engine  # noqa: E402
from utils.guards import sum_over_ranks  # noqa: E402
from utils.losses import sft_loss  # noqa: E402
from utils.models import gathered_state_dict, load_causal_lm, load_tokenizer, save_hf_model  # noqa: E402
from utils.options import parse_config  # noqa: E402
from utils.phase import set_phase  # noqa: E402
from utils.plan import dry_run  # noqa: E402
from utils.stage import finish_stage, run_main, start_stage  # noqa: E402
from utils.train_loop import rank_batches, steps_per_epoch, train  # noqa: E402


def sft_step(engine, batch):
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    loss, n = sft_loss(logits, batch["labels"])
    return loss, {"train/loss": loss.detach()}


@torch.no_grad()
def evaluate(engine, dataset, collate, batch_size, device):
    """Token-weighted eval loss and perplexity over this rank's share, summed across ranks."""
    engine.eval()
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for idx, n_real in rank_batches(len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in collate([dataset[j] for j in idx]).items()}
        batch["labels"][n_real:] = -100  # a repeated row (equal batch counts on every rank) counts no token
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss, n = sft_loss(logits.float(), batch["labels"])
        total += loss.double().cpu() * n.cpu()
        count += n.cpu()
    total, count = sum_over_ranks([total.item(), count.item()])  # on the backend's device (NCCL: CUDA)
    loss = total / max(count, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50))}


def dump_weight_hash(engine, rank, path):
    """Test hook (env RLHFKIT_DUMP_WEIGHT_HASH=PATH): every rank writes PATH.rankN with the sha256 of its full
    (ZeRO-gathered) weights, so a test can check that data-parallel ranks ended with the same model."""
    import hashlib
    import json
    state = gathered_state_dict(engine)  # collective at ZeRO 3: every rank must call it
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    with open(f"{path}.rank{rank}", "w") as f:
        json.dump({"rank": rank, "sha256": digest.hexdigest()}, f)


def main(argv=None):
    cfg = parse_config(SFTConfig, argv)
    if cfg.dry_run:  # plan + memory estimate, no training (utils/plan.py)
        return dry_run(cfg)
    ctx = start_stage(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
    train_set, eval_set, collate = sft_datasets(cfg, tokenizer, ctx.log)
    model = load_causal_lm(cfg.model_name_or_path, dtype=ctx.dtype, trust_remote_code=cfg.trust_remote_code,
                           dropout=cfg.dropout, disable_dropout=cfg.disable_dropout,
                           gradient_checkpointing=cfg.gradient_checkpointing, lora_dim=cfg.lora_dim,
                           lora_alpha=cfg.lora_alpha, lora_module_name=cfg.lora_module_name,
                           lora_only=cfg.only_optimize_lora, attention=cfg.attn_implementation,
                           fused_layers=cfg.fused_layers)
    total = cfg.max_steps or cfg.num_train_epochs * steps_per_epoch(
        len(train_set), cfg.per_device_train_batch_size, ctx.world_size, cfg.gradient_accumulation_steps)
    engine = build_supervised_engine(model, cfg, ctx, total)
    ev = lambda: evaluate(engine, eval_set, collate, cfg.per_device_eval_batch_size, ctx.device)  # noqa: E731
    set_phase("evaluation before training")
    before = ev() if cfg.compare_before else {}
    ctx.log.scalars(before, 0)  # the report then shows before -> after
    ctx.log.info(f"{len(train_set)} training / {len(eval_set)} eval sequences, {total} optimizer steps")

    def step_fn(engine, batch):
        return sft_step(engine, {k: v.to(ctx.device) for k, v in batch.items()})

    after, steps = train(cfg, engine, train_set, collate, step_fn, ev, ctx.log, ctx.rank, ctx.world_size,
                         cfg.stage_name)
    if os.environ.get("RLHFKIT_DUMP_WEIGHT_HASH"):
        dump_weight_hash(engine, ctx.rank, os.environ["RLHFKIT_DUMP_WEIGHT_HASH"])
    save_hf_model(engine, tokenizer, cfg.output_dir, rank=ctx.rank)
    summary = {"stage": cfg.stage_name, "steps": steps, "before": before, "after": after,
               "train_sequences": len(train_set), "eval_sequences": len(eval_set),
               "wall_seconds": ctx.log.elapsed()}
    change = [f"eval loss {before['eval/loss']:.4f} -> {after['eval/loss']:.4f} (perplexity "
              f"{before['eval/perplexity']:.2f} -> {after['eval/perplexity']:.2f})"] if before else []
    finish_stage(ctx, cfg, summary, change + [f"saved the fine-tuned model (HF format) to {cfg.output_dir}"])


if __name__ == "__main__":
    run_main(main)
