"""--dtype auto on CPU: bf16 only where the machine's matmul probe finds it at least as fast; probed once."""
import torch

from utils import dtype_probe
from utils.models import dtype_choice


def test_choose_cpu_dtype_by_rates():
    assert dtype_probe.choose_cpu_dtype(False, None)[0] == "fp32"
    pick, why = dtype_probe.choose_cpu_dtype(True, {"fp32": 135.0, "bf16": 84.0})
    assert pick == "fp32" and "slower" in why
    assert dtype_probe.choose_cpu_dtype(True, {"fp32": 210.0, "bf16": 898.0})[0] == "bf16"


def test_auto_uses_probe_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    monkeypatch.setattr("utils.models.cpu_has_fast_bf16", lambda: True)
    calls = []

    def slow_bf16():
        calls.append(1)
        return {"fp32": 135.0, "bf16": 84.0}

    assert dtype_choice("auto", probe=slow_bf16, cuda=False)[0] == torch.float32
    assert dtype_choice("auto", probe=lambda: {"fp32": 1.0, "bf16": 999.0}, cuda=False)[0] == torch.float32
    assert calls == [1] and (tmp_path / "dtype_probe.json").exists()  # the second call read the cache


def test_explicit_dtype_overrides_probe():
    assert dtype_choice("bf16", probe=lambda: {"fp32": 999.0, "bf16": 1.0}, cuda=False)[0] == torch.bfloat16
    assert dtype_choice("fp32")[0] == torch.float32


def test_cpu_without_bf16_never_probes(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    monkeypatch.setattr("utils.models.cpu_has_fast_bf16", lambda: False)
    assert dtype_choice("auto", probe=lambda: 1 / 0, cuda=False)[0] == torch.float32


def test_cache_key_tells_cpus_with_the_same_name_apart():
    # Cloud VMs report "AMD EPYC" for AVX2-only and AVX-512-bf16 CPUs alike; one verdict must not serve both.
    avx2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
    bf16 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16\n"
    assert dtype_probe.machine_key(avx2) != dtype_probe.machine_key(bf16)
    assert dtype_probe.machine_key(avx2) == dtype_probe.machine_key(avx2 + avx2.replace(": 0", ": 1"))
    assert dtype_probe.machine_key(bf16).startswith("AMD EPYC|avx2,avx512f,avx512_bf16|")
