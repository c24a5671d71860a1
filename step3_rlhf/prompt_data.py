"""Prompts for step 3 (preference data or a registered task, step3_rlhf/tasks) and the text set for PTX mixing.

Every prompt item is {"prompt_input_ids", "prompt" (text), "meta" (what a rule reward needs)}.
"""
from __future__ import annotations

import json
import os

import torch

from step3_rlhf.tasks import get_task
from utils.data.datasets import collate_left_padded_prompts, collate_right_padded
from utils.data.pipeline import prompt_datasets
from utils.data.rows import DataError
from utils.data.splits import carve_eval
from utils.data.templates import uses_chat_template


def _tokenize_task(tokenizer, task_prompt, max_len):
    text = task_prompt.render(tokenizer)
    ids = tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer))["input_ids"]
    return {"prompt_input_ids": ids[max(0, len(ids) - max_len):], "prompt": text, "meta": task_prompt.meta}


def _read_task_files(loader, paths):
    """(train rows, eval rows or None) from one or two local JSONL files; a bad row is a one-line DataError."""
    try:
        return loader(paths[0]), (loader(paths[1]) if len(paths) > 1 else None)
    except ValueError as e:  # the loaders name file, line and field
        raise DataError(str(e)) from None


def _task_rows(cfg, task):
    """(train rows, eval rows or None): the task's own source for --data_path (a generator spec, a Hub name)
    or its JSONL loader on one or two local files; a bad spec or row is a one-line DataError."""
    if task.source is not None:
        try:
            found = task.source(cfg.data_path[0], cfg.seed)
        except ValueError as e:
            raise DataError(str(e)) from None
        if found is not None:
            return found
    return _read_task_files(task.load, cfg.data_path)


def load_prompts(cfg, tokenizer, log):
    """(train_items, eval_items)."""
    if cfg.task == "preference":
        train, evals, _ = prompt_datasets(cfg, tokenizer, log)
        as_items = lambda ds: [{"prompt_input_ids": ds[i]["prompt_input_ids"], "prompt": ds.prompts[i], "meta": {}}  # noqa: E731
                               for i in range(len(ds))]
        return as_items(train), as_items(evals)
    task = get_task(cfg.task)
    train_rows, eval_rows = _task_rows(cfg, task)
    if eval_rows is None:
        tr, ev = carve_eval(len(train_rows), cfg.eval_fraction, cfg.seed)
        train_rows, eval_rows = [train_rows[i] for i in tr], [train_rows[i] for i in ev]
    item = lambda r: _tokenize_task(tokenizer, task.prompt(r, cfg.prompt_style), cfg.max_prompt_seq_len)  # noqa: E731
    return [item(r) for r in train_rows], [item(r) for r in eval_rows[: max(cfg.eval_prompts, 1)]]


def collate_prompts(batch, pad_id):
    out = collate_left_padded_prompts([{"prompt_input_ids": b["prompt_input_ids"]} for b in batch], pad_id)
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"],
            "prompts": [b["prompt"] for b in batch], "metas": [b["meta"] for b in batch]}


def _read_texts(name, config_name=""):
    if os.path.isfile(name):
        if name.endswith((".jsonl", ".json")):
            texts = []
            with open(name, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            texts.append(json.loads(line)["text"])
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise DataError(f"{name}:{line_no}: field 'text': missing or not JSON") from None
            return texts
        with open(name, encoding="utf-8") as f:
            return [p.strip() for p in f.read().split("\n\n") if p.strip()]
    try:
        import datasets
        return [r["text"] for r in datasets.load_dataset(name, config_name or None, split="train") if r["text"].strip()]
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot load unsupervised dataset '{name}' ({type(e).__name__}); offline? pass a local "
                        ".txt or .jsonl with a 'text' field") from None


class PtxBatches:
    """Endless right-padded LM batches (loss on every token) for PTX mixing, in a seeded order that repeats
    each pass. `position` (batches served so far) goes into step-3 checkpoints via `state()`/`load()`, so a
    resumed run continues with the batch the interrupted one would have used next.

    With several processes each rank reads its own shard, as DeepSpeed-Chat's DistributedSampler does: the
    seeded order (the same on every rank) is padded by repeating its start to a multiple of `world_size`, and
    rank r takes every world_size-th item from r on: shards of one size, disjoint but for that padding, that
    together cover the whole set."""

    def __init__(self, items, batch_size, pad_id, seed, rank=0, world_size=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"PTX shard: rank {rank} is not in [0, {world_size})")
        self.items, self.batch_size, self.pad_id = items, batch_size, pad_id
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        padded = [order[i % len(order)] for i in range(-(-len(order) // world_size) * world_size)]
        self.order = padded[rank::world_size]
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        start = self.position * self.batch_size
        idx = [self.order[(start + k) % len(self.order)] for k in range(self.batch_size)]
        self.position += 1
        return collate_right_padded([self.items[i] for i in idx], self.pad_id)

    def state(self) -> dict:
        return {"position": self.position}

    def load(self, state: dict):
        self.position = int(state["position"])


def ptx_batches(cfg, tokenizer, batch_size, max_len, rank=0, world_size=1) -> PtxBatches:
    """This rank's PTX batches of --unsupervised_dataset_name (a .txt, a .jsonl with 'text', or a Hub set)."""
    texts = _read_texts(cfg.unsupervised_dataset_name, cfg.unsupervised_dataset_config_name)
    if not texts:
        raise DataError(f"{cfg.unsupervised_dataset_name}: no text found for --unsupervised_dataset_name")
    items = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True)["input_ids"][:max_len]
        items.append({"input_ids": ids, "labels": ids})
    return PtxBatches(items, batch_size, tokenizer.pad_token_id, cfg.seed, rank, world_size)
