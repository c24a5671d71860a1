"""Random state of a process: seeding, capture/restore for checkpoints, and forking it around evaluation.

A checkpoint holds every RNG of every rank (torch CPU, the current CUDA device's, numpy, Python) so a resumed
run samples exactly what the interrupted one would have; `fork_rng` lets evaluation sample with its own seed
without moving the training stream, on CPU and on the accelerator.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed):
    """Seed Python, numpy, torch and every CUDA device alike (each stage calls it once at start)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_tensors():
    """This process's torch RNG states as tensors (CPU, and the current CUDA device's when there is one)."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def rng_json():
    """numpy's and Python's RNG states as JSON-able lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def restore_rng(tensors, js):
    """Put back what `rng_tensors` and `rng_json` captured."""
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = js["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def fork_devices() -> list:
    """The devices whose RNG `fork_rng` saves besides the CPU's: the current CUDA device when there is one
    (torch.random.fork_rng(devices=[]) forks the CPU RNG only, so sampling on the GPU would move the training
    stream)."""
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


def fork_rng():
    """A context in which the CPU and the current accelerator's RNGs may be reseeded and used; both are put
    back on exit."""
    return torch.random.fork_rng(devices=fork_devices())
