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
import signal
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


def launch(script, args, env_extra=None, nproc=2, timeout=300, check=True, released=False):
    """Run `deepspeed --num_gpus nproc script args` from the repo root; returns the CompletedProcess.
    released: through tests/released_zero3.py, so ZeRO-3 releases and re-gathers weights as on a real model.

    A run still going after `timeout` seconds (a hang) is killed with every process it started and fails the
    test; --collective_timeout should have ended it sooner with an error naming the rank and phase."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port),
           *(["tests/released_zero3.py"] if released else []), script, *args]
    popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # its own process group: a hang is killed whole
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        out, err = popen.communicate()
        pytest.fail(f"{script} still running after {timeout} s (hang): {out[-3000:]}{err[-3000:]}")
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU all-reduce keeps a 69 MB /dev/shm buffer per rank; a run must not leave them behind
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"), "shared-memory buffers leaked"
    return proc


def varied_prompts(path, n=40, seed=3):
    """Preference rows whose prompts run from a few to 130 tokens (the tiny tokenizer: one token a letter), so
    that two ranks' batches differ in padding and length grouping."""
    import random
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = 3 + (i * 127) // (n - 1)  # tokens: words of up to 8 letters, one token a letter or a space
        letters = [" " if k % 9 == 8 else rng.choice("bcdfghjklmnpqrstvwxz") for k in range(length)]
        prompt = "".join(letters).strip()
        rows.append({"prompt": prompt, "chosen": f"yes {i}", "rejected": f"no {i}"})
    rng.shuffle(rows)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


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


@pytest.fixture(scope="module")
def varied_data(tmp_path_factory):
    return varied_prompts(str(tmp_path_factory.mktemp("varied") / "varied.jsonl"))


@pytest.fixture(scope="module")
def supervised_data(tmp_path_factory):
    return varied_prompts(str(tmp_path_factory.mktemp("varied80") / "varied.jsonl"), n=80)  # 8 eval rows


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """A tiny Llama whose weight matrices have over 1e4 elements: ZeRO-3 keeps smaller ones whole on every rank
    (stage3_param_persistence_threshold), so only with these does each forward all-gather, as on a real model."""
    from tests.tiny import build_tiny_model_dir
    return build_tiny_model_dir(str(tmp_path_factory.mktemp("wide_llama")), hidden=128)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """Critic/reward of another width than the actor: a rank whose forward calls are out of step with another's
    then asks for gathers of other sizes and stops, instead of silently pairing with a same-shaped model's."""
    from tests.tiny import build_tiny_model_dir
    base = build_tiny_model_dir(str(tmp_path_factory.mktemp("rm_base")), hidden=96)
    rm = str(tmp_path_factory.mktemp("rm"))
    torch.manual_seed(0)
    load_value_model(base, head_init_std=1.0).save_pretrained(rm)
    load_tokenizer(base).save_pretrained(rm)
    return rm


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_rl_two_processes_zero3_prompts_of_every_length(algo, wide_model_dir, reward_dir, varied_data, tmp_path):
    """Prompts of 3 to 130 tokens, 3 length groups: each rank's batch pads differently. Before the ranks agreed
    on the grouping, one rank ran the critic while the other was still in the reference's second group."""
    out = str(tmp_path / algo)
    # grpo also takes the per-step collectives of --max_train_seconds and a greedy mid-run evaluation per step
    per_algo = ["--num_generations", "2", "--per_device_generation_batch_size", "2", "--eval_interval", "1",
                "--eval_temperature", "0", "--max_train_seconds", "100000"] if algo == "grpo" else \
        ["--per_device_generation_batch_size", "4"]
    launch("step3_rlhf/main.py", [
        "--actor_model_name_or_path", wide_model_dir, "--critic_model_name_or_path", reward_dir, "--algo", algo,
        "--data_path", varied_data, "--data_split", "0,0,1", "--output_dir", out, "--max_prompt_seq_len", "200",
        "--max_answer_seq_len", "6", "--per_device_training_batch_size", "4", "--max_steps", "2",
        "--length_groups", "3", "--actor_zero_stage", "3", "--critic_zero_stage", "3", "--actor_learning_rate",
        "1e-3", "--eval_prompts", "2", "--dtype", "fp32", "--threads", "1", "--disable_progress_bar", "--no_resume",
        "--collective_timeout", "60", *per_algo], timeout=600, released=True)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == 2
    assert ("eval/reward" in summary["history"][0]) == (algo == "grpo")


SUPERVISED = {"step1_sft/main.py": ("1,0,0", "eval/loss"), "step2_reward_model/main.py": ("0,1,0", "eval/accuracy")}


