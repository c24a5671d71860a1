"""Every decision that changes how many collectives a rank makes is the same on every rank (2 gloo processes),
and a rank stuck in a collective ends the run naming its rank and phase, leaving no process behind."""
import ast
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from utils.train_loop import rank_batches

WORKER = os.path.join(REPO, "tests", "rank_worker.py")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(case, timeout_s=20, ready=""):
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "TIMEOUT": str(timeout_s), "PYTHONPATH": REPO,
               "READY": ready}
        procs.append(subprocess.Popen([sys.executable, WORKER, case], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout):
    """(returncodes, outputs); kills (and fails on) any worker still alive after `timeout` seconds."""
    deadline, outs = time.time() + timeout, []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"worker {p.pid} still running after {timeout} s")
        outs.append(out + err)
    return [p.returncode for p in procs], outs


def test_length_groups_make_the_same_calls_on_every_rank():
    """Rank 0's prompts vary from 3 to 120 tokens, rank 1's are 4 or 120: each alone would cut them into a
    different number of length groups (row chunks), so before, the ranks' forward calls did not pair up."""
    codes, outs = finish(start_workers("groups"), timeout=120)
    assert codes == [0, 0], "\n".join(o[-2000:] for o in outs)
    calls = [next(line for line in o.splitlines() if line.startswith(f"rank {r} calls")) for r, o in enumerate(outs)]
    assert calls[0].split("calls")[1] == calls[1].split("calls")[1], calls
    # agreed lengths (the elementwise max of both ranks' sorted lengths): 4, 5, then 120s -> the two short rows
    # alone, then six rows in chunks of 3 (one padded group would be 3, 3, 2): the grouping still pays off
    assert ast.literal_eval(calls[0].split("calls")[1].strip()) == [2, 3, 3]


@pytest.mark.parametrize("n,world,batch", [(7, 2, 2), (5, 2, 8), (1, 2, 4), (9, 4, 2), (8, 2, 3)])
def test_eval_batches_are_equal_on_every_rank_and_cover_each_row_once(n, world, batch):
    per_rank = [rank_batches(n, batch, r, world) for r in range(world)]
    shapes = [[len(idx) for idx, _ in b] for b in per_rank]
    assert all(s == shapes[0] for s in shapes)  # same number of forward calls, same rows each
    real = sorted(i for b in per_rank for idx, k in b for i in idx[:k])
    assert real == list(range(n))  # every real row exactly once; repeats are flagged not real


def test_a_rank_blocked_in_a_collective_times_out_naming_rank_and_phase():
    codes, outs = finish(start_workers("hang", timeout_s=5), timeout=90)
    assert codes[0] not in (0, None)
    assert "error: rank 0 waited longer than --collective_timeout" in outs[0] and "'experience'" in outs[0], \
        outs[0][-2000:]


def test_sigterm_ends_ranks_blocked_in_a_collective(tmp_path):
    """The launcher's SIGTERM: the stop flag is never seen inside a blocked collective; the watchdog ends it."""
    ready = str(tmp_path / "ready")
    procs = start_workers("sigterm", timeout_s=600, ready=ready)
    deadline = time.time() + 90
    while time.time() < deadline and not all(os.path.exists(f"{ready}.{r}") for r in range(2)):
        time.sleep(0.2)
    time.sleep(2)  # both now inside their collective
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes, outs = finish(procs, timeout=60)
    assert codes == [128 + signal.SIGTERM] * 2, outs
    assert "still running 2 s after signal 15 during 'training'" in outs[0], outs[0][-2000:]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_ranks_stop_when_the_deepspeed_runner_is_terminated(tmp_path):
    """On one node the `deepspeed` runner dies of SIGTERM without passing it on; its ranks (blocked in a
    collective here) and DeepSpeed's per-node launcher must not run on as orphans."""
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    ready = str(tmp_path / "ready")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TIMEOUT": "600", "READY": ready, "PYTHONPATH": REPO}
    runner = subprocess.Popen(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), WORKER, "sigterm"],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not all(os.path.exists(f"{ready}.{r}") for r in range(2)):
            time.sleep(0.5)
        time.sleep(1)
        pids = [int(p) for r in range(2) for p in open(f"{ready}.{r}").read().split()]  # ranks and launch.py
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
        deadline = time.time() + 60
        while time.time() < deadline and any(alive(p) for p in pids):
            time.sleep(0.5)
        assert not [p for p in pids if alive(p)], "processes left behind after the runner's SIGTERM"
    finally:
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
