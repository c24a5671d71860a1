"""Cache of tokenised data, so a re-run (or the next rank) skips tokenisation.

The cache key is a SHA-256 of everything that changes the tokens (see `cache_key_parts`): data paths
with each file's size and mtime, data_split, stage, seed, tokenizer name + vocabulary size, chat
template, max length, train_on_prompt. Entries are numpy .npz files loaded with allow_pickle=False
(no pickle, so a cache file cannot run code), written to a temporary file and renamed into place,
so a crash or a concurrent writer never leaves a half-written entry.

Stored values are dicts of columns; a column is a list of int lists (ragged, stored flat + offsets),
a list of ints, or a list of strings.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable

import numpy as np

from utils.data.templates import template_id


def _fingerprint(path: str) -> list:
    """[path, size, mtime_ns] for a file, every file under a directory, or just the name (Hub sets)."""
    if path == "local/jsonfile":
        path = os.path.join(os.getcwd(), "data")
    if os.path.isfile(path):
        st = os.stat(path)
        return [[os.path.abspath(path), st.st_size, st.st_mtime_ns]]
    if os.path.isdir(path):
        out = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                out.extend(_fingerprint(os.path.join(root, name)))
        return out
    return [[path]]


def cache_key_parts(data_paths: list[str], data_split: str, stage: int, seed: int, tokenizer,
                    max_seq_len: int, train_on_prompt: bool = False, **extra) -> dict:
    """Everything the tokenised data depends on, as a JSON-able dict (add anything else via **extra)."""
    return {
        "data": [_fingerprint(p) for p in data_paths],
        "data_split": str(data_split), "stage": int(stage), "seed": int(seed),
        "tokenizer": [getattr(tokenizer, "name_or_path", ""), len(tokenizer),
                      getattr(tokenizer, "vocab_size", None), tokenizer.eos_token_id],
        "template": template_id(tokenizer),
        "max_seq_len": int(max_seq_len), "train_on_prompt": bool(train_on_prompt),
        **extra,
    }


def cache_key(key_parts: dict) -> str:
    return hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()


def _encode(columns: dict[str, list]) -> dict[str, np.ndarray]:
    arrays = {}
    for name, values in columns.items():
        if values and isinstance(values[0], str):
            arrays[f"{name}.str"] = np.array(values, dtype=np.str_)
        elif values and not isinstance(values[0], (list, tuple)):
            arrays[f"{name}.int"] = np.asarray(values, dtype=np.int64)
        else:
            lengths = np.array([len(v) for v in values], dtype=np.int64)
            arrays[f"{name}.offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            arrays[f"{name}.flat"] = np.fromiter((t for v in values for t in v), dtype=np.int64,
                                                 count=int(lengths.sum()))
    return arrays


def _decode(arrays) -> dict[str, list]:
    columns: dict[str, list] = {}
    for key in arrays.files:
        name, kind = key.rsplit(".", 1)
        if kind == "str":
            columns[name] = [str(s) for s in arrays[key]]
        elif kind == "int":
            columns[name] = arrays[key].tolist()
        elif kind == "offsets":
            flat, offsets = arrays[f"{name}.flat"].tolist(), arrays[key].tolist()
            columns[name] = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return columns


def cached_tokenize(key_parts: dict, build_fn: Callable[[], dict[str, list]], cache_dir: str | None
                    ) -> dict[str, list]:
    """Columns from the cache entry for `key_parts`, or from `build_fn()` (then stored).

    Typical use:  ds = SFTDataset.from_columns(cached_tokenize(
                      cache_key_parts(paths, split, 0, seed, tok, 512), lambda: SFTDataset(rows, tok, 512).columns(),
                      cache_dir))
    cache_dir None disables caching. An unreadable entry is rebuilt.
    """
    if not cache_dir:
        return build_fn()
    path = os.path.join(cache_dir, f"tokenized_{cache_key(key_parts)}.npz")
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return _decode(arrays)
        except (OSError, ValueError, KeyError):
            pass  # corrupt or foreign file: rebuild below
    columns = build_fn()
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp_tokenized_", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **_encode(columns))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return columns
