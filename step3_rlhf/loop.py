"""The step-3 loop: prompts -> experience -> updates, with stats, guards, checkpoints and resume.

One step = `generation_batches` experience batches, then `ppo_epochs` passes over them in micro-batches of
`per_device_training_batch_size`. A resumed run repeats the interrupted one exactly: the checkpoint holds the
trained engines, every RNG (so sampling repeats), the prompt position, the PTX position, the EMA copy, the
guard counters and the per-step history.
"""
from __future__ import annotations

import math
import sys

from step3_rlhf.experience_maker import experience_stats
from utils.checkpoint import Checkpointer
from utils.guards import StopRequest, agreed_max
from utils.train_loop import epoch_batches, resume, stop_message


def check_guards(cfg, stats, step):
    """--reward_guard / --kl_guard: a reward model whose scores explode or a KL that runs away stops the run
    (non-finite values are the NonFiniteGuard's: that step is skipped and counted). Decided on the maxima over
    all ranks, so every rank raises together."""
    stats = agreed_max(stats, ("reward/abs_max", "kl/mean"))
    if math.isfinite(stats["reward/abs_max"]) and stats["reward/abs_max"] > cfg.reward_guard:
        raise FloatingPointError(f"step3_rlhf: step {step}: a reward of magnitude {stats['reward/abs_max']:.4g} is "
                                 f"beyond --reward_guard {cfg.reward_guard} (mean {stats['reward/mean']:.4g}); is "
                                 "the reward model broken?")
    kl = stats.get("kl/mean", 0.0)
    if math.isfinite(kl) and kl > cfg.kl_guard:
        raise FloatingPointError(f"step3_rlhf: step {step}: KL to the reference {kl:.4g} passed --kl_guard "
                                 f"{cfg.kl_guard}; lower the learning rate or raise --kl_ctl")


def fit(maker, trainer, prompts, total_steps):
    """Runs `total_steps` RL steps over `prompts` (resuming if a checkpoint is there): per step `maker` makes
    the experience of `generation_batches` prompt batches and `trainer` updates on it. Returns per-step stats."""
    cfg, ctx, log = trainer.cfg, trainer.ctx, trainer.log
    ckpt = Checkpointer(cfg.output_dir, cfg.save_total_limit, ctx.rank, log, fresh=cfg.no_resume)
    engines = {"actor": trainer.e.actor, **({"critic": trainer.e.critic} if trainer.e.critic is not None else {})}
    stop = StopRequest()
    step, epoch0, batch0, history = 0, 0, 0, []
    state, tensors = resume(cfg, ckpt, engines, log, ["ema"] if trainer.ema else [])
    if state:
        if trainer.ema:
            trainer.ema.shadow = tensors["ema"]
        if trainer.ptx is not None and state.get("ptx"):
            trainer.ptx.load(state["ptx"])
        trainer.guard.load(state.get("guard"))
        step, epoch0, batch0, history = state["step"], state["epoch"], state["next_batch"], state.get("history", [])
    bar = log.progress(total_steps, initial=step)  # named by the logger: cfg.stage_name
    epoch = epoch0
    while step < total_steps:
        batches = epoch_batches(len(prompts), cfg.per_device_generation_batch_size, ctx.world_size, ctx.rank,
                                cfg.seed, epoch)
        b = batch0 if epoch == epoch0 else 0
        while b < len(batches) and step < total_steps:
            group = batches[b:b + cfg.generation_batches]
            exps = [maker.make([prompts[i] for i in idx]) for idx in group]
            stats = experience_stats(exps)
            check_guards(cfg, stats, step + 1)
            finite = {"reward": stats["reward/mean"], "KL": stats.get("kl/mean")}
            if trainer.guard.check(step + 1, finite, reset=False):  # non-finite: skip the update, count it
                with log.timer("time/training"):
                    stats.update(trainer.train_on(exps, step + 1))
                maker.rollout.sync_weights()  # the next rollout samples from the updated actor
            stats.update(log.pop_timers())
            step, b = step + 1, b + len(group)
            history.append(stats)
            log.scalars(stats, step)
            bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats.get('kl/mean', 0.0):.3f}",
                            len=f"{stats['response/length']:.0f}")
            bar.update(1)
            if (cfg.save_interval and step % cfg.save_interval == 0) or stop.requested:
                state = {"epoch": epoch, "next_batch": b, "guard": trainer.guard.state(), "history": history,
                         "ptx": trainer.ptx.state() if trainer.ptx is not None else None}
                ckpt.save(engines, step, state, {"ema": trainer.ema.shadow} if trainer.ema else None)
            if stop.requested:
                bar.close()
                log.info(stop_message(stop, step, ckpt))
                sys.exit(128 + int(stop.signal))
        epoch += 1
    bar.close()
    stop.close()
    if trainer.guard.total:
        log.info(f"{trainer.guard.total} update(s) skipped because a loss, reward or KL was not finite")
    return history
