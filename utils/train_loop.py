"""The supervised training loop shared by step 1 (SFT) and step 2 (reward model).

The stage supplies `loss_fn(engine, batch) -> (loss, metrics)` and `eval_fn() -> metrics`; this loop owns
everything else: seeded per-epoch batch order (so a resumed run sees exactly the batches it would have seen),
gradient accumulation through DeepSpeed, non-finite updates skipped and counted, periodic eval, resumable
checkpoints (a resumed run ends with the same weights as an uninterrupted one), SIGTERM/SIGINT handling,
TensorBoard scalars and the progress bar.
"""
from __future__ import annotations

import math
import sys

import torch

from utils.checkpoint import CheckpointError, Checkpointer
from utils.guards import NonFiniteGuard, StopRequest, gradients_finite
from utils.phase import set_phase


def epoch_batches(n, batch_size, world_size, rank, seed, epoch):
    """This rank's batches (lists of dataset indices) for one epoch; every rank gets the same count."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = math.ceil(n / world_size)
    perm = (perm * math.ceil(per_rank * world_size / max(n, 1) + 1))[: per_rank * world_size]  # wrap-pad
    mine = perm[rank::world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def rank_batches(n, batch_size, rank=None, world_size=None):
    """Evaluation order: this rank's indices (strided) in batches, as [(indices, n_real)].

    Every rank gets the same number of batches of the same sizes (under ZeRO-3 each eval forward is a
    collective, so a rank with one batch fewer would leave the others waiting forever): a rank whose share is
    one row short repeats a row at the end of its last batch. Only the first `n_real` indices of a batch are
    real; the caller gives the repeats no weight, so the metric is still exact over the n real rows."""
    if rank is None:
        import torch.distributed as dist
        rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, n, world_size))
    per_rank = math.ceil(n / world_size)
    padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))
    return [(padded[i:i + batch_size], max(0, min(batch_size, len(mine) - i)))
            for i in range(0, per_rank, batch_size)]


def steps_per_epoch(n, batch_size, world_size, grad_accum):
    batches = math.ceil(math.ceil(n / world_size) / batch_size)
    return math.ceil(batches / grad_accum)


def resume(cfg, ckpt: Checkpointer, engines: dict, log, tensor_names=()):
    """Restore the newest usable checkpoint into `engines`: (state, tensors), or (None, {}) to start fresh.

    --no_resume ignores checkpoints; otherwise the newest complete one is used (older ones if it is broken)."""
    if cfg.no_resume:
        return None, {}
    restored = ckpt.restore(engines, tensor_names)
    if restored is None:
        if cfg.resume:
            raise CheckpointError(f"--resume given but {ckpt.root} holds no checkpoint")
        return None, {}
    tag, state, tensors = restored
    log.info(f"resuming from {ckpt.root}/{tag} (step {state['step']}); pass --no_resume to start over")
    return state, tensors


def stop_message(stop: StopRequest, step, ckpt: Checkpointer):
    return (f"stopped by signal {stop.signal} after step {step}; checkpoint saved in {ckpt.root}/step{step}. "
            "Run the same command again to resume (pass --no_resume to start over).")


def train(cfg, engine, dataset, collate, loss_fn, eval_fn, log, rank, world_size, stage_name):
    """Runs the epochs; returns (last eval metrics, steps). Exits non-zero (after saving) on SIGTERM/SIGINT.

    A micro-batch whose loss is not finite is dropped before backward (no engine.step either, so DeepSpeed's
    accumulation window stays aligned and the next micro-batch takes its place); with ZeRO 0 a non-finite
    accumulated gradient drops the window (ZeRO 1-3: DeepSpeed skips that step itself, and it is counted; fp16:
    its loss scaler skips the step and lowers the scale). Every rank drops and counts alike (utils/guards.py)."""
    ckpt = Checkpointer(cfg.output_dir, cfg.save_total_limit, rank, log, fresh=cfg.no_resume)
    guard = NonFiniteGuard(cfg.max_bad_steps, stage_name)
    stop = StopRequest()
    accum = cfg.gradient_accumulation_steps
    per_epoch = steps_per_epoch(len(dataset), cfg.per_device_train_batch_size, world_size, accum)
    total = cfg.max_steps or per_epoch * cfg.num_train_epochs
    step, epoch0, batch0 = 0, 0, 0
    state, _ = resume(cfg, ckpt, {"model": engine}, log)
    if state:
        step, epoch0, batch0 = state["step"], state["epoch"], state["next_batch"]
        guard.load(state.get("guard"))
    bar = log.progress(total, initial=step, desc=stage_name)
    window = {}
    metrics = {}
    count_ds_skips = not engine.fp16_enabled()  # fp16 loss-scale overflows are DeepSpeed's business

    def save():
        ckpt.save({"model": engine}, step, {"epoch": epoch, "next_batch": b + 1, "guard": guard.state()})

    engine.train()
    for epoch in range(epoch0, cfg.num_train_epochs if not cfg.max_steps else 10 ** 9):
        batches = epoch_batches(len(dataset), cfg.per_device_train_batch_size, world_size, rank, cfg.seed, epoch)
        for b in range(batch0 if epoch == epoch0 else 0, len(batches)):
            if step >= total:
                break
            set_phase(f"{stage_name} training step {step + 1}")
            batch = collate([dataset[i] for i in batches[b]])
            loss, m = loss_fn(engine, batch)
            if not guard.check(step + 1, {"loss": loss.detach()}, reset=False):  # a run of bad updates ends
                continue                                                         # with an update (below)
            boundary = engine.is_gradient_accumulation_boundary()
            if not _backward_and_step(engine, loss, guard, step + 1, boundary, count_ds_skips):
                continue
            for k, v in m.items():
                window.setdefault(k, []).append(float(v))
            if not boundary:
                continue
            step += 1
            _log_step(log, bar, engine, window, epoch, step)
            window = {}
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < total:
                set_phase(f"{stage_name} evaluation after step {step}")
                metrics = eval_fn()
                log.scalars(metrics, step)
                log.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                engine.train()
            if (cfg.save_interval and step % cfg.save_interval == 0) or stop.requested:
                save()
            if stop.requested:
                bar.close()
                log.info(stop_message(stop, step, ckpt))
                sys.exit(128 + int(stop.signal))
        if step >= total:
            break
    bar.close()
    stop.close()
    if guard.total:
        log.info(f"{guard.total} update(s) skipped because the loss or gradient was not finite")
    set_phase(f"{stage_name} final evaluation")
    metrics = eval_fn()
    log.scalars(metrics, step)
    return metrics, step


def _backward_and_step(engine, loss, guard, step, boundary, count_ds_skips) -> bool:
    """Backward and DeepSpeed's step of one micro-batch; False when a non-finite accumulated gradient (ZeRO 0)
    dropped the window. At a boundary the guard counts DeepSpeed's own skipped steps as bad updates (not fp16
    overflows: those are its loss scaler's) and resets after a completed one."""
    engine.backward(loss)
    if boundary and not gradients_finite(engine):
        guard.check(step, {"gradient": float("nan")})
        engine.zero_grad()
        return False
    skipped_before = engine.skipped_steps
    engine.step()
    if boundary:
        ds_skipped = count_ds_skips and engine.skipped_steps > skipped_before
        guard.check(step, {"gradient": float("nan") if ds_skipped else 0.0})
    return True


def _log_step(log, bar, engine, window, epoch, step):
    """The means of a finished optimizer step's micro-batch metrics and the LR: TensorBoard, console, bar."""
    logged = {k: sum(v) / len(v) for k, v in window.items()}
    logged["train/lr"] = engine.get_lr()[0]
    log.scalars(logged, step)
    if log.print_loss and "train/loss" in logged:
        log.info(f"epoch {epoch} step {step} loss {logged['train/loss']:.4f}")
    bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logged.items() if k != "train/lr"})
    bar.update(1)
