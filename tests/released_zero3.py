"""Run a stage script with ZeRO-3 releasing each module's weights after use (tests.tiny.release_zero3_weights),
as it does on real-sized models. Through the launcher:
    deepspeed --num_gpus 2 tests/released_zero3.py step1_sft/main.py [its flags]"""
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.tiny import release_zero3_weights  # noqa: E402

if __name__ == "__main__":
    release_zero3_weights()
    script = next(a for a in sys.argv[1:] if a.endswith(".py"))  # the launcher puts --local_rank=N first
    sys.argv = [script] + [a for a in sys.argv[1:] if a != script]
    runpy.run_path(os.path.join(REPO, script), run_name="__main__")
