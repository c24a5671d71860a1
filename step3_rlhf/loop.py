"""The step-3 loop: prompts -> experience -> updates, with stats, guards, checkpoints and resume.

One step = `generation_batches` experience batches (--dynamic_sampling: the groups with a learning signal of
as many batches as it takes, step3_rlhf/dynamic_sampling.py), then `ppo_epochs` passes over them in
micro-batches of `per_device_training_batch_size`. A resumed run repeats the interrupted one exactly: the
checkpoint holds the trained engines, every RNG (so sampling repeats), the prompt position (refills
included), the PTX position, the EMA copy, the guard counters and the per-step history.
"""
from __future__ import annotations

import math
import sys
import time

from step3_rlhf.dynamic_sampling import dynamic_sample
from step3_rlhf.evaluate import eval_scalars, warn_on_hacking_trend
from step3_rlhf.experience_stats import experience_stats
from utils.checkpoint import Checkpointer
from utils.guards import StopRequest, agreed_max, any_rank
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


class PromptCursor:
    """This rank's prompt order, one generation batch after another across epochs (epoch_batches: seeded per
    epoch, the same count on every rank). `take(k)` gives up to k batches of the current epoch (a step's
    group never spans two epochs); refills of --dynamic_sampling take theirs from here too, so the checkpoint's
    (epoch, next_batch) is where the next prompt comes from either way."""

    def __init__(self, n, cfg, ctx, epoch=0, next_batch=0):
        self.n, self.cfg, self.ctx = n, cfg, ctx
        self.epoch, self.b, self._batches = epoch, next_batch, None

    def _current(self):
        if self._batches is None:
            self._batches = epoch_batches(self.n, self.cfg.per_device_generation_batch_size, self.ctx.world_size,
                                          self.ctx.rank, self.cfg.seed, self.epoch)
        return self._batches

    def take(self, k):
        if self.b >= len(self._current()):
            self.epoch, self.b, self._batches = self.epoch + 1, 0, None
        group = self._current()[self.b:self.b + k]
        self.b += len(group)
        return group


def _experience(maker, prompts, cursor, cfg, log, step):
    """(experiences to train on, every experience made this step, extra stats) of one step."""
    make = lambda idx: maker.make([prompts[i] for i in idx])  # noqa: E731
    exps = [make(idx) for idx in cursor.take(cfg.generation_batches)]
    if not cfg.dynamic_sampling:
        return exps, exps, {}
    train_exps, made, ds = dynamic_sample(exps, lambda: make(cursor.take(1)[0]), cfg, maker.tok.pad_token_id)
    if ds["dynamic_sampling/short"]:
        log.info(f"step {step}: dynamic sampling: {ds['dynamic_sampling/trained_groups']:.0f} groups with reward "
                 f"variance after {ds['dynamic_sampling/refill_rounds']:.0f} refill round(s) (--max_refill_rounds "
                 f"{cfg.max_refill_rounds}); the step trains on those")
    return train_exps, made, ds


def out_of_time(cfg, seconds) -> bool:
    """--max_train_seconds spent? Decided on the slowest rank's clock, so every rank stops at the same step."""
    return bool(cfg.max_train_seconds) and any_rank(seconds >= cfg.max_train_seconds)


def fit(maker, trainer, prompts, total_steps, evaluate=None):
    """Runs `total_steps` RL steps over `prompts` (resuming if a checkpoint is there), or fewer when
    --max_train_seconds runs out: per step `maker` makes the experience of `generation_batches` prompt batches
    (and refills, --dynamic_sampling) and `trainer` updates on it; every --eval_interval steps except the last
    (the caller's after-run evaluation covers that) `evaluate()` adds its eval/* scalars. Returns per-step stats."""
    cfg, ctx, log = trainer.cfg, trainer.ctx, trainer.log
    ckpt = Checkpointer(cfg.output_dir, cfg.save_total_limit, ctx.rank, log, fresh=cfg.no_resume)
    engines = {"actor": trainer.e.actor, **({"critic": trainer.e.critic} if trainer.e.critic is not None else {})}
    stop = StopRequest()
    step, history, seconds = 0, [], 0.0
    cursor = PromptCursor(len(prompts), cfg, ctx)
    state, tensors = resume(cfg, ckpt, engines, log, ["ema"] if trainer.ema else [])
    if state:
        if trainer.ema:
            trainer.ema.shadow = tensors["ema"]
        if trainer.ptx is not None and state.get("ptx"):
            trainer.ptx.load(state["ptx"])
        trainer.guard.load(state.get("guard"))
        step, history, seconds = state["step"], state.get("history", []), state.get("train_seconds", 0.0)
        cursor = PromptCursor(len(prompts), cfg, ctx, state["epoch"], state["next_batch"])
    bar = log.progress(total_steps, initial=step)  # named by the logger: cfg.stage_name
    done = step >= total_steps
    while not done:
        started = time.monotonic()
        exps, made, extra = _experience(maker, prompts, cursor, cfg, log, step + 1)
        stats = {**experience_stats(made, cfg.num_generations), **extra}
        check_guards(cfg, stats, step + 1)
        finite = {"reward": stats["reward/mean"], "KL": stats.get("kl/mean")}
        if trainer.guard.check(step + 1, finite, reset=False):  # non-finite: skip the update, count it
            with log.timer("time/training"):
                stats.update(trainer.train_on(exps, step + 1))
            maker.rollout.sync_weights()  # the next rollout samples from the updated actor
        stats.update(log.pop_timers())
        step += 1
        seconds += time.monotonic() - started
        done = step >= total_steps or out_of_time(cfg, seconds)
        if evaluate is not None and cfg.eval_interval and step % cfg.eval_interval == 0 and not done:
            stats.update(eval_scalars(evaluate()))
        stats["detect/hacking_trend"] = warn_on_hacking_trend(history, stats, cfg, log, step)
        history.append(stats)
        log.scalars(stats, step)
        bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats.get('kl/mean', 0.0):.3f}",
                        len=f"{stats['response/length']:.0f}")
        bar.update(1)
        if (cfg.save_interval and step % cfg.save_interval == 0) or stop.requested:
            state = {"epoch": cursor.epoch, "next_batch": cursor.b, "guard": trainer.guard.state(),
                     "history": history, "train_seconds": seconds, "ptx": trainer.ptx.state() if trainer.ptx is not None else None}
            ckpt.save(engines, step, state, {"ema": trainer.ema.shadow} if trainer.ema else None)
        if stop.requested:
            bar.close()
            log.info(stop_message(stop, step, ckpt))
            sys.exit(128 + int(stop.signal))
    bar.close()
    stop.close()
    if step < total_steps:
        log.info(f"--max_train_seconds {cfg.max_train_seconds:g} spent after {step} of {total_steps} steps")
    if trainer.guard.total:
        log.info(f"{trainer.guard.total} update(s) skipped because a loss, reward or KL was not finite")
    return history
