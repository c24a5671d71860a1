"""Data layer: sources -> validated PreferenceRows -> stage splits -> tokenised datasets -> batches.

    rows.py       PreferenceRow, DataError, ReadReport (and row validation)
    formats.py    field conventions of each layout / Hub set
    readers.py    read_source / read_rows: files, directories, Hub sets, local Hub copies
    splits.py     split_indices, load_stage_rows (DeepSpeed-Chat's data_split)
    templates.py  format_prompt, response_text (the one prompt rendering)
    datasets.py   SFTDataset, PairDataset, PromptDataset, collators
    cache.py      cached_tokenize (npz, no pickle)
    synthetic.py  offline demo data;  validate.py  the data checker CLI

Names are re-exported lazily so `python -m utils.data.validate` does not import torch.
"""
import importlib

_EXPORTS = {
    "rows": ("PreferenceRow", "DataError", "ReadReport"),
    "readers": ("Source", "read_source", "read_rows", "supported_names"),
    "splits": ("split_indices", "load_stage_rows"),
    "templates": ("format_prompt", "response_text"),
    "datasets": ("SFTDataset", "PairDataset", "PromptDataset", "collate_right_padded", "collate_pairs",
                 "collate_left_padded_prompts", "IGNORE_INDEX"),
    "cache": ("cached_tokenize", "cache_key_parts"),
    "synthetic": ("make_synthetic_preferences",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
