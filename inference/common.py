"""Pieces shared by the chatbot and the scorer.

- device / model loading for inference (eval mode, on cuda when there is one);
- the reward-model input: format_prompt(messages) + response_text(reply) + EOS, the text step 2 trains on,
  built with utils.data.datasets' own tokenise/truncate helpers (the rule is TRUNCATION_RULE);
- batching with right padding and the scoring call (`utils.models.sequence_scores`: the value at the last
  non-pad token), rows sorted by length so a batch wastes little padding; scores come back in input order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from utils.data.datasets import fit_lengths, pad_sequences, tokenize_prompt, tokenize_response
from utils.models import load_causal_lm, load_tokenizer, load_value_model, resolve_dtype, sequence_scores

TRUNCATION_RULE = ("prompt + response + EOS longer than max_seq_len: the prompt is left-truncated first (its "
                   "end kept, never below max_seq_len // 2 tokens), then the response is right-truncated (a cut "
                   "response loses its EOS); a pair shares one prompt cut sized for the longer reply")


def quiet_transformers() -> None:
    """CLIs print their own output: no per-load weight progress bars from transformers."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_inference(path: str, kind: str = "causal", dtype: str = "auto", trust_remote_code: bool = False,
                       device: torch.device | None = None):
    """(model, tokenizer) in eval mode on `device`; kind "causal" (a chat model) or "value" (a reward model).

    Raises utils.models.ModelLoadError with a one-line message for a missing dir or a dir without weights."""
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    loader = load_causal_lm if kind == "causal" else load_value_model
    model = loader(path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
    model.to(device or inference_device()).eval()
    return model, tokenizer


def model_label(path: str) -> str:
    """The last two path parts ("runs/step3/actor" -> "step3/actor"): short, and tells stages apart."""
    parts = [p for p in os.path.normpath(path).replace("\\", "/").split("/") if p and p != "."]
    return "/".join(parts[-2:]) if parts else path


def context_limit(model) -> int | None:
    """The model's maximum sequence length from its config, None when it states none."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def effective_max_len(model, max_seq_len: int | None) -> int | None:
    """--max_seq_len capped by the model's context (0/None = the context itself)."""
    limit = context_limit(model)
    if not max_seq_len:
        return limit
    return min(max_seq_len, limit) if limit else max_seq_len


@dataclass
class Encoded:
    input_ids: list[int]
    truncated: bool


def encode_replies(tokenizer, messages, replies: list[str], max_seq_len: int | None = None) -> list[Encoded]:
    """Reward-model inputs for one prompt and its replies, tokenised and cut exactly as step 2's PairDataset
    (utils.data.datasets: same tokenisation, same `fit_lengths`, one prompt cut shared by all replies), so a
    score here is the score step 2 trained. `truncated` marks an input that lost tokens."""
    prompt = tokenize_prompt(tokenizer, list(messages))
    encoded = [tokenize_response(tokenizer, r) for r in replies]
    if not max_seq_len or len(prompt) + max(len(r) for r in encoded) <= max_seq_len:
        return [Encoded(prompt + r, False) for r in encoded]
    keep_prompt, keeps = fit_lengths(len(prompt), [len(r) for r in encoded], max_seq_len)
    kept_prompt = prompt[len(prompt) - keep_prompt:]
    return [Encoded(kept_prompt + r[:keep], keep_prompt < len(prompt) or keep < len(r))
            for r, keep in zip(encoded, keeps)]


@torch.inference_mode()
def score_sequences(model, sequences: list[list[int]], pad_id: int, batch_size: int = 8,
                    progress: bool = False) -> list[float]:
    """Reward of each token sequence, in input order. Rows are batched longest first (less padding);
    right padding cannot change a score because the model is causal and the score is read at the last
    real token."""
    if not sequences:
        return []
    from tqdm.auto import tqdm
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    scores = [0.0] * len(sequences)
    starts = range(0, len(order), max(1, batch_size))
    # disable=None: the bar shows on a terminal only, not in pipes and logs
    for start in tqdm(starts, desc="scoring", unit="batch", disable=None if progress else True, leave=False):
        batch = order[start:start + batch_size]
        ids, mask = (t.to(device) for t in pad_sequences([sequences[i] for i in batch], pad_id))
        for i, value in zip(batch, sequence_scores(model, ids, mask).float().cpu().tolist()):
            scores[i] = value
    return scores


def score_items(model, tokenizer, items, max_seq_len: int | None = None, batch_size: int = 8,
                progress: bool = False) -> tuple[list[float], list[bool]]:
    """Scores of (prompt messages, response) items, and whether each input was truncated."""
    encoded = [encode_replies(tokenizer, messages, [response], max_seq_len)[0] for messages, response in items]
    scores = score_sequences(model, [e.input_ids for e in encoded], tokenizer.pad_token_id, batch_size, progress)
    return scores, [e.truncated for e in encoded]
