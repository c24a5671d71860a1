"""Step 2: a pairwise reward model (base LM + scalar head) trained on chosen/rejected pairs.

    deepspeed step2_reward_model/main.py --data_path Dahoas/rm-static --model_name_or_path facebook/opt-350m ...
    python step2_reward_model/main.py            # offline default
The score of a sequence is the head's value at its last non-pad token (left or right padding).
"""
import os
import sys

if __package__ in (None, ""):  # `python step2_reward_model/main.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from step2_reward_model.config import RewardConfig  # noqa: E402
from utils.data.pipeline import pair_datasets  # noqa: E402
from utils.engine import build_train_engine  # noqa: E402
from utils.losses import gather_last, pairwise_accuracy, pairwise_reward_loss  # noqa: E402
from utils.models import TokenValues, load_tokenizer, load_value_model, save_hf_model  # noqa: E402
from utils.options import parse_config  # noqa: E402
from utils.stage import run_main, start_stage  # noqa: E402
from utils.train_loop import rank_batches, steps_per_epoch, train  # noqa: E402


def pair_scores(engine, batch):
    """Scores of the concatenated [chosen; rejected] batch -> (chosen [B], rejected [B])."""
    values = engine(batch["input_ids"], batch["attention_mask"])
    scores = gather_last(values, batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def reward_step(engine, batch, center_coef):
    chosen, rejected = pair_scores(engine, batch)
    loss = pairwise_reward_loss(chosen, rejected, center_coef)
    return loss, {"train/loss": loss.detach(), "train/accuracy": pairwise_accuracy(chosen, rejected),
                  "train/chosen_score": chosen.mean().detach(), "train/rejected_score": rejected.mean().detach()}


@torch.no_grad()
def evaluate(engine, dataset, collate, batch_size, device):
    import torch.distributed as dist
    engine.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # correct, chosen sum, rejected sum, count, loss sum
    for idx in rank_batches(len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in collate([dataset[j] for j in idx]).items()}
        c, r = pair_scores(engine, batch)
        c, r = c.double().cpu(), r.double().cpu()
        sums += torch.stack([(c > r).double().sum(), c.sum(), r.sum(), torch.tensor(float(len(c)), dtype=torch.float64),
                             torch.nn.functional.softplus(r - c).sum()])
    dist.all_reduce(sums)
    n = max(sums[3].item(), 1.0)
    return {"eval/accuracy": sums[0].item() / n, "eval/chosen_score": sums[1].item() / n,
            "eval/rejected_score": sums[2].item() / n, "eval/margin": (sums[1] - sums[2]).item() / n,
            "eval/loss": sums[4].item() / n}


def main(argv=None):
    cfg = parse_config(RewardConfig, argv)
    ctx = start_stage(cfg, "step2_reward_model")
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
    train_set, eval_set, collate = pair_datasets(cfg, tokenizer, ctx.log)
    model = load_value_model(cfg.model_name_or_path, dtype=ctx.dtype, trust_remote_code=cfg.trust_remote_code,
                             head_init_std=cfg.head_init_std, dropout=cfg.dropout, disable_dropout=cfg.disable_dropout,
                             gradient_checkpointing=cfg.gradient_checkpointing, lora_dim=cfg.lora_dim,
                             lora_alpha=cfg.lora_alpha, lora_module_name=cfg.lora_module_name,
                             lora_only=cfg.only_optimize_lora)
    if cfg.only_optimize_lora:
        model.score.weight.requires_grad_(True)  # the head is new: it must train even in LoRA-only mode
    total = cfg.max_steps or cfg.num_train_epochs * steps_per_epoch(
        len(train_set), cfg.per_device_train_batch_size, ctx.world_size, cfg.gradient_accumulation_steps)
    engine = build_train_engine(TokenValues(model), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                total_steps=total, warmup_steps=cfg.num_warmup_steps, scheduler=cfg.lr_scheduler_type,
                                micro_batch=cfg.per_device_train_batch_size, grad_accum=cfg.gradient_accumulation_steps,
                                world_size=ctx.world_size, zero_stage=cfg.zero_stage, offload=cfg.offload,
                                dtype=ctx.dtype, grad_clip=cfg.grad_clip,
                                lora_lr=cfg.lora_learning_rate if cfg.lora_dim else None)
    ev = lambda: evaluate(engine, eval_set, collate, cfg.per_device_eval_batch_size, ctx.device)  # noqa: E731
    before = ev() if cfg.compare_before else {}
    ctx.log.info(f"{len(train_set)} training / {len(eval_set)} eval pairs, {total} optimizer steps")

    def step_fn(engine, batch):
        return reward_step(engine, {k: v.to(ctx.device) for k, v in batch.items()}, cfg.center_coef)

    after, steps = train(cfg, engine, train_set, collate, step_fn, ev, ctx.log, ctx.rank, ctx.world_size,
                         "step2_reward_model")
    save_hf_model(engine, tokenizer, cfg.output_dir, cfg.zero_stage, ctx.rank)
    summary = {"stage": "step2_reward_model", "steps": steps, "before": before, "after": after,
               "train_pairs": len(train_set), "eval_pairs": len(eval_set)}
    ctx.log.write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
    if before:
        ctx.log.info(f"pairwise accuracy on {len(eval_set)} held-out pairs {before['eval/accuracy']:.3f} -> "
                     f"{after['eval/accuracy']:.3f} (chosen {after['eval/chosen_score']:.3f}, rejected "
                     f"{after['eval/rejected_score']:.3f})")
    ctx.log.info(f"saved the reward model (AutoModelForSequenceClassification, HF format) to {cfg.output_dir}")
    ctx.log.close()


if __name__ == "__main__":
    run_main(main)
