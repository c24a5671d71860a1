"""Run a stage under tcmalloc when the machine has it: glibc's malloc keeps freed tensor memory in its heaps.

On workload W (step 3, bf16, CPU) glibc held about 1.1 GB of freed memory between PPO steps on top of 4.0 GB
of live tensors, and peaked at 6.0 GB; under tcmalloc (gperftools, which PyTorch's CPU performance guide
recommends) the same run peaked at 5.6 GB and its scoring and training phases ran about 10% faster (see
bench/ppo_throughput.py). The allocator has to be in place before the process starts, so a stage that finds
the library and is not yet using it re-executes itself once with it in LD_PRELOAD (same PID, same
arguments). `--allocator system` (or RLHFKIT_ALLOCATOR=system) keeps glibc; without the library nothing
changes (install it with `apt-get install libtcmalloc-minimal4`, which scripts/install.sh does when it can).
The measurements are CPU ones: on a GPU node (an NVIDIA driver or nvidia-smi present, checked without
importing torch) tensors live in the CUDA caching allocator, and a preloaded tcmalloc can clash with the
driver's and other libraries' allocators, so `auto` keeps glibc there; `--allocator tcmalloc` (or
RLHFKIT_ALLOCATOR=tcmalloc) asks for it anyway.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

CANDIDATES = tuple(f"/usr/{d}/libtcmalloc_minimal.so.4" for d in ("lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu",
                                                                   "lib64", "lib"))
NVIDIA_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version")


def find_tcmalloc() -> str | None:
    for path in CANDIDATES + tuple(sorted(glob.glob(os.path.join(sys.prefix, "lib", "libtcmalloc*.so*")))):
        if os.path.exists(path):
            return path
    return None


def active_allocator() -> str:
    """'tcmalloc' when this process has it mapped, else 'system'."""
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" if "tcmalloc" in f.read() else "system"
    except OSError:
        return "system"


def gpu_node() -> bool:
    """Whether this machine has an NVIDIA GPU, judged without importing torch (this runs before it is)."""
    return bool(shutil.which("nvidia-smi")) or any(os.path.exists(p) for p in NVIDIA_DEVICE_FILES)


def requested(argv) -> set:
    """The choices given: RLHFKIT_ALLOCATOR and every --allocator in argv ('auto' when none)."""
    asks = {os.environ.get("RLHFKIT_ALLOCATOR", "auto")}
    for i, arg in enumerate(argv):
        if arg.startswith("--allocator="):
            asks.add(arg.split("=", 1)[1])
        elif arg == "--allocator" and i + 1 < len(argv):
            asks.add(argv[i + 1])
    return asks


def wanted(argv) -> bool:
    """'system' anywhere wins; 'tcmalloc' asks for it even on a GPU node; auto: only on a machine without one."""
    asks = requested(argv)
    if "system" in asks or not sys.platform.startswith("linux"):
        return False
    return "tcmalloc" in asks or not gpu_node()


def use_tcmalloc(argv=None):
    """Re-exec this Python process once under tcmalloc (call it before importing torch). Returns only when no
    re-exec happens: already under tcmalloc, not wanted, no library, or a re-exec was already tried."""
    argv = sys.argv if argv is None else argv
    if not wanted(argv) or active_allocator() == "tcmalloc" or os.environ.get("RLHFKIT_REEXEC"):
        return
    lib = find_tcmalloc()
    if lib is None:
        return
    env = dict(os.environ, RLHFKIT_REEXEC="1",
               LD_PRELOAD=":".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:] if hasattr(sys, "orig_argv") else argv),
              env)
