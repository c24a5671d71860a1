"""Step 1 with a deliberate rank asymmetry, for tests/test_distributed.py: rank 1 makes one evaluation forward
more than rank 0 (as an odd eval set did before the batches were equalised), so under ZeRO-3 the ranks wait on
each other; --collective_timeout must end the run with an error naming the rank and the phase."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import step1_sft.main as sft  # noqa: E402
from utils.stage import run_main  # noqa: E402
from utils.train_loop import rank_batches  # noqa: E402


def uneven_batches(n, batch_size, rank=None, world_size=None):
    batches = rank_batches(n, batch_size, rank, world_size)
    return batches + batches[-1:] if int(os.environ["RANK"]) == 1 else batches


if __name__ == "__main__":
    sft.rank_batches = uneven_batches
    run_main(sft.main, [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
