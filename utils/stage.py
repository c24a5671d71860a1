"""What every stage's main.py does around its training: start-up, clear failures, a clean exit."""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass

import torch

from utils.logger import RunLogger
from utils.models import ModelLoadError, resolve_dtype
from utils.options import ConfigError


@dataclass
class StageContext:
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    log: RunLogger


def start_stage(cfg, stage_name) -> StageContext:
    from utils.ds_config import init_distributed
    from utils.engine import seed_everything
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = init_distributed()
    dtype = resolve_dtype(cfg.dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("--dtype fp16 is not supported on CPU; use bf16 or fp32")
    seed_everything(cfg.seed)
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
    log = RunLogger(cfg, rank, stage_name)
    log.info(f"{world} process(es) on {device.type}, dtype {str(dtype).replace('torch.', '')}, "
             f"ZeRO stage {getattr(cfg, 'zero_stage', getattr(cfg, 'actor_zero_stage', 0))}")
    return StageContext(rank, world, device, dtype, log)


def user_errors():
    """Exception types whose message is the whole story for a user: printed as one line, exit 2."""
    from utils.data.rows import DataError
    return (ConfigError, DataError, ModelLoadError, FileNotFoundError)


def run_main(main, argv=None):
    """Run a stage's main; user errors exit 2 with one line. Ends with os._exit because torch/gloo
    can abort at interpreter exit after all the work is done."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 3
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
