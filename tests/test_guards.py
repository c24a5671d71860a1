"""Guards every rank agrees on (a NaN on one rank skips the update on all of them, a reward/KL guard stops all
of them), and fp16 overflows left to DeepSpeed's loss scaler.

The 2-process tests use plain torch.distributed (gloo, spawned processes, no DeepSpeed) with a timeout on the
process group and on the join, so a disagreement fails the test instead of hanging it.
"""
import datetime
import os
import queue
import signal
import socket
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.guards import INJECT_NAN_ENV, NonFiniteGuard, agreed_max, any_rank, gradients_finite, loss_scaler_active
from utils.train_loop import train

WORLD = 2


class StandInEngine:
    """The parts of a DeepSpeed engine the guards and train() use. `grad` is what backward leaves on every
    parameter; under fp16 step() behaves like DeepSpeed's loss scaler on an overflow (skips, halves the scale)."""

    def __init__(self, grad=1.0, fp16=False, zero_stage=0):
        self.module = torch.nn.Linear(2, 1)
        self.grad, self.fp16, self.zero_stage = grad, fp16, zero_stage
        self.steps, self.skipped_steps, self.loss_scale = 0, 0, 2.0 ** 16

    def fp16_enabled(self):
        return self.fp16

    def zero_optimization_stage(self):
        return self.zero_stage

    def is_gradient_accumulation_boundary(self):
        return True

    def backward(self, loss):
        for p in self.module.parameters():
            p.grad = torch.full_like(p, self.grad)

    def step(self):
        self.steps += 1
        grads = [p.grad for p in self.module.parameters()]
        if self.fp16 and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            self.skipped_steps += 1
            self.loss_scale /= 2

    def zero_grad(self):
        for p in self.module.parameters():
            p.grad = None

    def train(self):
        pass

    def get_lr(self):
        return [0.1]


def _after_backward(grad, **kw):
    engine = StandInEngine(grad, **kw)
    engine.backward(None)
    return engine


# ---------------------------------------------------------------- two ranks, a NaN on one of them


def _on_two_ranks(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    from step3_rlhf.loop import check_guards
    out = {}
    try:
        # the fault-injection variable set in rank 1 only: its checks at steps 2 and 3 see a NaN
        if rank == 1:
            os.environ[INJECT_NAN_ENV] = "2,3"
        guard = NonFiniteGuard(max_bad_steps=2, stage="s")
        out["checks"] = [guard.check(1, {"loss": 1.0}), guard.check(2, {"loss": 1.0})]
        out["counters"] = guard.state()
        try:
            guard.check(3, {"loss": 1.0})
            out["raised"] = False
        except FloatingPointError:
            out["raised"] = True
        # a NaN term passed on rank 0 only
        guard = NonFiniteGuard(max_bad_steps=5, stage="s")
        out["term_check"] = guard.check(1, {"loss": float("nan") if rank == 0 else 0.5})
        out["term_counters"] = guard.state()
        out["grads_finite"] = gradients_finite(_after_backward(float("inf") if rank == 1 else 1.0))
        cfg = types.SimpleNamespace(reward_guard=10.0, kl_guard=5.0)
        for name, stats in (("reward_guard", {"reward/mean": 0.0, "reward/abs_max": 12.0 if rank == 1 else 1.0}),
                            ("kl_guard", {"reward/mean": 0.0, "reward/abs_max": 1.0,
                                          "kl/mean": 6.0 if rank == 0 else float("nan")})):
            try:
                check_guards(cfg, stats, 1)
                out[name] = False
            except FloatingPointError:
                out[name] = True
        out["agreed"] = agreed_max({"a": float("nan") if rank == 0 else 2.0, "b": float(rank)}, ("a", "b", "c"))
        out["any"] = [any_rank(rank == 0), any_rank(False)]
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the test with it
        out["error"] = f"{type(e).__name__}: {e}"
    results.put((rank, out))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_rank_skips_counts_and_stops_together():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_on_two_ranks, args=(r, port, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=240) for _ in range(WORLD))
    except queue.Empty:
        got = None
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    assert got is not None, "a rank did not report within 240 s (hung in a collective?)"
    assert "error" not in got[0] and "error" not in got[1], got
    for rank in range(WORLD):
        out = got[rank]
        assert out["checks"] == [True, False], (rank, out)   # step 2 skipped on both ranks
        assert out["counters"] == {"in_a_row": 1, "total": 1}, (rank, out)
        assert out["raised"], (rank, out)                     # max_bad_steps reached on both ranks
        assert out["term_check"] is False and out["term_counters"] == {"in_a_row": 1, "total": 1}, (rank, out)
        assert out["grads_finite"] is False, (rank, out)
        assert out["reward_guard"] and out["kl_guard"], (rank, out)
        assert out["agreed"] == {"a": 2.0, "b": 1.0}, (rank, out)  # a NaN counts as -inf; absent keys left out
        assert out["any"] == [True, False], (rank, out)


