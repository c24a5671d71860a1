"""The R1-Zero prompt layout every task shares, and a strict JSONL row reader for task loaders.

Two styles:

* ``"base"``: TinyZero's plain-text conversation for base models. ``text`` is the whole prompt
  and already ends with ``<think>`` (= ``assistant_prefix``), so nothing is appended.
* ``"chat"``: ``messages`` (system + user) for ``tokenizer.apply_chat_template(...,
  add_generation_prompt=True)``; the caller appends ``assistant_prefix`` (``"<think>"``) after the
  generation prompt so the model starts inside the think block.

A task module writes only its question (e.g. countdown.COUNTDOWN_QUESTION) and calls :func:`r1_prompt`;
:meth:`TaskPrompt.render` is the one place that builds the final prompt string. ``meta`` holds what the
task's rewards need (e.g. ``{"task": "countdown", "target", "nums"}``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = ["TaskPrompt", "THINK_OPEN", "r1_prompt", "jsonl_rows", "short_repr", "is_int"]

THINK_OPEN = "<think>"

BASE_PREAMBLE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the answer."
)
CHAT_SYSTEM = (
    "You are a helpful assistant. You first think about the reasoning process in the mind "
    "and then provide the user with the answer."
)
BASE_ASSISTANT_OPENING = "Assistant: Let me solve this step by step.\n" + THINK_OPEN


@dataclass
class TaskPrompt:
    """One prompt: ``messages`` (chat) or ``text`` (base), the assistant prefix, and reward meta."""
    messages: list[dict] | None
    text: str | None
    assistant_prefix: str
    meta: dict = field(default_factory=dict)

    def render(self, tokenizer=None) -> str:
        """The exact string to feed the model; the response continues right after it."""
        if self.text is not None:
            return self.text  # base style: already ends with assistant_prefix
        if tokenizer is None:
            raise ValueError("a chat prompt needs a tokenizer with a chat template to render")
        chat = tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        return chat + self.assistant_prefix


def r1_prompt(question: str, style: str, meta: dict) -> TaskPrompt:
    """The R1-Zero prompt (``style`` "base" or "chat") asking ``question``; the model continues after ``<think>``."""
    if style == "base":
        text = f"{BASE_PREAMBLE}\nUser: {question}\n{BASE_ASSISTANT_OPENING}"
        return TaskPrompt(messages=None, text=text, assistant_prefix=THINK_OPEN, meta=meta)
    if style == "chat":
        messages = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": question}]
        return TaskPrompt(messages=messages, text=None, assistant_prefix=THINK_OPEN, meta=meta)
    raise ValueError(f"style must be 'chat' or 'base', got {style!r}")


# ---------------------------------------------------------------- JSONL rows for task loaders


def jsonl_rows(path: str, limit: int | None = None):
    """Yield (line_number, dict) for the non-blank lines of a JSONL file, at most ``limit`` rows."""
    count = 0
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if limit is not None and count >= limit:
                return
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: field '(row)': invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: field '(row)': expected an object, got {type(row).__name__}")
            count += 1
            yield line_number, row


def short_repr(value) -> str:
    """``repr(value)`` cut to 60 characters, for one-line error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value) -> bool:
    """An int that is not a bool (JSON ``true`` loads as a bool, which is an int subclass)."""
    return isinstance(value, int) and not isinstance(value, bool)
