"""What this rank is doing now, so that a hang or a failure can say where it happened.

With several processes a rank that waits on a collective another rank never joins blocks inside C++: Python
signal handlers do not run there, so the StopRequest flag that SIGTERM sets is never seen, and the rank
outlives its launcher. Two ways out, both naming the rank and the phase:
- `--collective_timeout` (passed to torch.distributed): the blocked collective raises after that many seconds,
  and `run_main` reports it (`describe_failure`) and exits;
- `install_stop_watchdog`: SIGTERM/SIGINT also wake a helper thread (through the signal wakeup fd, which the
  C-level handler writes even while the main thread is blocked); if the process is still running
  `--stop_grace_seconds` later (the normal stop saves and exits well before), it exits on its own;
- `watch_launcher`: on one node the `deepspeed` runner dies of SIGTERM without passing it on, and its ranks
  would run (or hang) on as orphans: a rank whose launcher is gone sends itself SIGTERM (save, exit; the
  watchdog above ends it if it is blocked).
The loops mark their phase with `set_phase` (RunLogger.timer does it for step 3's timed phases).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

_STATE = {"phase": "start-up", "grace": 120.0}


def set_phase(name: str):
    _STATE["phase"] = name


def current_phase() -> str:
    return _STATE["phase"]


def set_stop_grace(seconds: float):
    _STATE["grace"] = float(seconds)


def rank_name() -> str:
    return f"rank {os.environ.get('RANK', '0')}"


def is_collective_timeout(exc: BaseException) -> bool:
    """gloo/NCCL/torch report a collective that waited past its timeout as a RuntimeError saying so."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


def describe_failure(exc: BaseException) -> str:
    """One line for an unexpected exception: which rank, in which phase, and for a timeout what it means."""
    if is_collective_timeout(exc):
        return (f"error: {rank_name()} waited longer than --collective_timeout on a collective during "
                f"'{current_phase()}': another rank is not making the same call (or has died); "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return f"error: {rank_name()} failed during '{current_phase()}': {type(exc).__name__}: {exc}"


def install_stop_watchdog(on_exit=None):
    """After SIGTERM/SIGINT, exit with 128+signal if the process is still alive `grace` seconds later (the
    normal stop path saves and exits first). No-op off the main thread. `on_exit` (idempotent) runs when the signal
    arrives and again just before os._exit."""
    if threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:
        return

    def watch():
        while True:
            data = os.read(read_fd, 64)
            stops = [s for s in data if s in (signal.SIGTERM, signal.SIGINT)]
            if stops:
                break
        if on_exit is not None:  # at once too: DeepSpeed's launcher SIGKILLs what is left 30 s after its SIGTERM
            on_exit()
        time.sleep(_STATE["grace"])
        print(f"error: {rank_name()} still running {_STATE['grace']:.0f} s after signal {stops[0]} during "
              f"'{current_phase()}' (blocked on a collective another rank never joined?); exiting without "
              "saving (see --stop_grace_seconds)", file=sys.stderr, flush=True)
        if on_exit is not None:
            on_exit()
        os._exit(128 + stops[0])

    threading.Thread(target=watch, name="stop-watchdog", daemon=True).start()


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_pids() -> list[int]:
    """The processes whose death means this rank should stop: its parent when a launcher started it (RANK set),
    and the `deepspeed` runner above DeepSpeed's per-node launcher. Not a shell: a run under nohup goes on."""
    if "RANK" not in os.environ or not os.path.isdir("/proc"):
        return []
    parent = os.getppid()
    pids = [parent]
    grand = _parent_of(parent)
    if grand and "deepspeed.launcher.launch" in _cmdline(parent) and "deepspeed" in _cmdline(grand):
        pids.append(grand)
    return pids


def watch_launcher(poll_s: float = 2.0):
    """SIGTERM to this process once a launcher process (`launcher_pids`) is gone."""
    pids = launcher_pids()
    if not pids:
        return

    def watch():
        while all(os.path.exists(f"/proc/{p}") for p in pids) and os.getppid() == pids[0]:
            time.sleep(poll_s)
        print(f"error: {rank_name()}: its launcher is gone; stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
