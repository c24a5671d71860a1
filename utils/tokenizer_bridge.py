"""Actor and reward model of different tokenizer families: detect it at start, score through the reward model's
own tokens.

Step 3 feeds the actor's token ids to the reward model and the critic. With a reward model of another family
(a small OPT reward model for a Llama actor) those ids mean other words - wrong scores without a word, or an
embedding index error. At start `compare` checks vocabulary (size and content), special tokens and a round trip
of a probe text. When they differ, `RewardBridge` decodes the actor's samples and re-tokenises them as step 2
trained the reward model (utils.data.datasets: the prompt through the reward tokenizer's chat template or hh
text, the reply + EOS), right-padded; the score is read at the last real token. The critic needs a value per
actor token, so it must share the actor's tokenizer: `step3_rlhf.tokenizer_check` refuses with one line otherwise.
"""
from __future__ import annotations

import torch

# characters every family must round-trip the same way for the ids to be interchangeable
PROBE = "Hello, World! 12 + 30 = 42.\n\tThe quick brown fox - ünïcödé, 日本語 <tag>"
_SPECIALS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
_SENTINEL = "\u2063SENTINEL\u2063"


def describe(tokenizer) -> str:
    return f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} (vocabulary {len(tokenizer)})"


def compare(a, b) -> str | None:
    """None when ids of `a` mean the same text to `b`, else the first difference, in words."""
    if len(a) != len(b):
        return f"vocabulary sizes differ ({len(a)} vs {len(b)})"
    for name in _SPECIALS:
        if name != "pad_token_id" and getattr(a, name, None) != getattr(b, name, None):
            return f"{name.replace('_id', '')} differs ({getattr(a, name, None)} vs {getattr(b, name, None)})"
    if a.get_vocab() != b.get_vocab():
        return "vocabularies differ (same size, other tokens or ids)"
    ids_a, ids_b = a(PROBE, add_special_tokens=False)["input_ids"], b(PROBE, add_special_tokens=False)["input_ids"]
    if list(ids_a) != list(ids_b):
        return "the probe text tokenises differently"
    return None


# ---------------------------------------------------------------- the actor's rendered prompt back to messages


def _role_marks(tokenizer, role: str) -> tuple[str, str] | None:
    """(text before, text after) one `role` message in the tokenizer's chat template, or None."""
    try:
        text = tokenizer.apply_chat_template([{"role": role, "content": _SENTINEL}], tokenize=False)
    except Exception:  # noqa: BLE001 - templates that refuse a lone system/assistant turn
        return None
    if text.count(_SENTINEL) != 1:
        return None
    before, after = text.split(_SENTINEL)
    return before, after


def prompt_messages_from_text(text: str, tokenizer) -> list[dict]:
    """Messages of a prompt that `utils.data.templates.format_prompt(tokenizer, messages)` rendered: hh text
    without a chat template; with one, each turn is matched against the template's own role markers. Text
    that matches no marker becomes one user message."""
    from utils.data.rows import parse_hh_text
    from utils.data.templates import uses_chat_template
    if not uses_chat_template(tokenizer):
        return parse_hh_text(text) or [{"role": "user", "content": text.strip()}]
    marks = {r: m for r in ("system", "user", "assistant") if (m := _role_marks(tokenizer, r))}
    gen = _generation_cue(tokenizer)
    body = text[:-len(gen)] if gen and text.endswith(gen) else text
    bos = getattr(tokenizer, "bos_token", None) or ""
    messages, pos = [], 0
    while pos < len(body):
        for role, (before, after) in marks.items():
            head = before[len(bos):] if messages and bos and before.startswith(bos) else before
            end = body.find(after, pos + len(head)) if body.startswith(head, pos) else -1
            if end >= 0:
                messages.append({"role": role, "content": body[pos + len(head):end].strip()})
                pos = end + len(after)
                break
        else:
            return [{"role": "user", "content": text.strip()}]
    return messages or [{"role": "user", "content": text.strip()}]


def _generation_cue(tokenizer) -> str:
    msg = [{"role": "user", "content": _SENTINEL}]
    try:
        plain = tokenizer.apply_chat_template(msg, tokenize=False)
        cued = tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001
        return ""
    return cued[len(plain):] if cued.startswith(plain) else ""


# ---------------------------------------------------------------- re-tokenising for the reward model


def retokenize(prompts: list[str], responses: list[str], actor_tokenizer, reward_tokenizer,
               max_len: int | None = None) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask [B, T] for the reward model, right-padded as step 2 scored them: the prompt
    rendered by the reward tokenizer (its chat template, else hh text), then the reply + EOS. Longer than
    `max_len`: the prompt is left-truncated first (utils.data.datasets.fit_lengths)."""
    from utils.data.datasets import fit_lengths, pad_sequences, tokenize_prompt, tokenize_response
    seqs = []
    for prompt, reply in zip(prompts, responses):
        p_ids = tokenize_prompt(reward_tokenizer, prompt_messages_from_text(prompt, actor_tokenizer))
        r_ids = tokenize_response(reward_tokenizer, reply.strip() or " ")
        if max_len:
            keep_p, (keep_r,) = fit_lengths(len(p_ids), [len(r_ids)], max_len)
            p_ids, r_ids = p_ids[len(p_ids) - keep_p:], r_ids[:keep_r]
        seqs.append(p_ids + r_ids)
    input_ids, attention_mask = pad_sequences(seqs, reward_tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class RewardBridge:
    """Scores the actor's (prompt text, response text) with the reward model's own tokens."""

    def __init__(self, actor_tokenizer, reward_tokenizer, max_len: int | None = None):
        self.actor_tokenizer, self.reward_tokenizer, self.max_len = actor_tokenizer, reward_tokenizer, max_len

    @torch.no_grad()
    def score(self, reward_model, prompts, responses, device, row_chunk: int | None = None) -> torch.Tensor:
        """[B] scores at each sequence's last real token; `row_chunk` rows per forward."""
        from utils.losses import gather_last
        batch = retokenize(prompts, responses, self.actor_tokenizer, self.reward_tokenizer, self.max_len)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        step = row_chunk or ids.shape[0]
        return torch.cat([gather_last(reward_model(ids[i:i + step], mask[i:i + step]), mask[i:i + step])
                          for i in range(0, ids.shape[0], step)]).float()


def reward_checkpoint_problem(path: str) -> str | None:
    """A causal LM given as the reward model loads with a new, random score head: its scores mean nothing."""
    import json
    import os
    try:
        with open(os.path.join(path, "config.json")) as fh:
            arch = json.load(fh).get("architectures") or []
    except (OSError, ValueError):
        return None
    if arch and all(a.endswith("ForCausalLM") for a in arch):
        return (f"the reward model {path} is a causal LM ({', '.join(arch)}), not a step-2 reward model: its score "
                "head starts random, so its scores mean nothing; pass a step-2 output directory")
    return None


def max_positions(path: str) -> int | None:
    try:
        from transformers import AutoConfig
        return getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    except Exception:  # noqa: BLE001 - no limit known: no truncation
        return None
