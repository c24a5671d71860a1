"""The supervised training loop shared by step 1 (SFT) and step 2 (reward model).

The stage supplies `loss_fn(engine, batch) -> (loss, metrics)` and `eval_fn() -> metrics`; this loop owns
everything else: seeded per-epoch batch order (so a resumed run sees exactly the batches it would have seen),
gradient accumulation through DeepSpeed, non-finite steps skipped, periodic eval, resumable checkpoints,
SIGTERM/SIGINT handling, TensorBoard scalars and the progress bar.
"""
from __future__ import annotations

import math
import sys

import torch

from utils.engine import Checkpointer, NonFiniteGuard, StopRequest


def epoch_batches(n, batch_size, world_size, rank, seed, epoch):
    """This rank's batches (lists of dataset indices) for one epoch; every rank gets the same count."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = math.ceil(n / world_size)
    perm = (perm * math.ceil(per_rank * world_size / max(n, 1) + 1))[: per_rank * world_size]  # wrap-pad
    mine = perm[rank::world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def rank_batches(n, batch_size):
    """Evaluation order: this rank's indices (strided), in fixed-size batches; no padding or repeats."""
    import torch.distributed as dist
    mine = list(range(dist.get_rank(), n, dist.get_world_size()))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def steps_per_epoch(n, batch_size, world_size, grad_accum):
    batches = math.ceil(math.ceil(n / world_size) / batch_size)
    return math.ceil(batches / grad_accum)


def resume_point(cfg, ckpt: Checkpointer, log):
    """The checkpoint to resume from, or None: --resume requires one, otherwise it is used if present."""
    if cfg.no_resume:
        return None
    found = ckpt.latest()
    if found is None and cfg.resume:
        raise SystemExit(f"error: --resume given but {ckpt.root} holds no checkpoint")
    if found is not None:
        log.info(f"resuming from {ckpt.root}/{found[0]} (step {found[1]['step']}); pass --no_resume to start over")
    return found


def train(cfg, engine, dataset, collate, loss_fn, eval_fn, log, rank, world_size, stage_name):
    """Runs the epochs; returns the last eval metrics. Exits non-zero (after saving) on SIGTERM/SIGINT."""
    ckpt = Checkpointer(cfg.output_dir, cfg.save_total_limit, rank)
    guard = NonFiniteGuard(cfg.max_bad_steps, stage_name)
    stop = StopRequest()
    accum = cfg.gradient_accumulation_steps
    per_epoch = steps_per_epoch(len(dataset), cfg.per_device_train_batch_size, world_size, accum)
    total = cfg.max_steps or per_epoch * cfg.num_train_epochs
    step, epoch0, batch0 = 0, 0, 0
    found = resume_point(cfg, ckpt, log)
    if found:
        tag, state = found
        ckpt.load({"model": engine}, tag, state)
        step, epoch0, batch0 = state["step"], state["epoch"], state["next_batch"]
    bar = log.progress(total, initial=step, desc=stage_name)
    window = {}
    metrics = {}

    def save():
        ckpt.save({"model": engine}, step, {"epoch": epoch, "next_batch": b + 1})

    engine.train()
    for epoch in range(epoch0, cfg.num_train_epochs if not cfg.max_steps else 10 ** 9):
        batches = epoch_batches(len(dataset), cfg.per_device_train_batch_size, world_size, rank, cfg.seed, epoch)
        for b in range(batch0 if epoch == epoch0 else 0, len(batches)):
            if step >= total:
                break
            batch = collate([dataset[i] for i in batches[b]])
            loss, m = loss_fn(engine, batch)
            boundary = engine.is_gradient_accumulation_boundary()
            if guard.check(step, {"loss": loss.detach()}):
                engine.backward(loss)
                engine.step()
                for k, v in m.items():
                    window.setdefault(k, []).append(float(v))
            elif boundary:
                engine.zero_grad()  # drop the accumulated window that contained the bad micro-batch
            if not boundary:
                continue
            step += 1
            logged = {k: sum(v) / len(v) for k, v in window.items()}
            window = {}
            logged["train/lr"] = engine.get_lr()[0]
            log.scalars(logged, step)
            if log.print_loss and "train/loss" in logged:
                log.info(f"epoch {epoch} step {step} loss {logged['train/loss']:.4f}")
            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logged.items() if k != "train/lr"})
            bar.update(1)
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < total:
                metrics = eval_fn()
                log.scalars(metrics, step)
                log.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                engine.train()
            if (cfg.save_interval and step % cfg.save_interval == 0) or stop.requested:
                save()
            if stop.requested:
                bar.close()
                log.info(f"stopped by signal {stop.signal} after step {step}; checkpoint saved in {ckpt.root}. "
                         "Run the same command again to resume.")
                sys.exit(128 + int(stop.signal))
        if step >= total:
            break
    bar.close()
    if guard.total:
        log.info(f"{guard.total} step(s) skipped because the loss was not finite")
    metrics = eval_fn()
    log.scalars(metrics, step)
    return metrics, step
