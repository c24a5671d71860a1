"""DeepSpeed engines, their optimizers/schedules, and resumable checkpoints shared by every stage.

A checkpoint is one folder per optimizer step, `OUTPUT_DIR/checkpoints/stepN/`, holding each engine's
DeepSpeed checkpoint (model, optimizer, scheduler, ZeRO partitions) plus `trainer_state.json` (step, data
position, running stats) and `rng.safetensors` (every RNG). `checkpoints/latest` names the newest complete one
and is replaced atomically after everything else is on disk, so a crash mid-save leaves the previous one in use.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal

import numpy as np
import torch

from utils.ds_config import eval_ds_config, train_ds_config


def optimizer_groups(model, lr, weight_decay, lora_lr=None):
    """AdamW groups: no decay on biases/norms; LoRA weights get their own learning rate."""
    groups = {"decay": [], "no_decay": [], "lora": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_" in name and lora_lr:
            groups["lora"].append(p)
        elif p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    out = [{"params": groups["decay"], "weight_decay": weight_decay, "lr": lr},
           {"params": groups["no_decay"], "weight_decay": 0.0, "lr": lr},
           {"params": groups["lora"], "weight_decay": 0.0, "lr": lora_lr or lr}]
    return [g for g in out if g["params"]]


def build_train_engine(model, *, lr, weight_decay, total_steps, warmup_steps, scheduler, micro_batch, grad_accum,
                       world_size, zero_stage, offload, dtype, grad_clip, lora_lr=None, **ds_extra):
    import deepspeed
    from transformers import get_scheduler
    optimizer = torch.optim.AdamW(optimizer_groups(model, lr, weight_decay, lora_lr), lr=lr, betas=(0.9, 0.95))
    sched = get_scheduler(scheduler, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1))
    config = train_ds_config(micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size,
                             zero_stage=zero_stage, offload=offload, dtype=dtype, grad_clip=grad_clip, **ds_extra)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=sched, config=config)
    return engine


def build_frozen_engine(model, *, micro_batch, world_size, zero_stage=0, offload=False, dtype=torch.float32):
    import deepspeed
    model.requires_grad_(False)
    model.eval()
    config = eval_ds_config(micro_batch=micro_batch, world_size=world_size, zero_stage=zero_stage, offload=offload,
                            dtype=dtype)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _rng_tensors():
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _rng_json():
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def _restore_rng(tensors, js):
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = js["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


class Checkpointer:
    """Save/restore every engine plus trainer state; keeps the newest `keep` checkpoints."""

    def __init__(self, output_dir, keep=2, rank=0):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep = max(1, keep)
        self.rank = rank

    def latest(self):
        """(tag, trainer_state) of the newest complete checkpoint, or None."""
        path = os.path.join(self.root, "latest")
        if not os.path.exists(path):
            return None
        tag = open(path).read().strip()
        state_file = os.path.join(self.root, tag, "trainer_state.json")
        if not os.path.exists(state_file):
            raise RuntimeError(f"checkpoint '{tag}' named by {path} is incomplete (no trainer_state.json)")
        with open(state_file) as f:
            return tag, json.load(f)

    def save(self, engines: dict, step: int, state: dict, tensors: dict | None = None):
        """`tensors`: extra named tensor dicts (e.g. an EMA copy), written as safetensors by rank 0."""
        import torch.distributed as dist
        from safetensors.torch import save_file
        tag = f"step{step}"
        folder = os.path.join(self.root, tag)
        for name, engine in engines.items():
            engine.save_checkpoint(os.path.join(folder, name), tag="ds", save_latest=False)
        if self.rank == 0:
            os.makedirs(folder, exist_ok=True)
            for name, tdict in (tensors or {}).items():
                save_file({k: v.contiguous() for k, v in tdict.items()}, os.path.join(folder, f"{name}.safetensors"))
            save_file(_rng_tensors(), os.path.join(folder, "rng.safetensors"))
            with open(os.path.join(folder, "trainer_state.json"), "w") as f:
                json.dump({**state, "step": step, "rng": _rng_json()}, f)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            tmp = os.path.join(self.root, ".latest.tmp")
            with open(tmp, "w") as f:
                f.write(tag)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.root, "latest"))
            self._prune(tag)
        if dist.is_initialized():
            dist.barrier()

    def _prune(self, current):
        tags = sorted((d for d in os.listdir(self.root) if d.startswith("step") and d != current),
                      key=lambda d: int(d[4:]))
        for old in tags[: max(0, len(tags) - (self.keep - 1))]:
            shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)

    def load(self, engines: dict, tag: str, state: dict, tensor_names=()):
        """Restores engines and RNGs; returns the extra tensor dicts named in `tensor_names`."""
        from safetensors.torch import load_file
        folder = os.path.join(self.root, tag)
        for name, engine in engines.items():
            path, _ = engine.load_checkpoint(os.path.join(folder, name), tag="ds", load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"could not load the '{name}' engine from {folder}")
        _restore_rng(load_file(os.path.join(folder, "rng.safetensors")), state["rng"])
        return {name: load_file(os.path.join(folder, f"{name}.safetensors")) for name in tensor_names}


class StopRequest:
    """SIGTERM/SIGINT: finish the current step, save, then exit non-zero with how to resume."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    @property
    def requested(self):
        return self.signal is not None


class NonFiniteGuard:
    """Counts consecutive non-finite steps; the step is skipped, and too many in a row stop the run."""

    def __init__(self, max_bad_steps, stage):
        self.max_bad = max_bad_steps
        self.stage = stage
        self.in_a_row = 0
        self.total = 0

    def check(self, step, terms: dict) -> bool:
        """True if every term is finite; otherwise counts it, and raises after max_bad_steps in a row."""
        bad = [k for k, v in terms.items() if v is not None and not bool(torch.isfinite(torch.as_tensor(v)).all())]
        if not bad:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_bad:
            raise FloatingPointError(f"{self.stage}: step {step}: '{bad[0]}' is not finite for {self.in_a_row} "
                                     f"steps in a row (--max_bad_steps {self.max_bad}); lower the learning rate or "
                                     "use --dtype bf16/fp32")
        return False
