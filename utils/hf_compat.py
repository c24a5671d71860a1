"""The KV-cache argument under the installed transformers: `cache` from 5.x (where `past_key_values` is
deprecated, warns with a FutureWarning on every forward, and goes in 5.40), `past_key_values` before.

    out = model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
"""
from __future__ import annotations

import inspect

_NAMES: dict[type, str] = {}


def cache_arg_name(model) -> str:
    """'cache' or 'past_key_values': whichever the model's forward takes (looked up once per class). A DeepSpeed
    engine passes its keywords through to the module it wraps: the module's forward decides."""
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module
    cls = type(model)
    if cls not in _NAMES:
        params = inspect.signature(model.forward).parameters
        _NAMES[cls] = "cache" if "cache" in params else "past_key_values"
    return _NAMES[cls]


def cache_kwargs(model, cache) -> dict:
    return {cache_arg_name(model): cache}
