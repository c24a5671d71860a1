"""What a user watches: TensorBoard scalars, a progress bar, and rank-0 console lines.

A stage's start is a few lines (what runs, where, with what) and then progress bars: `quiet_libraries`
mutes what the libraries print that nobody acts on - DeepSpeed's memory dumps ("begin bf16_optimizer MA
... GB", printed by its optimizers unconditionally), transformers' per-load weight progress bars, and its LOAD
REPORT when the only missing weights are a value head we initialise ourselves (score.* / classifier.*).
Anything else transformers or DeepSpeed warn about stays visible.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager

from utils.phase import set_phase

_HEAD_PREFIXES = ("score.", "classifier.")
_LM_HEAD = "lm_head."  # a step-1 checkpoint's LM head, which a value model has no use for
# DeepSpeed modules that import see_memory_usage by name and call it with force=True
_DS_MEMORY_DUMPERS = ("deepspeed.runtime.bf16_optimizer", "deepspeed.runtime.zero.stage_1_and_2",
                      "deepspeed.runtime.zero.stage3", "deepspeed.runtime.engine")


def expected_head_report(message: str) -> bool:
    """True for a transformers LOAD REPORT whose every listed key is a missing value-head weight or an unused
    LM head (what loading a causal-LM checkpoint as a one-label value model always reports)."""
    if "LOAD REPORT" not in message:
        return False
    rows = [line.split("|") for line in message.splitlines() if line.count("|") >= 2]
    keys = [(r[0].strip(), r[1].strip()) for r in rows if r[0].strip() and r[0].strip() != "Key"]
    return bool(keys) and all((k.startswith(_HEAD_PREFIXES) and status == "MISSING") or
                              (k.startswith(_LM_HEAD) and status == "UNEXPECTED") for k, status in keys)


class _HeadReportFilter(logging.Filter):
    def filter(self, record):
        return not expected_head_report(str(record.getMessage()))


def _no_memory_dump(message, force=False):
    """DeepSpeed's see_memory_usage, muted unless RLHFKIT_DS_MEMORY=1 (then DeepSpeed's own)."""
    if os.environ.get("RLHFKIT_DS_MEMORY") == "1":
        from deepspeed.runtime.utils import see_memory_usage
        see_memory_usage(message, force)


def quiet_libraries():
    """Idempotent; called once per stage by RunLogger."""
    import importlib
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logger = logging.getLogger("transformers.modeling_utils")
        if not any(isinstance(f, _HeadReportFilter) for f in hf_logger.filters):
            hf_logger.addFilter(_HeadReportFilter())
    except ImportError:
        pass
    for name in _DS_MEMORY_DUMPERS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "see_memory_usage"):
            module.see_memory_usage = _no_memory_dump


class RunLogger:
    """Rank 0 writes; other ranks get no-ops so call sites need no `if rank == 0`."""

    def __init__(self, cfg, rank=0, stage="run"):
        self.rank = rank
        self.stage = stage
        self.writer = None
        self.print_loss = getattr(cfg, "print_loss", False)
        self.show_bar = rank == 0 and not getattr(cfg, "disable_progress_bar", False)
        if rank == 0 and getattr(cfg, "enable_tensorboard", False):
            from torch.utils.tensorboard import SummaryWriter
            path = cfg.tensorboard_path or os.path.join(cfg.output_dir, "tensorboard")
            self.writer = SummaryWriter(os.path.join(path, stage))
        self.timers = {}
        self.started = time.perf_counter()
        quiet_libraries()

    def elapsed(self) -> float:
        """Wall seconds since the stage started (written into its summary.json as wall_seconds)."""
        return round(time.perf_counter() - self.started, 1)

    def info(self, msg):
        if self.rank == 0:
            print(f"[{self.stage}] {msg}", file=sys.stderr, flush=True)

    def scalars(self, values: dict, step: int):
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, float(v), step)

    def progress(self, total, initial=0, desc=None):
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, desc=desc or self.stage, disable=not self.show_bar,
                    dynamic_ncols=True, file=sys.stderr)

    @contextmanager
    def timer(self, name):
        set_phase(name.split("/")[-1])  # a hang or failure report names it (utils/phase.py)
        t = time.perf_counter()
        yield
        self.timers[name] = self.timers.get(name, 0.0) + time.perf_counter() - t

    def pop_timers(self):
        out, self.timers = self.timers, {}
        return out

    def write_json(self, path, obj):
        if self.rank == 0:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=2)
            os.replace(tmp, path)

    def close(self):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
