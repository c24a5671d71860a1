"""Read any supported source into validated PreferenceRows.

A source is one `--data_path` entry:
  - a local file: JSON Lines, a JSON list, or parquet, rows in any layout `formats.map_generic` knows;
  - `local/jsonfile` (DeepSpeed-Chat: ./data/train.json + ./data/eval.json relative to cwd) or any
    directory holding train.json[l] and optionally eval/test/validation.json[l];
  - a known Hub set name (see formats.HUB_SETS), loaded with `datasets.load_dataset`;
  - a local copy of a Hub set: a directory whose last two path components spell its name
    (e.g. /data/Dahoas/rm-static) holding parquet/json/jsonl files (optionally under data/), split by
    file name (train*, test*, validation*), or a `save_to_disk` folder.

Every format becomes a stream of (origin, load) records that `_collect` maps and validates row by
row; that is the one code path for both modes: on_bad_rows="error" re-raises the first DataError,
"skip" drops the row and keeps its message. Problems with the source as a whole (missing file, a
JSON list that does not parse, no network) raise in both modes.
Origins: "path:LINE" (1-based line) for JSON Lines, "path:ITEM" (1-based item index) for JSON lists,
"path:ROW" (1-based) for parquet, "name[split]:ROW" for Hub data.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator

from utils.data.formats import HUB_SETS, HubSet, Mapper, hub_set_for, map_generic
from utils.data.rows import DataError, ReadReport, cap_row, row_key

__all__ = ["Source", "ReadReport", "read_source", "read_rows", "supported_names"]

Record = tuple[str, Callable[[], object]]
DATA_EXTS = (".jsonl", ".json", ".parquet")
_SPLIT_WORD = re.compile(r"(train|test|validation|valid|eval|dev)")
_SPLIT_ALIASES = {"valid": "validation", "dev": "validation", "eval": "validation"}


@dataclass
class Source:
    """One data path, read: its train part and its own eval part (None when it has none)."""
    name: str
    train: ReadReport
    eval: ReadReport | None

    @property
    def skipped(self) -> list[str]:
        return self.train.skipped + (self.eval.skipped if self.eval else [])


def supported_names() -> list[str]:
    return sorted(HUB_SETS) + ["local/jsonfile", "synthetic", "synthetic:N"]


# ---------------------------------------------------------------- record streams


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}", "unreadable") from err


class _Record(dict):
    """A JSON object that remembers a key it was given twice (json keeps only the last value, silently)."""
    duplicate_key: str | None = None


def _record(pairs: list) -> _Record:
    record = _Record(pairs)
    if len(record) < len(pairs):
        seen: set = set()
        record.duplicate_key = next(k for k, _ in pairs if k in seen or seen.add(k))
    return record


def parse_json_line(raw: bytes | str, origin: str) -> object:
    """One JSON Lines row; bad JSON raises DataError "ORIGIN: field '(row)': invalid JSON ..."."""
    # surrogateescape keeps undecodable bytes as lone surrogates, so check_text can name their field
    text = (raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw).lstrip("\ufeff")
    try:
        return json.loads(text, object_pairs_hook=_record)
    except json.JSONDecodeError as err:
        raise DataError.at(origin, "(row)", f"invalid JSON: {err.msg} (column {err.colno})", "bad_json") from None


def json_records(path: str) -> Iterator[Record]:
    """JSON Lines (one object per line) or a JSON list, decided by the first non-blank character."""
    data = _read_bytes(path)
    lines = data.split(b"\n")
    if data.lstrip().lstrip(b"\xef\xbb\xbf").startswith(b"["):
        text = data.decode("utf-8", "surrogateescape").lstrip("\ufeff")
        try:
            items = json.loads(text, object_pairs_hook=_record)
        except json.JSONDecodeError as err:
            if not _first_line_parses(lines):  # else: JSON Lines whose first row happens to be a list
                raise DataError(f"{path}:{err.lineno}: field '(file)': invalid JSON list: {err.msg} "
                                f"(column {err.colno}); no row of this file can be read", "bad_json") from None
        else:
            for index, item in enumerate(items, 1):
                yield f"{path}:{index}", partial(lambda value: value, item)
            return
    _reject_single_object(path, data, lines)
    for lineno, raw in enumerate(lines, 1):
        if raw.strip():
            origin = f"{path}:{lineno}"
            yield origin, partial(parse_json_line, raw, origin)


def _first_line_parses(lines: list[bytes]) -> bool:
    first = next((line for line in lines if line.strip()), b"")
    try:
        json.loads(first.decode("utf-8", "surrogateescape").lstrip("\ufeff"))
        return True
    except json.JSONDecodeError:
        return False


def _reject_single_object(path: str, data: bytes, lines: list[bytes]) -> None:
    """A pretty-printed single JSON object would otherwise give one 'invalid JSON' per line."""
    if _first_line_parses(lines):
        return
    try:
        whole = json.loads(data.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError:
        return
    if isinstance(whole, dict):
        keys = ", ".join(list(whole)[:5])
        raise DataError(f"{path}:1: field '(file)': one JSON object (keys: {keys}); expected JSON Lines "
                        "(one row object per line) or a JSON list of row objects", "bad_json")


def parquet_records(path: str) -> Iterator[Record]:
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError) on bad files
        raise DataError(f"{path}: cannot read parquet: {err}", "unreadable") from None
    for index, rec in enumerate(table.to_pylist(), 1):
        yield f"{path}:{index}", partial(lambda value: value, rec)


def hf_records(dataset, label: str) -> Iterator[Record]:
    """Rows of a `datasets.Dataset`; `label` is "name[split]"."""
    for index, rec in enumerate(dataset, 1):
        yield f"{label}:{index}", partial(lambda value: value, rec)


def file_records(path: str) -> Iterator[Record]:
    return parquet_records(path) if path.endswith(".parquet") else json_records(path)


def _chain(streams: Iterable[Iterator[Record]]) -> Iterator[Record]:
    for stream in streams:
        yield from stream


# ---------------------------------------------------------------- the one validation path


def _check_mode(on_bad_rows: str) -> None:
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")


def _collect(records: Iterable[Record], mapper: Mapper, on_bad_rows: str, seen: dict, cap: int | None = None
             ) -> ReadReport:
    """Map and validate each record; `seen` (row content -> origin) catches exact duplicates across
    every part read with the same dict; `cap`: the per-field character cap (rows.cap_row)."""
    report = ReadReport(rows=[])
    for origin, load in records:
        try:
            record = load()
            if not isinstance(record, dict):
                raise DataError.at(origin, "(row)", f"expected a JSON object, got {type(record).__name__}",
                                   "not_object")
            if getattr(record, "duplicate_key", None) is not None:
                raise DataError.at(origin, record.duplicate_key, "given twice in one row object (JSON would keep "
                                   "only the last value)", "duplicate_key")
            row = mapper(record, origin)
            if row is None:  # not a preference by construction (webgpt tie)
                continue
            row = cap_row(row, cap, on_bad_rows, report)
            key = row_key(row)
            if key in seen:
                raise DataError.at(origin, "(row)", f"exact duplicate of {seen[key]}", "duplicate")
            seen[key] = origin
            report.rows.append(row)
        except DataError as err:
            if on_bad_rows == "error":
                raise
            report.skipped.append(str(err))
            report.kinds.append(err.kind)
    return report


# ---------------------------------------------------------------- sources


def _split_files(directory: str) -> dict[str, list[str]]:
    """Data files under `directory` grouped by the split word in their file name."""
    found: dict[str, list[str]] = {}
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if not name.endswith(DATA_EXTS) or name.startswith("."):
                continue
            match = _SPLIT_WORD.search(name.lower())
            if match:
                split = _SPLIT_ALIASES.get(match.group(1), match.group(1))
                found.setdefault(split, []).append(os.path.join(root, name))
    return {split: sorted(paths) for split, paths in found.items()}


def _read_parts(name: str, train: Iterator[Record], evals: Iterator[Record] | None, mapper: Mapper,
                on_bad_rows: str, seen: dict | None, cap: int | None = None) -> Source:
    seen = {} if seen is None else seen
    train_report = _collect(train, mapper, on_bad_rows, seen, cap)
    if not train_report.rows and not train_report.skipped:
        raise DataError(f"{name}: empty: no rows (a data source needs at least one row object)", "empty_source")
    eval_report = _collect(evals, mapper, on_bad_rows, seen, cap) if evals is not None else None
    return Source(name, train_report, eval_report)


def _read_split_dir(directory: str, mapper: Mapper, eval_splits, on_bad_rows, seen, cap=None) -> Source:
    files = _split_files(directory)
    if "train" not in files:
        raise DataError(f"{directory}: no training file (expected a name containing 'train', e.g. "
                        "train.json, train.jsonl or data/train-00000.parquet)", "unreadable")
    eval_split = next((s for s in eval_splits if s in files), None)
    evals = _chain(file_records(p) for p in files[eval_split]) if eval_split else None
    return _read_parts(directory, _chain(file_records(p) for p in files["train"]), evals, mapper,
                       on_bad_rows, seen, cap)


def _read_disk_dataset(directory: str, mapper: Mapper, eval_splits, on_bad_rows, seen, cap=None) -> Source:
    import datasets
    dd = datasets.load_from_disk(directory)
    if not isinstance(dd, datasets.DatasetDict) or "train" not in dd:
        raise DataError(f"{directory}: saved dataset has no 'train' split", "unreadable")
    eval_split = next((s for s in eval_splits if s in dd), None)
    evals = hf_records(dd[eval_split], f"{directory}[{eval_split}]") if eval_split else None
    return _read_parts(directory, hf_records(dd["train"], f"{directory}[train]"), evals, mapper,
                       on_bad_rows, seen, cap)


def _offline_requested() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_hub(hub: HubSet, on_bad_rows: str, seen, cap=None) -> Source:
    import datasets
    import datasets.config
    offline_example = (f"cannot load Hub dataset '{hub.name}': no network (offline). Download it elsewhere "
                       f"and pass the local directory, e.g. --data_path /data/{hub.name}")
    saved = datasets.config.HF_HUB_OFFLINE
    if _offline_requested():
        # datasets reads the variables at import time; honour them when set later (tests, notebooks)
        datasets.config.HF_HUB_OFFLINE = True
    try:
        dd = datasets.load_dataset(hub.name)
    except Exception as err:  # noqa: BLE001 - any failure becomes one readable line
        text = f"{type(err).__name__}: {err}".lower()
        if datasets.config.HF_HUB_OFFLINE or isinstance(err, (ConnectionError, OSError)) or \
                any(w in text for w in ("offline", "connect", "resolve", "network", "timed out")):
            raise DataError(offline_example, "unreadable") from None
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(f"cannot load Hub dataset '{hub.name}': {type(err).__name__}: {first_line}",
                        "unreadable") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = saved
    eval_split = next((s for s in hub.eval_splits if s in dd), None)
    evals = hf_records(dd[eval_split], f"{hub.name}[{eval_split}]") if eval_split else None
    return _read_parts(hub.name, hf_records(dd["train"], f"{hub.name}[train]"), evals, hub.mapper,
                       on_bad_rows, seen, cap)


def read_source(path: str, on_bad_rows: str = "error", seen: dict | None = None,
                max_field_chars: int | None = None) -> Source:
    """Read one data path (see the module docstring for what it may be). `seen` may be shared between
    calls to catch duplicates across sources (the validate CLI does). `max_field_chars`: a text field
    longer than this is an error ("error") or cut ("skip"), before anything tokenises it."""
    _check_mode(on_bad_rows)
    generic_evals = ("validation", "test")
    if path == "synthetic" or path.startswith("synthetic:"):  # the built-in offline set, "synthetic:N" rows
        from utils.data.synthetic import make_synthetic_preferences
        count = path.partition(":")[2]
        if count and not count.isdigit():
            raise DataError(f"data path '{path}': expected synthetic or synthetic:N (N rows)", "bad_value")
        return Source(path, ReadReport(make_synthetic_preferences(int(count or 2000), seed=1234)), None)
    if path == "local/jsonfile":
        directory = os.path.join(os.getcwd(), "data")
        if not os.path.isdir(directory):
            raise DataError(f"local/jsonfile: {directory} does not exist (DeepSpeed-Chat's layout is "
                            "./data/train.json and ./data/eval.json relative to the working directory)",
                            "unreadable")
        return _read_split_dir(directory, map_generic, generic_evals, on_bad_rows, seen, max_field_chars)
    if os.path.isfile(path):
        return _read_parts(path, file_records(path), None, map_generic, on_bad_rows, seen, max_field_chars)
    if os.path.isdir(path):
        hub = hub_set_for(path)
        mapper, evals = (hub.mapper, hub.eval_splits) if hub else (map_generic, generic_evals)
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            return _read_disk_dataset(path, mapper, evals, on_bad_rows, seen, max_field_chars)
        return _read_split_dir(path, mapper, evals, on_bad_rows, seen, max_field_chars)
    if path in HUB_SETS:
        return _load_hub(HUB_SETS[path], on_bad_rows, seen, max_field_chars)
    if os.path.exists(path):
        raise DataError(f"{path}: not a regular file or directory", "unreadable")
    if path.endswith(DATA_EXTS) or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file or directory", "unreadable")
    raise DataError(f"'{path}' is not a file, a directory, or a supported dataset name "
                    f"(supported: {', '.join(supported_names())})", "unknown_source")


def read_rows(path: str, on_bad_rows: str = "error") -> ReadReport:
    """All rows of a source (train part, then its eval part) as one report."""
    source = read_source(path, on_bad_rows)
    parts = [source.train] + ([source.eval] if source.eval else [])
    return ReadReport(rows=[r for p in parts for r in p.rows],
                      skipped=[m for p in parts for m in p.skipped],
                      kinds=[k for p in parts for k in p.kinds], cut=[m for p in parts for m in p.cut])
