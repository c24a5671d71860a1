"""Step 2: a pairwise reward model (base LM + scalar head) trained on chosen/rejected pairs.

    deepspeed step2_reward_model/main.py --data_path Dahoas/rm-static --model_name_or_path facebook/opt-350m ...
    python step2_reward_model/main.py            # offline default
The score of a sequence is the head's value at its last non-pad token (left or right padding).
"""
import functools
import json
import os
import sys
import time

if __package__ in (None, ""):  # `python step2_reward_model/main.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # before torch is imported: re-exec once under tcmalloc where the machine has it
    from utils.allocator import use_tcmalloc
    use_tcmalloc()

import torch  # noqa: E402

from step2_reward_model.config import RewardConfig  # noqa: E402
from utils.data.pipeline import pair_datasets  # noqa: E402
from utils.engine import build_supervised_engine  # noqa: E402
from utils.data.datasets import IGNORE_INDEX  # noqa: E402
from utils.losses import gather_last, last_token_index, sft_loss  # noqa: E402
from utils.models import (TokenValues, body_hidden_states, load_tokenizer, load_value_model,  # noqa: E402
                          save_hf_model, value_head)
from utils.options import ConfigError, parse_config  # noqa: E402
from utils.phase import set_phase  # noqa: E402
from utils.preference_losses import (center_penalty, divergence_pairwise_loss, pairwise_accuracy,  # noqa: E402
                                     pairwise_outcomes, pairwise_reward_loss)
from utils.plan import dry_run, supervised_plan  # noqa: E402
from utils.stage import finish_stage, run_main, start_stage  # noqa: E402
from utils.train_loop import rank_batches, steps_per_epoch, train  # noqa: E402


def read_scores(values, attention_mask, score_offset=0):
    """values[b, last non-pad index - score_offset]: 0 reads the EOS / end-of-turn token ending every reply,
    1 the token before it (the reply's last word)."""
    if not score_offset:
        return gather_last(values, attention_mask)
    idx = (last_token_index(attention_mask) - score_offset).clamp(min=0).unsqueeze(-1)
    return values.gather(-1, idx).squeeze(-1)


def freeze_lower_layers(model, n_layers):
    """Freeze the token embeddings and the first n_layers transformer blocks; returns how many were frozen.

    Backward then stops at the first trainable block, so each step skips that much backward work, and the
    optimizer holds fewer weights. The blocks are the model's longest ModuleList (Llama `model.layers`, OPT
    `model.decoder.layers`, GPT-2 `transformer.h`)."""
    if n_layers <= 0:
        return 0
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=None)
    if blocks is None or n_layers >= len(blocks):
        raise ConfigError(f"--num_frozen_layers {n_layers}: the model has {len(blocks or [])} blocks; freeze fewer")
    model.get_input_embeddings().requires_grad_(False)
    for block in blocks[:n_layers]:
        block.requires_grad_(False)
    return n_layers


def next_token_nll(logits, ids, mask):
    """(summed -log p(next token), number of predicted tokens) over rows [k, T] of a causal LM, left or right
    padding: a token is a target (utils.losses.sft_loss's shift) when it and the token before it are real."""
    real = mask.bool()
    after_real = torch.nn.functional.pad(real[:, :-1], (1, 0))
    loss, n_tokens = sft_loss(logits, torch.where(real & after_real, ids, IGNORE_INDEX))
    return loss * n_tokens, n_tokens


class ValuesAndLMLoss(TokenValues):
    """TokenValues whose forward can also return the next-token loss of some rows (--lm_loss_coef), through the
    LM head a tied model shares with its input embeddings, read from the same hidden states as the value head.

    forward(ids, mask) -> values [B, T]; forward(ids, mask, lm_rows) -> (values, nll sum, token count) of the
    rows where the bool lm_rows [B] is set. The embedding matrix is used outside its own module's forward; under
    ZeRO-3, DeepSpeed gathers and registers such a parameter itself when forward reads it (registering it here
    as well broke ZeRO-3's prefetch trace on SmolLM2-135M: "tracing error at step 38")."""

    def forward(self, input_ids, attention_mask, lm_rows=None):
        hidden = body_hidden_states(self.model, input_ids, attention_mask)
        values = value_head(self.model)(hidden).squeeze(-1).float()
        if lm_rows is None:
            return values
        logits = torch.nn.functional.linear(hidden[lm_rows], self.model.get_input_embeddings().weight)
        return (values, *next_token_nll(logits, input_ids[lm_rows], attention_mask[lm_rows]))


