"""DeepSpeed configs built from options: one for trained engines, one for frozen (inference-only) ones."""
from __future__ import annotations

import os
import socket

import torch



_SINGLE_PROCESS_PORT = "RLHFKIT_SINGLE_PROCESS_PORT"  # the MASTER_PORT that init_distributed made up itself


def _inherited_single_process_env() -> bool:
    """True when RANK/MASTER_PORT were made up by init_distributed in a PARENT process (a script or test that
    ran a stage in-process, then started another one): reusing them would make this process listen on the
    parent's port (EADDRINUSE). The deepspeed launcher sets its own MASTER_PORT, so its children are not."""
    import torch.distributed as dist
    port = os.environ.get(_SINGLE_PROCESS_PORT)
    return port is not None and port == os.environ.get("MASTER_PORT") and not dist.is_initialized()


def init_distributed(timeout_s: float = 1800):
    """Start torch.distributed through DeepSpeed; a plain `python main.py` becomes a 1-process group.

    A collective that waits longer than `timeout_s` raises (utils/phase.py reports it with rank and phase).
    Idempotent within a process. Returns (rank, world_size, device)."""
    from datetime import timedelta

    import deepspeed
    inherited = _inherited_single_process_env()
    if "RANK" not in os.environ or inherited:  # not started by the deepspeed launcher / torchrun
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        port = port if inherited else os.environ.get("MASTER_PORT", port)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        os.environ[_SINGLE_PROCESS_PORT] = port
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               timeout=timedelta(seconds=timeout_s))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _dtype_section(dtype: torch.dtype) -> dict:
    return {"bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16, "loss_scale_window": 100, "initial_scale_power": 12}}


def train_ds_config(*, micro_batch, grad_accum, world_size, zero_stage=0, offload=False,
                    dtype=torch.float32, grad_clip=1.0, enable_hybrid_engine=False, inference_tp_size=1,
                    release_inference_cache=False, pin_parameters=True, tp_gather_partition_size=8,
                    max_out_tokens=512) -> dict:
    device = "cpu" if offload else "none"
    zero = {"stage": zero_stage,
            "offload_param": {"device": device if zero_stage == 3 else "none"},
            "offload_optimizer": {"device": device},
            "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 3e7,
            "stage3_prefetch_bucket_size": 3e7,
            "memory_efficient_linear": False}
    return {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "steps_per_print": 10 ** 9,  # we log ourselves
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # our torch AdamW is fine with offload on CPU-only machines
        "gradient_clipping": grad_clip,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "hybrid_engine": {"enabled": enable_hybrid_engine, "max_out_tokens": max_out_tokens,
                          "inference_tp_size": inference_tp_size,
                          "release_inference_cache": release_inference_cache,
                          "pin_parameters": pin_parameters,
                          "tp_gather_partition_size": tp_gather_partition_size},
        **_dtype_section(dtype),
    }


def eval_ds_config(*, micro_batch, world_size, zero_stage=0, offload=False, dtype=torch.float32) -> dict:
    """Frozen models (reference, reward): ZeRO-3 shards them when asked, otherwise stage 0 (ZeRO 1/2 only
    shard optimizer state, which a frozen model has none of)."""
    stage = 3 if zero_stage == 3 else 0
    return {
        "train_batch_size": micro_batch * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "steps_per_print": 10 ** 9,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 1e4,
                              "offload_param": {"device": "cpu" if offload and stage == 3 else "none"},
                              "memory_efficient_linear": False},
        "wall_clock_breakdown": False,
        **_dtype_section(dtype),
    }
