"""What stops or skips a training step: stop signals, non-finite losses and gradients, and rank agreement.

Every decision here that makes a rank skip an update (and so its collectives: DeepSpeed's gradient
all-reduce, ZeRO-3's gathers) or raise is taken on values all-reduced over the ranks, so every rank skips,
counts and stops together; a rank deciding alone would leave the others waiting in a collective (a gloo
"collective mismatch" or a hang).
"""
from __future__ import annotations

import math
import os
import signal

import torch


def _over_ranks(values: list[float], op: str) -> list[float]:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    # NCCL reduces CUDA tensors only; gloo (and DeepSpeed's CPU backend) CPU ones
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def max_over_ranks(values: list[float]) -> list[float]:
    """Element-wise maximum of `values` over all ranks (as given on one process). Non-finite values count as
    -inf, so a NaN on one rank neither wins nor hides another rank's finite maximum. Every rank must call it at
    the same point (it is a collective when torch.distributed runs more than one process)."""
    return _over_ranks([float(v) if math.isfinite(float(v)) else -math.inf for v in values], "MAX")


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64: exact for counts); a collective like max_over_ranks."""
    return _over_ranks([float(v) for v in values], "SUM")


def agreed_max(stats: dict, keys) -> dict:
    """A copy of `stats` whose entries named in `keys` (those present; the same on every rank) hold their maximum
    over all ranks (non-finite: -inf), so a decision taken on them is the same on every rank."""
    keys = [k for k in keys if k in stats]
    return {**stats, **dict(zip(keys, max_over_ranks([stats[k] for k in keys])))}


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on at least one rank (a collective when more than one process runs)."""
    return max_over_ranks([1.0 if flag else 0.0])[0] > 0


# ---------------------------------------------------------------- stopping


class StopRequest:
    """SIGTERM/SIGINT: finish the current step, save, then exit non-zero with how to resume."""

    def __init__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def close(self):
        """Give the process its own handlers back (a stage run in-process must not swallow the next Ctrl-C)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    @property
    def requested(self):
        return self.signal is not None


INJECT_NAN_ENV = "RLHFKIT_INJECT_NAN_AT_STEP"


def _injection_plan(spec: str) -> dict:
    """'5' -> {5: [1, None]}; '5:3,9@value loss' -> {5: [3, None], 9: [1, 'value loss']}: how many checks at
    each step get a NaN, and in which term (None: the first one checked)."""
    plan = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        part, _, term = part.partition("@")
        step, _, times = part.partition(":")
        plan[int(step)] = [int(times or 1), term or None]
    return plan


class NonFiniteGuard:
    """Counts consecutive non-finite updates; each is skipped, and `max_bad_steps` in a row stop the run.

    Fault injection for tests (the one place it is read): RLHFKIT_INJECT_NAN_AT_STEP=N[:K][@TERM][,M...]
    makes the first K checks at step N see a NaN in TERM (default: the first term), as if it had come out NaN."""

    def __init__(self, max_bad_steps, stage):
        self.max_bad = max_bad_steps
        self.stage = stage
        self.in_a_row = 0
        self.total = 0
        self.inject = _injection_plan(os.environ.get(INJECT_NAN_ENV, ""))

    def check(self, step, terms: dict, reset=True) -> bool:
        """True if every term is finite on every rank; otherwise counts it, and raises after max_bad_steps in a
        row (on every rank alike: each call is a collective when more than one process runs).
        `reset=False`: a finite result does not end a run of bad updates (for checks that are not updates)."""
        left, term = self.inject.get(step, (0, None))
        if left > 0 and terms and (term is None or term in terms):
            self.inject[step][0] -= 1
            terms = {**terms, term or next(iter(terms)): float("nan")}
        bad = [k for k, v in terms.items() if v is not None and not bool(torch.isfinite(torch.as_tensor(v)).all())]
        if not any_rank(bool(bad)):  # every rank skips and counts together (see the module docstring)
            self.in_a_row = 0 if reset else self.in_a_row
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_bad:
            what = f"'{bad[0]}'" if bad else "a term on another rank"
            raise FloatingPointError(f"{self.stage}: step {step}: {what} is not finite for {self.in_a_row} "
                                     f"update(s) in a row (--max_bad_steps {self.max_bad}); lower the learning rate "
                                     "or use --dtype bf16/fp32")
        return False

    def state(self) -> dict:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load(self, state: dict | None):
        if state:
            self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])


def loss_scaler_active(engine) -> bool:
    """Whether DeepSpeed scales the loss (fp16): its optimizer then checks the gradients itself, and a step that
    overflowed must reach engine.step(), which skips it and lowers the scale."""
    if engine.fp16_enabled():
        return True
    config = getattr(getattr(engine, "optimizer", None), "loss_scale_config", None)
    return bool(getattr(config, "use_grad_scaling", False))


def gradients_finite(engine) -> bool:
    """Whether the accumulated gradients are finite on every rank. Only ZeRO 0 keeps whole gradients on the
    parameters, and only there does DeepSpeed not check them itself (ZeRO 1-3 skip a step whose gradient norm
    is not finite). Under fp16 it always answers True: skipping engine.step() on an overflow would keep the
    dynamic loss scale from ever coming down, so DeepSpeed's scaler handles it (skips the step, halves the
    scale)."""
    if engine.zero_optimization_stage() != 0 or loss_scaler_active(engine):
        return True
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
    return not any_rank(not finite)
