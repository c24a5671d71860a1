"""Resumable training checkpoints of every stage.

A checkpoint is one folder per optimizer step, `OUTPUT_DIR/checkpoints/stepN/`, holding each engine's
DeepSpeed checkpoint (model, optimizer, scheduler, ZeRO partitions), `trainer_state.json` (step, data
position, running stats), `rng_rankR.{safetensors,json}` (every RNG of every rank), extra tensors such as
`ema.safetensors`, and `manifest.json` (every file with its size), written last. The folder is built under a
temporary name and renamed when complete, so a crash mid-save leaves the previous checkpoints as they were;
`checkpoints/latest` names the newest one (for people and tools; resume trusts the manifests).
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from utils.rng import restore_rng, rng_json, rng_tensors

MANIFEST = "manifest.json"
# Globals that DeepSpeed's own optimizer-state files reference. DeepSpeed unpickles its files with
# torch.load(weights_only=False), i.e. arbitrary code could run; we refuse a file that references anything
# beyond torch's weights-only set and these names (see Checkpointer.check_pickles).
DEEPSPEED_PICKLE_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address"})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot (or must not) be resumed from; printed as one line, exit 2."""


def _fsync(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_of(tag):
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else -1


def _micro_batches(engines: dict) -> dict:
    """Each engine's micro-batch per process (DeepSpeed engines say; others are skipped)."""
    get = lambda e: getattr(e, "train_micro_batch_size_per_gpu", None)  # noqa: E731
    return {name: get(e)() for name, e in engines.items() if callable(get(e))}


def _check_micro_batches(folder, saved: dict, now: dict):
    """A changed batch size would resume at the wrong data position (next_batch counts batches): refuse."""
    for name, size in now.items():
        if saved.get(name, size) != size:
            raise CheckpointError(f"{folder} was saved with a micro-batch of {saved[name]} per process ('{name}'), "
                                  f"this run has {size}: resume with the same batch size flags, or pass --no_resume")


class Checkpointer:
    """Save/restore every engine plus trainer state in OUTPUT_DIR/checkpoints/stepN; keeps the newest `keep`.

    Atomic: everything is written into `.tmp-stepN`, a manifest (every file and its size) is written last,
    then the folder is renamed to `stepN` and `latest` is replaced. A crash at any point leaves the previous
    checkpoints untouched; on resume a folder whose manifest is missing or does not match is skipped with a
    warning and the next older complete one is used. `fresh` (--no_resume): the first save removes the
    checkpoints of the earlier run, so step numbers of two runs never mix when pruning.
    """

    def __init__(self, output_dir, keep=2, rank=0, log=None, fresh=False):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep = max(1, keep)
        self.rank = rank
        self.log = log
        self.fresh = fresh

    def _warn(self, msg):
        if self.log is not None:
            self.log.info(f"warning: {msg}")
        elif self.rank == 0:
            import sys
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    def tags(self) -> list[str]:
        """Checkpoint folders, newest first (complete or not)."""
        if not os.path.isdir(self.root):
            return []
        return sorted((d for d in os.listdir(self.root) if _step_of(d) >= 0 and
                       os.path.isdir(os.path.join(self.root, d))), key=_step_of, reverse=True)

    def verify(self, tag) -> str | None:
        """None if `tag` is complete (manifest present, every file there with its recorded size), else why not."""
        folder = os.path.join(self.root, tag)
        try:
            with open(os.path.join(folder, MANIFEST)) as f:
                manifest = json.load(f)
            for rel, size in manifest["files"].items():
                path = os.path.join(folder, rel)
                if not os.path.isfile(path):
                    return f"{rel} is missing"
                if os.path.getsize(path) != size:
                    return f"{rel} has {os.path.getsize(path)} bytes, the manifest says {size}"
            with open(os.path.join(folder, "trainer_state.json")) as f:
                json.load(f)
        except FileNotFoundError as e:
            return f"{os.path.basename(e.filename or MANIFEST)} is missing (interrupted save?)"
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return f"unreadable manifest or trainer state ({type(e).__name__}: {e})"
        return None

    def _state(self, tag) -> dict:
        with open(os.path.join(self.root, tag, "trainer_state.json")) as f:
            return json.load(f)

    def latest(self):
        """(tag, trainer_state) of the newest complete checkpoint, or None (nothing is loaded)."""
        tag = next((t for t in self.tags() if self.verify(t) is None), None)
        return None if tag is None else (tag, self._state(tag))

    # -------------------------------------------------------------- save

    def save(self, engines: dict, step: int, state: dict, tensors: dict | None = None):
        """`tensors`: extra named tensor dicts (e.g. an EMA copy), written as safetensors by rank 0. A write
        that fails (a full disk) leaves the earlier checkpoints as they were and says so in one line."""
        try:
            self._save(engines, step, state, tensors)
        except OSError as e:
            shutil.rmtree(os.path.join(self.root, f".tmp-step{step}"), ignore_errors=True)  # free what it took
            kept = next((t for t in self.tags() if self.verify(t) is None), None)
            raise CheckpointError(f"cannot save checkpoint step{step} in {self.root}: {e.strerror or e}; "
                                  + (f"the previous checkpoint {kept} is intact" if kept else "no earlier checkpoint")
                                  + " (free space, then run the same command again to resume)") from None

    def _save(self, engines: dict, step: int, state: dict, tensors: dict | None = None):
        import torch.distributed as dist
        from safetensors.torch import save_file
        tag = f"step{step}"
        tmp, final = os.path.join(self.root, f".tmp-{tag}"), os.path.join(self.root, tag)
        barrier = dist.barrier if dist.is_initialized() else (lambda: None)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed earlier
            os.makedirs(tmp)
        barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(os.path.join(tmp, name), tag="ds", save_latest=False)
        save_file(rng_tensors(), os.path.join(tmp, f"rng_rank{self.rank}.safetensors"))
        with open(os.path.join(tmp, f"rng_rank{self.rank}.json"), "w") as f:
            json.dump(rng_json(), f)
        if self.rank == 0:
            for name, tdict in (tensors or {}).items():
                save_file({k: v.contiguous() for k, v in tdict.items()}, os.path.join(tmp, f"{name}.safetensors"))
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({**state, "step": step, "world_size": world, "micro_batch": _micro_batches(engines)}, f)
        barrier()
        if self.rank == 0:
            self._commit(tmp, final, tag, step)
        barrier()

    def _commit(self, tmp, final, tag, step):
        files = {}
        for dirpath, _, names in os.walk(tmp):
            for n in names:
                path = os.path.join(dirpath, n)
                _fsync(path)
                files[os.path.relpath(path, tmp)] = os.path.getsize(path)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"step": step, "files": files}, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # e.g. re-reaching a step after resuming from an older checkpoint
            old = os.path.join(self.root, f".old-{tag}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)  # deleted by _prune below
        os.replace(tmp, final)
        latest_tmp = os.path.join(self.root, ".latest.tmp")
        with open(latest_tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, os.path.join(self.root, "latest"))
        _fsync(self.root, directory=True)
        self._prune(tag)

    def _prune(self, current):
        tags = [t for t in self.tags() if t != current]
        if self.fresh:  # --no_resume: the earlier run's checkpoints go with this run's first save
            doomed, self.fresh = tags, False
        else:
            doomed = [t for t in tags if _step_of(t) < _step_of(current)][self.keep - 1:] + \
                [t for t in tags if _step_of(t) > _step_of(current)]  # newer ones are from an abandoned future
        for old in doomed:  # renamed first, so a crash mid-delete never leaves a half-deleted stepN behind
            aside = os.path.join(self.root, f".old-{old}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(os.path.join(self.root, old), aside)
        for d in os.listdir(self.root):  # these, and leftovers of saves or deletes that crashed
            if d.startswith((".tmp-", ".old-")):
                shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)

    # -------------------------------------------------------------- load

    def check_pickles(self, folder):
        """Refuse DeepSpeed files that would unpickle anything but tensors and DeepSpeed's own state classes
        (DeepSpeed loads them with torch.load(weights_only=False))."""
        for dirpath, _, names in os.walk(folder):
            for n in names:
                if not n.endswith(".pt"):
                    continue
                path = os.path.join(dirpath, n)
                try:
                    found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
                except Exception as e:  # noqa: BLE001 - unreadable: treated as a broken checkpoint (fallback)
                    raise RuntimeError(f"{n}: cannot check what it would unpickle, not loading it ({e})") from None
                unsafe = set(found) - DEEPSPEED_PICKLE_GLOBALS
                if unsafe:
                    raise CheckpointError(f"{path} references {', '.join(sorted(unsafe))}: refusing to unpickle "
                                          "it (only tensors and DeepSpeed's state classes are allowed); delete "
                                          "the checkpoint or pass --no_resume")

    def load(self, engines: dict, tag: str, state: dict, tensor_names=()):
        """Restores engines and this rank's RNGs; returns the extra tensor dicts named in `tensor_names`."""
        from safetensors.torch import load_file
        folder = os.path.join(self.root, tag)
        _check_micro_batches(folder, state.get("micro_batch") or {}, _micro_batches(engines))
        self.check_pickles(folder)
        for name, engine in engines.items():
            path, _ = engine.load_checkpoint(os.path.join(folder, name), tag="ds", load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None:
                raise CheckpointError(f"could not load the '{name}' engine from {folder}")
        rank = self.rank if os.path.exists(os.path.join(folder, f"rng_rank{self.rank}.json")) else 0
        if rank != self.rank:
            self._warn(f"{folder} was saved with {state.get('world_size')} process(es); rank {self.rank} takes "
                       "rank 0's random state, so sampling will not repeat the interrupted run exactly")
        with open(os.path.join(folder, f"rng_rank{rank}.json")) as f:
            restore_rng(load_file(os.path.join(folder, f"rng_rank{rank}.safetensors")), json.load(f))
        return {name: load_file(os.path.join(folder, f"{name}.safetensors")) for name in tensor_names}

    def restore(self, engines: dict, tensor_names=()):
        """Load the newest usable checkpoint: (tag, state, tensors), or None when there is none. A checkpoint
        that fails to load is skipped with a warning (the next older one overwrites whatever it loaded)."""
        tried = []
        for tag in self.tags():
            problem = self.verify(tag)
            if problem is None:
                state = self._state(tag)
                try:
                    return tag, state, self.load(engines, tag, state, tensor_names)
                except CheckpointError:
                    raise
                except Exception as e:  # noqa: BLE001 - a damaged file: fall back to an older checkpoint
                    problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            self._warn(f"checkpoint {self.root}/{tag} is incomplete or corrupt ({problem}); trying an older one")
            tried.append(tag)
        if tried:
            raise CheckpointError(f"no usable checkpoint in {self.root} (broken: {', '.join(tried)}); pass "
                                  "--no_resume to start over")
        return None
