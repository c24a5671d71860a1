"""What every stage's main.py does around its training: start-up checks, clear failures, a clean exit.

`start_stage` first runs `preflight`: cheap checks of every path and name the run will need (model dirs,
data files, the Hub when a name is not local), so a typo fails in seconds with one line and exit 2, before
DeepSpeed starts or any model is loaded.
"""
from __future__ import annotations

import os
import socket
import sys
import traceback
from dataclasses import dataclass
from urllib.parse import urlparse

import torch

from utils.allocator import active_allocator
from utils.logger import RunLogger
from utils.models import OFFLINE_DEFAULT, ModelLoadError, resolve_dtype
from utils.options import ConfigError
from utils.phase import describe_failure, install_stop_watchdog, set_stop_grace, watch_launcher

_LOCAL_ONLY = ("synthetic", "generate", "local/jsonfile")  # built-in names; also "synthetic:N", "generate:N"


def builtin_name(name: str) -> bool:
    return name.lower() == OFFLINE_DEFAULT or name in _LOCAL_ONLY or name.startswith(("synthetic:", "generate:"))


@dataclass
class StageContext:
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    log: RunLogger


def looks_local(name: str) -> bool:
    """A path, not a Hub id ("org/name" or "name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or \
        name.endswith((".json", ".jsonl", ".parquet", ".txt", ".gguf", ".safetensors"))


def hub_reachable(timeout=3.0) -> bool:
    """Can we open a connection to the Hub? False at once with HF_HUB_OFFLINE=1 or when DNS fails."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True  # cannot tell through a proxy; let the libraries try
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def go_offline():
    """Make the HF libraries fail fast (no retries) instead of waiting on a network that is not there."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    for mod, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if mod in sys.modules:
            setattr(sys.modules[mod], attr, True)


def check_model_location(flag, value, online):
    if value.lower() == OFFLINE_DEFAULT:
        return
    if os.path.isdir(value):
        files = os.listdir(value)
        if flag == "tokenizer_name_or_path":
            if not any(f.startswith("tokenizer") or f.endswith((".model", "vocab.json")) for f in files):
                raise ModelLoadError(f"--{flag} '{value}': no tokenizer files (tokenizer.json/tokenizer_config.json)")
            return
        if "config.json" not in files:
            raise ModelLoadError(f"--{flag} '{value}': no config.json (is it a training output dir? the HF model "
                                 "is written to OUTPUT_DIR itself)")
        if not any(f.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")) for f in files):
            raise ModelLoadError(f"--{flag} '{value}': has a config.json but no weights (*.safetensors)")
        return
    if os.path.exists(value):
        raise ModelLoadError(f"--{flag} '{value}' is a file; pass the directory that holds config.json")
    if looks_local(value):
        raise ModelLoadError(f"--{flag} '{value}': no such directory")
    if not online:
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(value, "config.json" if "tokenizer" not in flag else
                                                 "tokenizer_config.json"), str):
            raise ModelLoadError(f"--{flag} '{value}': not a local directory, not in the Hugging Face cache, and "
                                 "the Hub is not reachable (offline); download it elsewhere and pass the directory")


def check_data_location(flag, value):
    if builtin_name(value) or os.path.exists(value):
        if os.path.exists(value) and not (os.path.isfile(value) or os.path.isdir(value)):
            raise ConfigError(f"--{flag} '{value}': not a regular file or directory")
        return
    if looks_local(value):
        raise ConfigError(f"--{flag} '{value}': no such file or directory")


def preflight(cfg):
    """Every check that needs no model and no DeepSpeed: paths, names, split shares, --resume, output dir.
    The stage's config says what it loads (`model_locations()`, `data_locations()`) and which data share."""
    from utils.checkpoint import Checkpointer
    locations, data = cfg.model_locations(), cfg.data_locations()
    names = [v for _, v in locations + data]
    non_local = [n for n in names if n and not os.path.exists(n) and not looks_local(n) and not builtin_name(n)]
    online = True
    if non_local and not hub_reachable():
        online = False
        go_offline()
    for flag, value in locations:
        check_model_location(flag, value, online)
    for flag, value in data:
        check_data_location(flag, value)
    if cfg.uses_data_split():
        from utils.data.splits import parse_data_split
        shares, stage = parse_data_split(cfg.data_split), cfg.data_split_index
        if stage >= len(shares) or shares[stage] == 0:
            raise ConfigError(f"--data_split {cfg.data_split} gives {cfg.stage_name} (share {stage + 1}) no data; "
                              "give it a share, e.g. 10,0,0 for step 1 alone")
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--output_dir '{out}' is a file")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(out if os.path.isdir(out) else parent, os.W_OK):
        raise ConfigError(f"--output_dir '{out}': not writable")
    if getattr(cfg, "resume", False) and not Checkpointer(out).tags():
        raise ConfigError(f"--resume given but {os.path.join(out, 'checkpoints')} holds no checkpoint")


def start_stage(cfg) -> StageContext:
    """Preflight, then threads, the process group, dtype and seed; the logger is named by `cfg.stage_name`."""
    from utils.ds_config import init_distributed
    from utils.rng import seed_everything
    preflight(cfg)
    from utils.build_lock import check_build_locks
    check_build_locks()  # before DeepSpeed loads an op: a lock left by a killed build would hang it silently
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_stop_grace(getattr(cfg, "stop_grace_seconds", 120))
    rank, world, device = init_distributed(getattr(cfg, "collective_timeout", 1800))
    dtype = resolve_dtype(cfg.dtype)  # --dtype fp16 without a GPU was refused by the config's validate()
    seed_everything(cfg.seed)
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
    log = RunLogger(cfg, rank, cfg.stage_name)
    log.info(f"{world} process(es) on {device.type}, dtype {str(dtype).replace('torch.', '')}, "
             f"ZeRO stage {cfg.zero_stage}, "
             f"allocator {active_allocator()}")
    return StageContext(rank, world, device, dtype, log)


def finish_stage(ctx, cfg, summary: dict, lines: list[str]):
    """The end of every stage's main: OUTPUT_DIR/summary.json (read by inference.summary and the report), the
    stage's closing lines (what changed, where the model is), then the logger closed."""
    ctx.log.write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
    for line in lines:
        ctx.log.info(line)
    ctx.log.close()


def user_errors():
    """Exception types whose message is the whole story for a user: printed as one line, exit 2."""
    from utils.data.rows import DataError
    from utils.checkpoint import CheckpointError
    return (ConfigError, DataError, ModelLoadError, CheckpointError, FileNotFoundError)


def run_main(main, argv=None):
    """Run a stage's main; user errors exit 2 with one line, a numerical stop exits 3. Ends with os._exit
    because torch/gloo can abort at interpreter exit after all the work is done."""
    code = 0
    install_stop_watchdog(on_exit=release_shared_memory)
    watch_launcher()
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
    except KeyboardInterrupt:
        print("interrupted (second signal): stopped without saving; run the same command again to resume from "
              "the last checkpoint", file=sys.stderr)
        code = 130
    except Exception as e:
        traceback.print_exc()
        print(describe_failure(e), file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    release_shared_memory()
    os._exit(code)


def release_shared_memory():
    """Remove this rank's /dev/shm all-reduce buffer of DeepSpeed's CPU backend (69 MB per rank, named
    deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK). DeepSpeed unlinks it in a destructor that os._exit skips,
    and on a machine whose /dev/shm is RAM every multi-process run would otherwise leak it. The other ranks
    have it mapped already, so removing the name here is safe."""
    import glob
    port, rank = os.environ.get("MASTER_PORT"), os.environ.get("RANK")
    if not port or rank is None:
        return
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass
