"""A 2-process gloo worker for tests/test_rank_symmetry.py: `python tests/rank_worker.py CASE` with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Each forward call it makes is an all-reduce, as a ZeRO-3 forward
all-gathers the weights, so ranks that make different numbers of calls hang (here: time out)."""
import os
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from utils.padding import run_row_groups  # noqa: E402
from utils.phase import set_phase, set_stop_grace  # noqa: E402
from utils.stage import run_main  # noqa: E402


def left_padded_mask(lengths, width):
    return torch.stack([torch.cat([torch.zeros(width - n), torch.ones(n)]) for n in lengths]).long()


def forward_calls(rank):
    """Rank 0's rows vary from 3 to 120 tokens (worth 3 length groups alone), rank 1 has two short rows and six
    of 120 (2 groups alone)."""
    lengths = [3, 5, 40, 120, 8, 60, 90, 120] if rank == 0 else [120, 4, 120, 120, 4, 120, 120, 120]
    mask = left_padded_mask(lengths, 128)
    ids = torch.arange(mask.numel()).view(mask.shape)
    calls = []

    def fn(cut, m, seq):
        t = torch.ones(1)
        dist.all_reduce(t)  # the weight gather of a ZeRO-3 forward
        calls.append(m.shape[0])
        return seq[:, -1:].float()  # right-aligned outputs, as the response log-probs

    with torch.no_grad():
        out = run_row_groups(fn, mask, ids, max_groups=3, row_chunk=3)
    assert torch.equal(out[:, 0], ids[:, -1].float())  # rows back in their order
    return calls


def main(argv):
    case = argv[0]
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("TIMEOUT", "20"))))
    rank = dist.get_rank()
    if case == "groups":
        set_phase("scoring forward")
        calls = forward_calls(rank)
        print(f"rank {rank} calls {calls}", flush=True)
        dist.barrier()
    elif case == "hang":  # rank 1 is elsewhere while rank 0 waits in an all-reduce (then fails on the lost peer)
        set_phase("experience" if rank == 0 else "generation")
        if rank == 1:
            time.sleep(3 * float(os.environ["TIMEOUT"]))
        dist.all_reduce(torch.ones(1))
    elif case == "sigterm":  # both ranks blocked in a collective that never completes; the test sends SIGTERM
        set_stop_grace(2)
        set_phase("training")
        with open(f"{os.environ['READY']}.{rank}", "w") as f:
            f.write(f"{os.getpid()} {os.getppid()}")
        if rank == 0:
            dist.all_reduce(torch.ones(1))
        else:
            dist.recv(torch.ones(1), src=0)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    if args[0] == "sigterm":
        import signal
        signal.signal(signal.SIGTERM, lambda *a: None)  # as StopRequest: a flag the blocked main thread never sees
    run_main(main, args)
