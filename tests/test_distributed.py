"""Two processes through the `deepspeed` launcher on a CPU-only machine (gloo): the product path for
multi-process runs. The command that works without a GPU:

    deepspeed --num_gpus 2 --master_port PORT step1_sft/main.py ...

(on CPU DeepSpeed's accelerator reports one device, but --num_gpus N simply asks for N local slots;
CUDA_VISIBLE_DEVICES is set to 0..N-1 for the children and is harmless without CUDA).
"""
import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.conftest import REPO
from utils.data.synthetic import make_synthetic_preferences, write_jsonl
from utils.models import load_tokenizer, load_value_model

pytestmark = pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, args, env_extra=None, nproc=2, timeout=300):
    """Run `deepspeed --num_gpus nproc script args` from the repo root; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port), script, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU all-reduce keeps a 69 MB /dev/shm buffer per rank; a run must not leave them behind
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"), "shared-memory buffers leaked"
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dist_data") / "pref.jsonl")
    write_jsonl(make_synthetic_preferences(120, seed=5), path)
    return path


def test_init_distributed_is_idempotent_and_not_inherited_by_children():
    """A process that ran a stage in-process (a test, a notebook) and then starts another stage: the child
    must not reuse the made-up MASTER_PORT its parent is listening on (it failed with EADDRINUSE)."""
    from utils.ds_config import init_distributed
    first = init_distributed()
    port = os.environ["MASTER_PORT"]
    assert init_distributed() == first == (0, 1, torch.device("cpu")) and os.environ["MASTER_PORT"] == port
    child = subprocess.run([sys.executable, "-c", "from utils.ds_config import init_distributed as i; print(i())"],
                           cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "(0, 1, device(type='cpu'))" in child.stdout


@pytest.mark.parametrize("zero", [2, 3])
def test_sft_two_processes_end_with_the_same_weights(zero, tiny_model_dir, data, tmp_path):
    out, hashes = str(tmp_path / "out"), str(tmp_path / "weights")
    proc = launch("step1_sft/main.py", [
        "--model_name_or_path", tiny_model_dir, "--data_path", data, "--data_split", "1,0,0", "--output_dir", out,
        "--max_seq_len", "64", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--dtype", "fp32",
        "--max_steps", "4", "--max_eval_samples", "8", "--zero_stage", str(zero), "--threads", "1",
        "--disable_progress_bar", "--no_resume"], {"RLHFKIT_DUMP_WEIGHT_HASH": hashes})
    assert "2 process(es) on cpu" in proc.stderr + proc.stdout
    digests = [json.load(open(f"{hashes}.rank{r}"))["sha256"] for r in (0, 1)]
    assert digests[0] == digests[1]  # data-parallel ranks hold one model
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == 4 and summary["after"]["eval/loss"] < summary["before"]["eval/loss"]
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(saved.state_dict()[key], start.state_dict()[key])


def test_ppo_two_processes_zero3(tiny_model_dir, data, tmp_path):
    rm = str(tmp_path / "rm")
    torch.manual_seed(0)
    load_value_model(tiny_model_dir, head_init_std=1.0).save_pretrained(rm)
    load_tokenizer(tiny_model_dir).save_pretrained(rm)
    out = str(tmp_path / "ppo")
    launch("step3_rlhf/main.py", [
        "--actor_model_name_or_path", tiny_model_dir, "--critic_model_name_or_path", rm, "--data_path", data,
        "--data_split", "0,0,1", "--output_dir", out, "--max_prompt_seq_len", "32", "--max_answer_seq_len", "8",
        "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2", "--max_steps", "2",
        "--actor_zero_stage", "3", "--critic_zero_stage", "3", "--actor_learning_rate", "1e-3", "--eval_prompts", "2",
        "--dtype", "fp32", "--threads", "1", "--disable_progress_bar", "--no_resume"])
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["steps"] == 2
    AutoModelForCausalLM.from_pretrained(os.path.join(out, "actor"), dtype=torch.float32)
    critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "critic"), dtype=torch.float32)
    assert critic.config.num_labels == 1


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