def test_one_process_needs_no_process_group():
    # (an in-process stage run earlier in the session may have left a 1-process group: the same answers)
    assert not dist.is_initialized() or dist.get_world_size() == 1
    assert agreed_max({"x": float("inf"), "y": 3.0}, ("x", "y")) == {"x": float("-inf"), "y": 3.0}
    assert any_rank(True) and not any_rank(False)
    assert gradients_finite(_after_backward(1.0)) and not gradients_finite(_after_backward(float("nan")))


# ---------------------------------------------------------------- fp16: the loss scaler sees the overflow


def _run_train(tmp_path, engine, max_bad_steps=10, n=3):
    cfg = types.SimpleNamespace(output_dir=str(tmp_path), save_total_limit=1, no_resume=True, resume=False,
                                max_bad_steps=max_bad_steps, gradient_accumulation_steps=1,
                                per_device_train_batch_size=1, max_steps=0, num_train_epochs=1, seed=0,
                                eval_interval=0, save_interval=0)
    messages = []
    bar = types.SimpleNamespace(set_postfix=lambda *a, **k: None, update=lambda *a: None, close=lambda: None)
    log = types.SimpleNamespace(info=messages.append, scalars=lambda *a: None, progress=lambda *a, **k: bar,
                                print_loss=False)
    loss_fn = lambda eng, batch: (torch.tensor(1.0), {"train/loss": 1.0})  # noqa: E731
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        train(cfg, engine, list(range(n)), lambda rows: rows, loss_fn, lambda: {}, log, 0, 1, "stage")
    finally:  # a run stopped by the guard leaves its StopRequest handlers installed
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return messages


def test_fp16_overflow_reaches_engine_step_so_the_scale_comes_down(tmp_path):
    engine = StandInEngine(grad=float("inf"), fp16=True)
    messages = _run_train(tmp_path, engine)
    assert engine.steps == 3 and engine.skipped_steps == 3 and engine.loss_scale == 2.0 ** 13
    assert not any("skipped" in m for m in messages)  # the loss scaler's business, not a bad update


@pytest.mark.parametrize("grad,steps,skipped", [(float("inf"), 0, 3), (1.0, 3, 0)])
def test_bf16_fp32_zero0_skip_non_finite_gradients_themselves(tmp_path, grad, steps, skipped):
    engine = StandInEngine(grad=grad, fp16=False)
    messages = _run_train(tmp_path, engine)
    assert engine.steps == steps
    assert any(f"{skipped} update(s) skipped" in m for m in messages) == bool(skipped)
    with pytest.raises(FloatingPointError, match="'gradient' is not finite for 2"):
        _run_train(tmp_path, StandInEngine(grad=float("inf")), max_bad_steps=2)


def test_loss_scaler_active():
    assert loss_scaler_active(StandInEngine(fp16=True)) and not loss_scaler_active(StandInEngine())
    engine = _after_backward(float("nan"))
    engine.optimizer = types.SimpleNamespace(loss_scale_config=types.SimpleNamespace(use_grad_scaling=True))
    assert loss_scaler_active(engine) and gradients_finite(engine)
    engine.optimizer.loss_scale_config.use_grad_scaling = False  # DeepSpeed's bf16 wrapper: no scaling
    assert not loss_scaler_active(engine) and not gradients_finite(engine)
