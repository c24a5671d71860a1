"""Tokenised torch datasets for the three stages, and their collators (the ONE place that pads).

Tokenisation: the prompt text (templates.format_prompt) is tokenised with the tokenizer's special
tokens only when no chat template is used (a template writes its own BOS); the response text
(templates.response_text) is tokenised without special tokens and gets the EOS id appended unless it
already ends with it (Qwen/SmolLM use "<|im_end|>" as both end-of-turn and EOS). Tokenising the two
parts separately makes the prompt/response boundary exact for label masking.

Truncation rule (`fit_lengths`), when prompt + response exceed max_seq_len:
  1. the PROMPT is left-truncated first (its end - the question being answered - is kept) to what
     fits beside the full response, but never below `min_prompt_len` tokens (default max_seq_len//2);
  2. then the response is right-truncated to the room left (a cut response loses its EOS, so the
     model is not taught to stop there);
  3. a row whose response would be empty is skipped and listed in `.skipped` (with its origin).
Pairs share one prompt cut (sized for the longer reply) so chosen and rejected see the same context.

Items are dicts of plain int lists; `columns()` / `from_columns()` convert to and from the
column form that cache.cached_tokenize stores.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from utils.data.rows import DataError, PreferenceRow
from utils.data.templates import format_prompt, response_text, uses_chat_template

IGNORE_INDEX = -100


def tokenize_prompt(tokenizer, messages) -> list[int]:
    text = format_prompt(tokenizer, messages)
    return list(tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer))["input_ids"])


def tokenize_response(tokenizer, reply: str) -> list[int]:
    ids = list(tokenizer(response_text(tokenizer, reply), add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def fit_lengths(prompt_len: int, response_lens: list[int], max_seq_len: int,
                min_prompt_len: int | None = None) -> tuple[int, list[int]]:
    """(prompt tokens kept from the end, response tokens kept from the start, per response)."""
    floor = max_seq_len // 2 if min_prompt_len is None else min_prompt_len
    keep_prompt = min(prompt_len, max(max_seq_len - max(response_lens), min(floor, max_seq_len)))
    return keep_prompt, [min(n, max_seq_len - keep_prompt) for n in response_lens]


class _ColumnDataset(Dataset):
    """Items are {column: column[i]}; columns starting with "_" hold per-dataset extras."""
    item_columns: tuple[str, ...] = ()

    def __init__(self):
        self.data: dict[str, list] = {name: [] for name in self.item_columns}
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.data[self.item_columns[0]])

    def __getitem__(self, index: int) -> dict:
        return {name: self.data[name][index] for name in self.item_columns}

    def _add(self, **item) -> None:
        for name in self.item_columns:
            self.data[name].append(item[name])

    def columns(self) -> dict[str, list]:
        return {**self.data, "_skipped": list(self.skipped)}

    @classmethod
    def from_columns(cls, columns: dict[str, list]):
        dataset = cls.__new__(cls)
        dataset.data = {name: list(columns[name]) for name in cls.item_columns}
        dataset.skipped = list(columns.get("_skipped", []))
        return dataset


class SFTDataset(_ColumnDataset):
    """{input_ids, labels}: prompt + chosen + EOS; labels are -100 on prompt tokens."""
    item_columns = ("input_ids", "labels")

    def __init__(self, rows: list[PreferenceRow], tokenizer, max_seq_len: int, train_on_prompt: bool = False,
                 min_prompt_len: int | None = None):
        super().__init__()
        for row in rows:
            prompt, response = tokenize_prompt(tokenizer, row.prompt), tokenize_response(tokenizer, row.chosen)
            keep_prompt, (keep_response,) = fit_lengths(len(prompt), [len(response)], max_seq_len,
                                                        min_prompt_len)
            if keep_response <= 0:
                self.skipped.append(f"{row.origin}: no room for the response in {max_seq_len} tokens")
                continue
            prompt, response = prompt[len(prompt) - keep_prompt:], response[:keep_response]
            prompt_labels = list(prompt) if train_on_prompt else [IGNORE_INDEX] * len(prompt)
            self._add(input_ids=prompt + response, labels=prompt_labels + response)


class PairDataset(_ColumnDataset):
    """{chosen_input_ids, rejected_input_ids, prompt_len}: prompt + reply + EOS for both replies."""
    item_columns = ("chosen_input_ids", "rejected_input_ids", "prompt_len")

    def __init__(self, rows: list[PreferenceRow], tokenizer, max_seq_len: int,
                 min_prompt_len: int | None = None):
        super().__init__()
        for row in rows:
            if row.rejected is None:
                raise DataError.at(row.origin, "rejected", "missing: this source is SFT-only (no rejected "
                                   "reply) and cannot train a reward model", "missing_field")
            prompt = tokenize_prompt(tokenizer, row.prompt)
            chosen, rejected = tokenize_response(tokenizer, row.chosen), tokenize_response(tokenizer, row.rejected)
            keep_prompt, (keep_c, keep_r) = fit_lengths(len(prompt), [len(chosen), len(rejected)],
                                                        max_seq_len, min_prompt_len)
            if min(keep_c, keep_r) <= 0:
                self.skipped.append(f"{row.origin}: no room for the responses in {max_seq_len} tokens")
                continue
            prompt = prompt[len(prompt) - keep_prompt:]
            self._add(chosen_input_ids=prompt + chosen[:keep_c], rejected_input_ids=prompt + rejected[:keep_r],
                      prompt_len=keep_prompt)


class PromptDataset(_ColumnDataset):
    """{prompt_input_ids}: the prompt, left-truncated to max_prompt_seq_len; `.prompts` keeps the text."""
    item_columns = ("prompt_input_ids",)

    def __init__(self, rows: list[PreferenceRow], tokenizer, max_prompt_seq_len: int):
        super().__init__()
        self.prompts: list[str] = []
        for row in rows:
            ids = tokenize_prompt(tokenizer, row.prompt)
            self._add(prompt_input_ids=ids[max(0, len(ids) - max_prompt_seq_len):])
            self.prompts.append(format_prompt(tokenizer, row.prompt))

    def columns(self) -> dict[str, list]:
        return {**super().columns(), "_prompts": list(self.prompts)}

    @classmethod
    def from_columns(cls, columns: dict[str, list]):
        dataset = super().from_columns(columns)
        dataset.prompts = list(columns.get("_prompts", []))
        return dataset


# ---------------------------------------------------------------- collators


def _check_pad(pad_id) -> int:
    if pad_id is None:
        raise ValueError("pad_id is None: set tokenizer.pad_token (e.g. to eos) before batching")
    return int(pad_id)


def pad_sequences(seqs, pad_id: int, value_pad=None, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded [B, T] long tensor, attention mask from lengths). Masks never look at token values,
    so pad == eos is safe."""
    pad = _check_pad(pad_id) if value_pad is None else value_pad
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(width - n, width) if left else slice(0, n)
        out[i, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, cols] = 1
    return out, mask


def collate_right_padded(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """SFT batch: input_ids, attention_mask, labels (-100 on padding), right-padded."""
    input_ids, attention_mask = pad_sequences([b["input_ids"] for b in batch], pad_id)
    labels, _ = pad_sequences([b["labels"] for b in batch], pad_id, value_pad=IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Reward batch: [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] right-padded together
    (first half chosen), as DeepSpeed-Chat's DataCollatorReward."""
    seqs = [b["chosen_input_ids"] for b in batch] + [b["rejected_input_ids"] for b in batch]
    input_ids, attention_mask = pad_sequences(seqs, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_left_padded_prompts(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """RLHF prompts: left-padded, so every prompt ends at the same column where generation starts."""
    input_ids, attention_mask = pad_sequences([b["prompt_input_ids"] for b in batch], pad_id, left=True)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
