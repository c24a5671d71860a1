"""`--dtype auto` on CPU: pick bf16 only where this machine multiplies in bf16 at least as fast as in fp32.

A CPU that reports bf16 support may still run bf16 matmuls slower than fp32 (e.g. avx512_bf16 without AMX:
84 vs 135 GFLOP/s measured on one such machine), so the flag alone is not enough. A sub-second matmul probe
times both once per machine; the rates are cached in RLHFKIT_CACHE (default ~/.cache/rlhfkit) under a key of
the CPU model, its bf16-relevant ISA flags, the host name, the thread count and the torch version (a home folder
shared by several machines, or a VM that moved to another CPU, probes again).
"""
from __future__ import annotations

import json
import os
import platform
import time

import torch

PROBE_SIZE = 512          # square matmul side: big enough to reach the kernels' steady rate, ~5 ms in fp32
PROBE_SECONDS = 0.2       # per dtype; two dtypes plus warm-up stay under a second


# The ISA flags that decide which bf16 matmul kernels exist: cloud VMs often report only "AMD EPYC" as the model
# name, for CPUs from AVX2-only (bf16 ~100x slower) to AMX, so the name alone would share one verdict among them.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")


def machine_key(cpuinfo: str | None = None) -> str:
    """Cache key: CPU model name, its bf16-relevant ISA flags, host name, thread count, torch version."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())  # the first processor's entry
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = ",".join(f for f in ISA_FLAGS if f in flags) or "-"
    return f"{cpu}|{isa}|host={platform.node()}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def matmul_rates(size=PROBE_SIZE, seconds=PROBE_SECONDS) -> dict:
    """GFLOP/s of a size x size matmul in fp32 and bf16 on this CPU."""
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        torch.mm(a, b)  # warm-up: first call picks and initialises the kernel
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            n += 1
        rates[name] = round(2 * size ** 3 * n / (time.perf_counter() - start) / 1e9, 1)
    return rates


def choose_cpu_dtype(bf16_supported: bool, rates: dict | None) -> tuple[str, str]:
    """('bf16' or 'fp32', why) from the CPU's bf16 flag and the probe's rates."""
    if not bf16_supported:
        return "fp32", "this CPU has no bf16 support"
    if rates["bf16"] >= rates["fp32"]:
        return "bf16", f"bf16 matmul {rates['bf16']:.0f} GFLOP/s >= fp32 {rates['fp32']:.0f} on this CPU"
    return "fp32", (f"bf16 matmul {rates['bf16']:.0f} GFLOP/s < fp32 {rates['fp32']:.0f} on this CPU "
                    "(bf16 would be slower)")


def cached_rates(cache_path: str, probe=matmul_rates) -> dict:
    """The probe's rates for this machine, measured once and then read from `cache_path`."""
    key = machine_key()
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = probe()
        try:
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            tmp = f"{cache_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(tmp, cache_path)  # several ranks may probe at once: each write is whole
        except OSError:
            pass  # a read-only home: probe again next time
    return cache[key]