def pair_values(engine, ids, mask, chunk=0, lm=False):
    """The value head's output at every position of the [chosen; rejected] batch, [2B, T].

    chunk > 0: the 2B sequences are sorted by length and run `chunk` at a time, each chunk cut to its own
    longest row, so short rows do not pay for the longest one's padding (the batch's loss and its one
    backward are unchanged; only padding work is skipped; the cut columns come back as 0, never read).
    chunk = 0: one padded forward of the whole batch.
    lm=True (the engine wraps ValuesAndLMLoss): (values, the chosen half's summed next-token loss, its token count).
    """
    n = ids.shape[0]
    chosen = torch.arange(n, device=ids.device) < n // 2 if lm else None
    if chunk <= 0 or chunk >= n:
        return engine(ids, mask, chosen) if lm else engine(ids, mask)
    order = torch.argsort(mask.sum(-1), stable=True)
    parts, nll, count = [], 0.0, 0
    for idx in order.split(chunk):
        cols = mask[idx].any(0).nonzero().squeeze(-1)  # columns any row of the chunk uses (left or right pad)
        lo, hi = int(cols.min()), int(cols.max()) + 1
        if lm:
            values, part_nll, part_count = engine(ids[idx, lo:hi], mask[idx, lo:hi], chosen[idx])
            nll, count = nll + part_nll, count + part_count
        else:
            values = engine(ids[idx, lo:hi], mask[idx, lo:hi])
        parts.append(torch.nn.functional.pad(values, (lo, ids.shape[1] - hi)))
    values = torch.cat(parts)[torch.argsort(order)]  # back to batch order (indexing keeps the graph)
    return (values, nll, count) if lm else values


def halves(x):
    """(chosen half, rejected half) of a [chosen; rejected] batch tensor."""
    half = x.shape[0] // 2
    return x[:half], x[half:]


def pair_scores(engine, batch, chunk=0, score_offset=0):
    """Scores of the concatenated [chosen; rejected] batch -> (chosen [B], rejected [B])."""
    mask = batch["attention_mask"]
    return halves(read_scores(pair_values(engine, batch["input_ids"], mask, chunk), mask, score_offset))


def reward_step(engine, batch, center_coef, chunk=0, score_offset=0, loss_positions="score", lm_loss_coef=0.0):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if lm_loss_coef:
        values, nll, count = pair_values(engine, ids, mask, chunk, lm=True)
        lm_loss = nll / count.clamp(min=1)  # mean next-token loss of the chosen sequences' tokens
    else:
        values = pair_values(engine, ids, mask, chunk)
    chosen, rejected = halves(read_scores(values, mask, score_offset))
    if loss_positions == "divergence":  # DeepSpeed-Chat's: every position after the replies part
        loss = divergence_pairwise_loss(*halves(values), *halves(ids), *halves(mask)) \
            + center_penalty(chosen, rejected, center_coef)
    else:
        loss = pairwise_reward_loss(chosen, rejected, center_coef)
    accuracy = pairwise_accuracy(chosen, rejected, tie=0.5)  # a tie counts half
    stats = {"train/loss": loss.detach(), "train/accuracy": accuracy,
             "train/chosen_score": chosen.mean().detach(), "train/rejected_score": rejected.mean().detach()}
    if lm_loss_coef:
        loss = loss + lm_loss_coef * lm_loss
        stats["train/lm_loss"] = lm_loss.detach()
    return loss, stats


@torch.no_grad()
def eval_pair_scores(engine, dataset, collate, batch_size, device, chunk=0, score_offset=0):
    """[(index, chosen score, rejected score)] for every eval pair, gathered from all ranks, in index order."""
    import torch.distributed as dist
    engine.eval()
    mine = []
    for idx, n_real in rank_batches(len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in collate([dataset[j] for j in idx]).items()}
        c, r = pair_scores(engine, batch, chunk, score_offset)  # a repeated row (equal batch counts) is dropped:
        mine.extend(zip(idx[:n_real], c[:n_real].double().cpu().tolist(), r[:n_real].double().cpu().tolist()))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return sorted(t for part in every for t in part)


def eval_metrics(triples):
    """Accuracy (a tie counts half; strict: a tie is wrong), tie fraction, mean chosen/rejected score, mean
    margin and mean pairwise loss."""
    n = max(len(triples), 1)
    c = torch.tensor([t[1] for t in triples], dtype=torch.float64)
    r = torch.tensor([t[2] for t in triples], dtype=torch.float64)
    outcomes = pairwise_outcomes(c.tolist(), r.tolist())
    return {**{f"eval/{k}": v for k, v in outcomes.items()}, "eval/chosen_score": c.sum().item() / n,
            "eval/rejected_score": r.sum().item() / n, "eval/margin": (c - r).sum().item() / n,
            "eval/loss": torch.nn.functional.softplus(r - c).sum().item() / n}


