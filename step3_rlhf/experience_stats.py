"""What to watch on the experience side (#14 point 4, #15 point 5), logged every step for every algorithm:
reward (total and per component), response length and truncation, zero-variance groups, repetition, empty or
format-only answers, and the mismatch between the rollout's sampling-time log-probs and the experience forward's.
The pure pieces (DAPO's overlong penalty, n-gram repetition, format-only text, the log-prob mismatch) are here
with their definitions; `experience_stats` reduces one step's experiences to floats for the log.
"""
from __future__ import annotations

import re
from collections import Counter

import torch

# a response "repeats" when its most frequent 4-token n-gram occurs more than 3 times: natural text of a few
# hundred tokens almost never says the same 4 tokens 4 times, while a degenerate loop ("5 + 5 + 5 + ...", a
# repeated sentence) does within a few dozen tokens. 4 rather than 3 so short formulaic phrases do not count.
REPETITION_NGRAM = 4
REPETITION_MAX_COUNT = 3

# an XML-like tag such as <think>, </answer>, <answer/>: what is left when these and whitespace are removed is
# the content of an answer
_TAG = re.compile(r"</?\s*[A-Za-z_][\w:.-]*\s*/?>")


def overlong_penalty(lengths, max_len, buffer_len, factor):
    """DAPO's soft overlong punishment (veRL's reward_model.overlong_buffer): 0 for a response of at most
    max_len - buffer_len tokens, then falling linearly to -factor at max_len tokens:
        min(0, -(length - (max_len - buffer_len)) / buffer_len * factor).
    `lengths` [B] response tokens (the EOS included); buffer_len 0 turns it off (all zeros)."""
    lengths = torch.as_tensor(lengths, dtype=torch.float)
    if buffer_len <= 0:
        return torch.zeros_like(lengths)
    exceed = lengths - (max_len - buffer_len)
    return (-exceed / buffer_len * factor).clamp(max=0.0)


def truncated_rows(responses, action_mask, eos_ids):
    """[B] bool: rows whose response holds no end-of-sequence token among its action tokens (it ran into
    --max_answer_seq_len). `responses` [B, R] token ids, `action_mask` [B, R] (1 up to and including the EOS)."""
    is_eos = torch.isin(responses, torch.tensor(list(eos_ids), device=responses.device))
    return ~(is_eos & (action_mask > 0)).any(dim=1)


def max_ngram_count(tokens, n=REPETITION_NGRAM) -> int:
    """How often the most frequent n-gram of `tokens` (a list of ids) occurs; 0 when it has fewer than n."""
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return max(grams.values(), default=0)


def repetitive(tokens, n=REPETITION_NGRAM, max_count=REPETITION_MAX_COUNT) -> bool:
    """Whether a response loops: its most frequent n-gram occurs more than `max_count` times."""
    return max_ngram_count(tokens, n) > max_count


def empty_or_format_only(text: str) -> bool:
    """Whether an answer says nothing: empty after stripping, or only tags (<think></think><answer></answer>)
    and whitespace - a policy that learned the format reward but not the task."""
    return not _TAG.sub("", text).strip()


def logprob_mismatch(rollout_logprobs, logprobs, mask):
    """(mean, max) of |rollout log-prob - experience log-prob| over the masked tokens: how far the sampling
    backend's numbers are from the training forward's (kernels, dtype, a stale weight sync). A mismatch that
    grows is the silent-collapse signature the peers report; (0, 0) without masked tokens."""
    diff = (rollout_logprobs.float() - logprobs.float()).abs() * mask
    n = mask.sum()
    if n == 0:
        return 0.0, 0.0
    return float(diff.sum() / n), float(diff.max())


def zero_variance_groups(scores, group_size):
    """[N] bool over the N groups of `group_size` consecutive scores (group-major): all rewards equal, so the
    group-relative advantage is 0 for every sample and the group teaches nothing (DAPO's dynamic sampling)."""
    grouped = scores.reshape(-1, group_size)
    return grouped.max(dim=1).values == grouped.min(dim=1).values


def _response_tokens(exp):
    """Each row's response token ids (a list) and the [B, R] response mask: the attention mask's response part,
    which keeps a row that --overlong_filter took out of the loss (its action mask zeroed)."""
    resp_mask = exp.attention_mask[:, exp.prompt_len:].float()
    ids = exp.sequences[:, exp.prompt_len:]
    lengths = resp_mask.sum(1).long().tolist()
    return [row[:k] for row, k in zip(ids.tolist(), lengths)], resp_mask


def experience_stats(exps, group_size=1) -> dict:
    """One step's experience as floats for the log: reward (mean, std, |max|, per component), response length
    (mean, max), truncation, repetition and empty/format-only rates, zero-variance groups (group_size >= 2), KL
    to the reference and the rollout/experience log-prob mismatch (when the rollout gave its log-probs)."""
    scores = torch.cat([e.scores for e in exps]).float().cpu()
    token_rows, masks = [], []
    for e in exps:
        rows, m = _response_tokens(e)
        token_rows += rows
        masks.append(m)
    lengths = torch.tensor([len(r) for r in token_rows], dtype=torch.float)
    texts = [t for e in exps for t in e.responses]
    out = {"reward/mean": scores.mean(), "reward/std": scores.std() if len(scores) > 1 else 0.0,
           "reward/abs_max": scores.abs().max(),
           "response/length": lengths.mean(), "response/length_max": lengths.max(),
           "response/truncated_frac": _mean_flag(e.truncated for e in exps),
           "response/repetition_frac": sum(map(repetitive, token_rows)) / len(token_rows),
           "response/empty_frac": sum(map(empty_or_format_only, texts)) / max(len(texts), 1)}
    if group_size >= 2:
        out["groups/zero_variance_frac"] = zero_variance_groups(scores, group_size).float().mean()
    if exps[0].ref_logprobs is not None:
        kl = torch.cat([((e.logprobs - e.ref_logprobs) * m).sum(1).cpu() for e, m in zip(exps, masks)])
        out["kl/mean"] = kl.mean()
    if all(e.rollout_logprobs is not None for e in exps):
        pairs = [logprob_mismatch(e.rollout_logprobs, e.logprobs, m) for e, m in zip(exps, masks)]
        weights = [float(m.sum()) for m in masks]
        out["logprob_mismatch/rollout_mean"] = sum(p[0] * w for p, w in zip(pairs, weights)) / max(sum(weights), 1.0)
        out["logprob_mismatch/rollout_max"] = max(p[1] for p in pairs)
    for k in exps[0].components:
        out[k] = torch.cat([e.components[k].float().cpu() for e in exps]).mean()
    return {k: float(v) for k, v in out.items()}


def _mean_flag(flags) -> float:
    flags = [f for f in flags if f is not None]
    return float(torch.cat([f.float().cpu() for f in flags]).mean()) if flags else 0.0