@pytest.mark.parametrize("script", sorted(SUPERVISED))
def test_supervised_two_processes_zero3_odd_eval_set(script, wide_model_dir, supervised_data, tmp_path):
    """5 eval rows in batches of 2: rank 0 holds 3 (2 batches), rank 1 holds 2 (1 batch). Before, rank 0 sat in
    its second eval forward while rank 1 waited in the all-reduce. The metric is the one process's, exactly."""
    split, key = SUPERVISED[script]
    summaries = []
    for nproc in (2, 1):
        out = str(tmp_path / f"out{nproc}")
        launch(script, [
            "--model_name_or_path", wide_model_dir, "--data_path", supervised_data, "--data_split", split,
            "--output_dir", out, "--max_seq_len", "160", "--per_device_train_batch_size", "2",
            "--per_device_eval_batch_size", "2", "--max_eval_samples", "5", "--max_steps", "1", "--dtype", "fp32",
            "--zero_stage", "3", "--threads", "1", "--disable_progress_bar", "--no_resume",
            "--collective_timeout", "60"], nproc=nproc, timeout=400, released=True)
        with open(os.path.join(out, "summary.json")) as f:
            summaries.append(json.load(f))
    two, one = summaries
    assert two["before"] and set(two["before"]) == set(one["before"])
    for k in two["before"]:  # the same untrained model scored on the same 5 rows
        assert two["before"][k] == pytest.approx(one["before"][k], rel=1e-5, abs=1e-6), k
    assert key in two["after"]


def test_first_ppo_update_is_the_same_with_one_and_two_processes(wide_model_dir, reward_dir, tmp_path):
    """Same global batch of experience (4 sequences: 4 on one rank, or 2 on each of two): same policy loss and
    the same change of every actor weight (DeepSpeed averages the ranks' gradients; seq-mean-token-mean makes
    that the global mean)."""
    results = []
    for nproc in (1, 2):
        path = str(tmp_path / f"update{nproc}.pt")
        launch("tests/first_update_worker.py", [
            "--actor_model_name_or_path", wide_model_dir, "--critic_model_name_or_path", reward_dir,
            "--data_path", "synthetic", "--output_dir", str(tmp_path / f"o{nproc}"), "--max_answer_seq_len", "6",
            "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", str(4 // nproc),
            "--loss_agg", "seq-mean-token-mean", "--actor_zero_stage", "3", "--critic_zero_stage", "3",
            "--actor_learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--dtype", "fp32", "--threads", "1",
            "--disable_progress_bar", "--collective_timeout", "60"], {"FIRST_UPDATE_OUT": path}, nproc=nproc,
            timeout=400)
        results.append(torch.load(path))
    one, two = results
    assert one["tokens"] == two["tokens"]  # the same experience
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert set(one["delta"]) == set(two["delta"])
    moved = sum(float(d.abs().sum()) for d in one["delta"].values())
    assert moved > 0  # the update did something, so the comparison below means something
    lr = 1e-3
    for k, d in one["delta"].items():  # per weight tensor: checksums, and element by element
        other = two["delta"][k]
        assert float(other.sum()) == pytest.approx(float(d.sum()), rel=1e-3, abs=lr * 1e-2), k
        assert float(other.abs().sum()) == pytest.approx(float(d.abs().sum()), rel=1e-4, abs=lr * 1e-2), k
        # Adam's first step is about lr * g / |g|: where a gradient is ~1e-8 (eps), the summation-order noise
        # of two processes moves it visibly; a handful of such elements, never a real difference
        off = (other - d).abs()
        assert float(off.max()) < 0.05 * lr and float((off > 1e-3 * lr).double().mean()) < 1e-3, k


def test_a_rank_out_of_step_ends_the_run_naming_rank_and_phase(wide_model_dir, supervised_data, tmp_path):
    """Rank 1 makes one eval forward more (a ZeRO-3 gather rank 0 never joins): --collective_timeout ends the
    run with one line naming the rank and phase, well inside the test's limit, and no process is left."""
    proc = launch("tests/asymmetric_sft.py", [
        "--model_name_or_path", wide_model_dir, "--data_path", supervised_data, "--data_split", "1,0,0",
        "--output_dir", str(tmp_path / "out"), "--max_seq_len", "64", "--per_device_eval_batch_size", "2",
        "--max_eval_samples", "4", "--max_steps", "1", "--dtype", "fp32", "--zero_stage", "3", "--threads", "1",
        "--disable_progress_bar", "--no_resume", "--collective_timeout", "15"], timeout=300, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "waited longer than --collective_timeout on a collective during 'evaluation before training'" in text, \
        text[-3000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