def write_pair_scores(path, triples):
    """One JSON line per eval pair: {"index", "chosen", "rejected"} (for confidence intervals, error analysis)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for i, c, r in triples:
            f.write(json.dumps({"index": i, "chosen": c, "rejected": r}) + "\n")


def main(argv=None):
    cfg = parse_config(RewardConfig, argv)
    if cfg.dry_run:  # plan + memory estimate, no training (utils/plan.py)
        return dry_run(cfg, functools.partial(supervised_plan, value=True))
    ctx = start_stage(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
    if cfg.chat_template == "none":
        tokenizer.chat_template = None  # DeepSpeed-Chat's hh text instead (utils/data/templates.py)
    train_set, eval_set, collate = pair_datasets(cfg, tokenizer, ctx.log)
    model = load_value_model(cfg.model_name_or_path, dtype=ctx.dtype, trust_remote_code=cfg.trust_remote_code,
                             head_init_std=cfg.head_init_std, dropout=cfg.dropout, disable_dropout=cfg.disable_dropout,
                             gradient_checkpointing=cfg.gradient_checkpointing, lora_dim=cfg.lora_dim,
                             lora_alpha=cfg.lora_alpha, lora_module_name=cfg.lora_module_name,
                             lora_only=cfg.only_optimize_lora, attention=cfg.attn_implementation,
                             fused_layers=cfg.fused_layers)
    if cfg.only_optimize_lora:
        model.score.weight.requires_grad_(True)  # the head is new: it must train even in LoRA-only mode
    freeze_lower_layers(model, cfg.num_frozen_layers)
    if cfg.lm_loss_coef and not getattr(model.config, "tie_word_embeddings", False):
        raise ConfigError(f"--lm_loss_coef {cfg.lm_loss_coef}: {cfg.model_name_or_path} has an LM head of its own "
                          "(tie_word_embeddings false), which the reward model does not load; use 0")
    total = cfg.max_steps or cfg.num_train_epochs * steps_per_epoch(
        len(train_set), cfg.per_device_train_batch_size, ctx.world_size, cfg.gradient_accumulation_steps)
    wrapper = ValuesAndLMLoss(model) if cfg.lm_loss_coef else TokenValues(model)
    engine = build_supervised_engine(wrapper, cfg, ctx, total,
                                     head_params=list(value_head(model).parameters()),
                                     head_lr=cfg.head_learning_rate or None)
    eval_clock = {"seconds": 0.0, "scores": []}

    def ev():
        start = time.perf_counter()
        eval_clock["scores"] = eval_pair_scores(engine, eval_set, collate, cfg.per_device_eval_batch_size,
                                                ctx.device, cfg.chunk_for(ctx.device.type), cfg.score_offset)
        eval_clock["seconds"] += time.perf_counter() - start
        return eval_metrics(eval_clock["scores"])

    set_phase("evaluation before training")
    before = ev() if cfg.compare_before else {}
    ctx.log.scalars(before, 0)  # the report then shows before -> after, as for step 1
    eval_clock["seconds"] = 0.0
    ctx.log.info(f"{len(train_set)} training / {len(eval_set)} eval pairs, {total} optimizer steps")

    def step_fn(engine, batch):
        return reward_step(engine, {k: v.to(ctx.device) for k, v in batch.items()}, cfg.center_coef,
                           cfg.chunk_for(ctx.device.type, training=True), cfg.score_offset, cfg.loss_positions,
                           cfg.lm_loss_coef)

    start = time.perf_counter()
    after, steps = train(cfg, engine, train_set, collate, step_fn, ev, ctx.log, ctx.rank, ctx.world_size,
                         cfg.stage_name)
    train_seconds = time.perf_counter() - start - eval_clock["seconds"]  # the loop's evals are not training
    if cfg.eval_scores_path and ctx.rank == 0:
        write_pair_scores(cfg.eval_scores_path, eval_clock["scores"])
    save_hf_model(engine, tokenizer, cfg.output_dir, rank=ctx.rank)
    summary = {"stage": cfg.stage_name, "steps": steps, "before": before, "after": after,
               "train_pairs": len(train_set), "eval_pairs": len(eval_set), "train_seconds": round(train_seconds, 1),
               "wall_seconds": ctx.log.elapsed()}
    change = [f"pairwise accuracy on {len(eval_set)} held-out pairs {before['eval/accuracy']:.3f} -> "
              f"{after['eval/accuracy']:.3f} (a tie counts half; ties {before['eval/tie_fraction']:.0%} -> "
              f"{after['eval/tie_fraction']:.0%}; chosen {after['eval/chosen_score']:.3f}, rejected "
              f"{after['eval/rejected_score']:.3f})"] if before else []
    finish_stage(ctx, cfg, summary, change + ["saved the reward model (AutoModelForSequenceClassification, HF format) "
                                              f"to {cfg.output_dir}"])


if __name__ == "__main__":
    run_main(main)
