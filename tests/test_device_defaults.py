"""CPU-only pieces stay off GPU nodes unless asked (lean layers, grouped-matmul attention, tcmalloc), and
evaluation forks the RNG of the device it samples on. Device detection is monkeypatched: no GPU needed."""
import contextlib
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import utils.allocator as allocator
from utils.options import RunOptions, build_parser
from utils.rng import fork_devices


def _cuda(monkeypatch, available, device=0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device)


def _tiny(dtype=torch.float32):
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=20)
    return LlamaForCausalLM(cfg).to(dtype)


def _fused(model):
    return sum(hasattr(m, "_plain_forward") for m in model.modules())


# ---------------------------------------------------------------- lean layers and attention


@pytest.mark.parametrize("cuda,flag,expect_fused", [(False, None, True), (True, None, False), (True, True, True),
                                                    (False, False, False)])
def test_fused_layers_auto_is_on_for_cpu_off_on_cuda(monkeypatch, cuda, flag, expect_fused):
    from utils.models import prepare_model
    _cuda(monkeypatch, cuda)
    model = prepare_model(_tiny(), fused_layers=flag)
    assert _fused(model) == (4 if expect_fused else 0)  # the layer's two norms and MLP, and the final norm


def test_fused_layers_flag_keeps_its_name():
    parse = build_parser(RunOptions).parse_args
    assert parse([]).fused_layers is None  # auto
    assert parse(["--fused_layers"]).fused_layers is True
    assert parse(["--no-fused_layers"]).fused_layers is False
    assert parse(["--allocator", "tcmalloc"]).allocator == "tcmalloc"


@pytest.mark.parametrize("cuda,expect", [(False, "grouped_matmul"), (True, "sdpa")])
def test_attention_auto_keeps_sdpa_on_cuda(monkeypatch, cuda, expect):
    from utils.models import set_attention
    _cuda(monkeypatch, cuda)
    assert set_attention(_tiny(torch.bfloat16)).config._attn_implementation == expect
    assert set_attention(_tiny(torch.bfloat16), "grouped_matmul").config._attn_implementation == "grouped_matmul"


# ---------------------------------------------------------------- allocator


@pytest.mark.parametrize("gpu,argv,env,expect", [
    (False, [], None, True), (True, [], None, False),                        # auto: CPU machines only
    (True, ["--allocator", "tcmalloc"], None, True), (True, ["--allocator=tcmalloc"], None, True),
    (True, [], "tcmalloc", True),                                            # asked for on a GPU node
    (False, ["--allocator", "system"], None, False), (True, ["--allocator", "tcmalloc"], "system", False)])
def test_tcmalloc_not_on_a_gpu_node_unless_asked(monkeypatch, gpu, argv, env, expect):
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if gpu else None)
    monkeypatch.setattr(allocator, "NVIDIA_DEVICE_FILES", ())
    if env is None:
        monkeypatch.delenv("RLHFKIT_ALLOCATOR", raising=False)
    else:
        monkeypatch.setenv("RLHFKIT_ALLOCATOR", env)
    assert allocator.gpu_node() == gpu
    assert allocator.wanted(["main.py", *argv]) == expect


def test_gpu_node_seen_from_the_driver_files(monkeypatch, tmp_path):
    monkeypatch.setattr(allocator.shutil, "which", lambda name: None)
    monkeypatch.setattr(allocator, "NVIDIA_DEVICE_FILES", (str(tmp_path / "nvidiactl"),))
    assert not allocator.gpu_node()
    (tmp_path / "nvidiactl").touch()
    assert allocator.gpu_node()


# ---------------------------------------------------------------- evaluation's RNG fork


def test_fork_covers_the_current_cuda_device(monkeypatch):
    _cuda(monkeypatch, False)
    assert fork_devices() == []
    _cuda(monkeypatch, True, device=3)
    assert fork_devices() == [3]


class _SamplingMaker:
    """An ExperienceMaker whose `make` draws from the global torch RNG, like sampling does."""

    def __init__(self):
        self.log = types.SimpleNamespace(pop_timers=dict)
        self.cfg = types.SimpleNamespace(eval_temperature=None)  # --eval_temperature unset: the run's sampling
        self.rollout = types.SimpleNamespace(temperature=lambda value: contextlib.nullcontext())

    def make(self, rows, sample=False):
        scores = torch.rand(len(rows))
        return types.SimpleNamespace(scores=scores, ref_logprobs=None, prompts=rows, responses=["r"] * len(rows),
                                     components={})


def test_evaluation_leaves_the_training_stream_alone(monkeypatch):
    from step3_rlhf.evaluate import evaluate_policy
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    first = evaluate_policy(_SamplingMaker(), ["a", "b", "c"], 2, seed=1)
    assert torch.equal(torch.rand(4), expected)  # the CPU stream continues as if evaluation had not run
    second = evaluate_policy(_SamplingMaker(), ["a", "b", "c"], 2, seed=1)
    assert first["reward_mean"] == second["reward_mean"]  # its own seed: the same samples every time
    # on a CUDA machine the current device's RNG is forked too
    forked = []
    _cuda(monkeypatch, True, device=1)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: forked.append(devices) or contextlib.nullcontext())
    monkeypatch.setattr(torch, "manual_seed", lambda seed: None)
    evaluate_policy(_SamplingMaker(), ["a"], 1, seed=1)
    assert forked == [[1]]


# ---------------------------------------------------------------- step 2's forward chunks


def test_reward_forward_chunks_on_cpu_one_forward_on_gpu():
    # on an H200 (bench/gpu_check.py) a step-2 step of 16 pairs in chunks of 4 took 1.0-3.1 s (ZeRO-2), 4-7 s
    # (ZeRO-3), against 0.25 s for a step-1 step of 16 sequences in one forward
    from step2_reward_model.config import RewardConfig
    from utils.options import parse_config
    auto = parse_config(RewardConfig, ["--model_name_or_path", "m"])
    assert auto.forward_chunk is None and auto.chunk_for("cpu") == 4 and auto.chunk_for("cuda") == 0
    asked = parse_config(RewardConfig, ["--model_name_or_path", "m", "--forward_chunk", "8"])
    assert asked.chunk_for("cpu") == 8 and asked.chunk_for("cuda") == 8
