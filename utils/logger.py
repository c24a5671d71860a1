"""What a user watches: TensorBoard scalars, a progress bar, and rank-0 console lines."""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager

from utils.phase import set_phase


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
