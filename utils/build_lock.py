"""Stale build locks of PyTorch's JIT extension cache: find them before DeepSpeed loads an op, so a run never hangs.

DeepSpeed JIT-builds its CPU comm op (`deepspeed_shm_comm`; `cpu_adam` etc. with offload) through
torch.utils.cpp_extension, which takes `<build dir>/lock` (os.open O_CREAT|O_EXCL, the descriptor held
open for the whole build) and deletes it when done. A run killed mid-build leaves the file behind and every
later run waits on it forever, printing nothing (DeepSpeedExamples #302, transformers #26015).

A lock is stale when no live process has it open (checked in /proc/*/fd: the builder keeps its descriptor)
and nothing in its build dir changed for STALE_AFTER_S seconds; it is then removed with a one-line notice.
When this cannot be told (no /proc, another user's processes unreadable, a recent lock nobody holds - a
build on another machine sharing the cache?) one line names the file and the command that clears it.
Build dirs: $TORCH_EXTENSIONS_DIR/<op>/ or ~/.cache/torch_extensions/<py>_<device>/<op>/.
"""
from __future__ import annotations

import glob
import os
import time

# a build dir untouched this long with its lock held by no process is a dead build: ninja rewrites its
# .ninja_log/.o files as it goes, and the slowest op DeepSpeed builds on CPU takes about a minute.
# RLHFKIT_STALE_LOCK_S overrides it (an environment variable: the check runs before the stage's flags matter)
STALE_AFTER_S = float(os.environ.get("RLHFKIT_STALE_LOCK_S", "120"))


def extension_roots() -> list[str]:
    """Where PyTorch builds JIT extensions: $TORCH_EXTENSIONS_DIR, else every <py>_<device> folder of the cache."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return [env]
    base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    return sorted(p for p in glob.glob(os.path.join(base, "*")) if os.path.isdir(p))


def find_locks(roots: list[str] | None = None) -> list[str]:
    return sorted(p for root in (extension_roots() if roots is None else roots)
                  for p in glob.glob(os.path.join(root, "*", "lock")))


# the processes that can be building an extension: torch builds it from Python, through ninja and a compiler
_BUILDER_NAMES = ("python", "ninja", "c++", "g++", "gcc", "cc1plus", "clang", "ld", "deepspeed", "torchrun")


def _could_build(pid_dir: str) -> bool:
    try:
        with open(os.path.join(pid_dir, "comm")) as fh:
            name = fh.read().strip().lower()
    except OSError:
        return True  # cannot tell
    return any(name.startswith(b) for b in _BUILDER_NAMES)


def lock_holders(path: str) -> tuple[list[int], bool]:
    """(pids with `path` open, whether every process that could be a builder had its descriptors read)."""
    target = os.path.realpath(path)
    holders, complete = [], os.path.isdir("/proc/self/fd")
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            links = [_readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)]
        except PermissionError:  # another user's (or the sandbox's) process: only a builder's name matters
            complete = complete and not _could_build(os.path.dirname(fd_dir))
            continue
        except OSError:  # the process ended while we looked
            continue
        if target in links:
            holders.append(int(fd_dir.split("/")[2]))
    return holders, complete


def _readlink(fd_path: str) -> str:
    try:
        return os.readlink(fd_path)
    except FileNotFoundError:  # closed meanwhile (our own listdir's descriptor is one)
        return ""


def last_change(build_dir: str) -> float:
    """The newest mtime in the build dir (the dir itself included)."""
    times = [os.path.getmtime(build_dir)]
    for name in os.listdir(build_dir):
        try:
            times.append(os.path.getmtime(os.path.join(build_dir, name)))
        except OSError:
            pass
    return max(times)


def judge(path: str, now: float | None = None, stale_after: float = STALE_AFTER_S) -> tuple[str, str]:
    """("stale" | "live" | "unsure", why) for one lock file."""
    holders, complete = lock_holders(path)
    if holders:
        return "live", f"process {', '.join(map(str, holders))} is building it"
    idle = (time.time() if now is None else now) - last_change(os.path.dirname(path))
    if not complete:
        return "unsure", "cannot see every process's open files"
    if idle < stale_after:
        return "unsure", f"no process here holds it, but its build dir changed {idle:.0f} s ago"
    return "stale", f"no process holds it and its build dir is unchanged for {idle:.0f} s"


def clear_stale_locks(log=print, roots: list[str] | None = None, stale_after: float = STALE_AFTER_S) -> list[str]:
    """Remove every stale lock (one line each); name the ones it cannot judge. Returns the removed paths."""
    removed = []
    for path in find_locks(roots):
        try:
            verdict, why = judge(path, stale_after=stale_after)
        except OSError:  # removed by its builder meanwhile
            continue
        if verdict == "stale":
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            except OSError as err:
                log(f"stale build lock {path} ({why}) cannot be removed ({err.strerror}); clear it with: rm -f {path}")
                continue
            removed.append(path)
            log(f"removed a stale build lock left by a killed run: {path} ({why})")
        elif verdict == "unsure":
            log(f"a build lock may block this start: {path} ({why}); if no other run is building "
                f"{os.path.basename(os.path.dirname(path))}, clear it with: rm -f {path}")
        else:
            log(f"waiting for a DeepSpeed op build: {path} ({why})")
    return removed


def check_build_locks() -> None:
    """The start_stage hook: never raises (a check that cannot run must not stop the run). Every rank checks
    (removal is idempotent); only the first rank of each machine prints."""
    import sys
    quiet = os.environ.get("LOCAL_RANK", "0") != "0"
    try:
        clear_stale_locks(lambda line: None if quiet else print(line, file=sys.stderr, flush=True))
    except Exception as err:  # noqa: BLE001
        print(f"(build-lock check skipped: {type(err).__name__}: {err})", file=sys.stderr, flush=True)
