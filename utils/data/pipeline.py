"""From options to the tokenised train/eval datasets of each stage (rows -> split -> tokenise -> cache)."""
from __future__ import annotations

import functools
import os

from utils.data.cache import cache_key_parts, cached_tokenize
from utils.data.datasets import (PairDataset, PromptDataset, SFTDataset, collate_left_padded_prompts, collate_pairs,
                                 collate_right_padded)
from utils.data.rows import DataError
from utils.data.splits import load_stage_rows

def cache_dir_for(cfg):
    return cfg.data_output_path or os.path.join(os.path.dirname(os.path.abspath(cfg.output_dir)), ".data_cache")


# characters per token of the default per-field cap: well above any tokenizer's average (about 4 for English
# BPE), so a cut never removes text the token truncation would have kept
CHARS_PER_TOKEN = 20


def field_char_cap(cfg) -> int:
    """--max_field_chars, or CHARS_PER_TOKEN x the stage's longest sequence in tokens."""
    if getattr(cfg, "max_field_chars", 0):
        return cfg.max_field_chars
    tokens = getattr(cfg, "max_seq_len", 0) or (cfg.max_prompt_seq_len + cfg.max_answer_seq_len)
    return CHARS_PER_TOKEN * tokens


def _stage_datasets(cfg, tokenizer, log, dataset_cls, max_len, **kw):
    stage = cfg.data_split_index  # the stage config says which --data_split share it reads
    cut: list[str] = []
    train_rows, eval_rows, skipped = load_stage_rows(cfg.data_path, cfg.data_split, stage, cfg.seed,
                                                     cfg.eval_fraction, cfg.on_bad_rows, field_char_cap(cfg), cut)
    if skipped:
        log.info(f"skipped {len(skipped)} bad row(s) (--on_bad_rows skip); first: {skipped[0]}")
    if cut:
        log.info(f"cut {len(cut)} field(s) to {field_char_cap(cfg)} characters before tokenising; first: {cut[0]}")
    if cfg.max_eval_samples:
        eval_rows = eval_rows[: cfg.max_eval_samples]
    out = []
    for part, rows in (("train", train_rows), ("eval", eval_rows)):
        key = cache_key_parts(cfg.data_path, cfg.data_split, stage, cfg.seed, tokenizer, max_len, part=part,
                              kind=dataset_cls.__name__, n_rows=len(rows),
                              max_eval=cfg.max_eval_samples, **kw)
        build = lambda rows=rows: _build(dataset_cls, rows, tokenizer, max_len, log, **kw).columns()  # noqa: E731
        out.append(dataset_cls.from_columns(cached_tokenize(key, build, cache_dir_for(cfg))))
    if len(out[0]) == 0:
        first = out[0].skipped[0] if out[0].skipped else "none"
        raise DataError(f"all {len(train_rows)} training rows of {' '.join(cfg.data_path)} are too long for "
                        f"{max_len} tokens (raise --max_seq_len / --max_prompt_seq_len); first: {first}", "too_long")
    return out


def _build(dataset_cls, rows, tokenizer, max_len, log, **kw):
    ds = dataset_cls(rows, tokenizer, max_len, **kw)
    if getattr(ds, "skipped", None):
        log.info(f"{len(ds.skipped)} row(s) too long for {max_len} tokens were skipped; first: {ds.skipped[0]}")
    return ds


def sft_datasets(cfg, tokenizer, log):
    train, evals = _stage_datasets(cfg, tokenizer, log, SFTDataset, cfg.max_seq_len,
                                   train_on_prompt=cfg.train_on_prompt)
    return train, evals, functools.partial(collate_right_padded, pad_id=tokenizer.pad_token_id)


def pair_datasets(cfg, tokenizer, log):
    train, evals = _stage_datasets(cfg, tokenizer, log, PairDataset, cfg.max_seq_len)
    return train, evals, functools.partial(collate_pairs, pad_id=tokenizer.pad_token_id)


def prompt_datasets(cfg, tokenizer, log):
    train, evals = _stage_datasets(cfg, tokenizer, log, PromptDataset, cfg.max_prompt_seq_len)
    return train, evals, functools.partial(collate_left_padded_prompts, pad_id=tokenizer.pad_token_id)
