"""R1-Zero prompt templates for Countdown and GSM8K, and strict JSONL loaders for both.

Two styles:

* ``"base"``: TinyZero's plain-text conversation for base models. ``text`` is the whole prompt
  and already ends with ``<think>`` (= ``assistant_prefix``), so nothing is appended.
* ``"chat"``: ``messages`` (system + user) for ``tokenizer.apply_chat_template(...,
  add_generation_prompt=True)``; the caller appends ``assistant_prefix`` (``"<think>"``) after the
  generation prompt so the model starts inside the think block.

:meth:`TaskPrompt.render` does either and is the one place that builds the final prompt string.
``meta`` holds what the reward needs: ``{"task": "countdown", "target", "nums"}`` or
``{"task": "gsm8k", "reference"}``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from step3_rlhf.rewards.gsm8k import extract_reference

__all__ = ["TaskPrompt", "countdown_prompt", "gsm8k_prompt", "load_countdown_jsonl", "load_gsm8k_jsonl"]

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

COUNTDOWN_QUESTION = (
    "Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)
GSM8K_QUESTION = (
    "{question} Show your work in <think> </think> tags. And return the final answer, a single number, "
    "in <answer> </answer> tags, for example <answer> 42 </answer>."
)


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


def _build(question: str, style: str, meta: dict) -> TaskPrompt:
    if style == "base":
        text = f"{BASE_PREAMBLE}\nUser: {question}\n{BASE_ASSISTANT_OPENING}"
        return TaskPrompt(messages=None, text=text, assistant_prefix=THINK_OPEN, meta=meta)
    if style == "chat":
        messages = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": question}]
        return TaskPrompt(messages=messages, text=None, assistant_prefix=THINK_OPEN, meta=meta)
    raise ValueError(f"style must be 'chat' or 'base', got {style!r}")


def countdown_prompt(task: dict, style: str = "chat") -> TaskPrompt:
    """Prompt for a Countdown task ``{"target": int, "nums": [int, ...]}`` (TinyZero wording)."""
    nums = [int(n) for n in task["nums"]]
    target = int(task["target"])
    question = COUNTDOWN_QUESTION.format(nums=nums, target=target)
    return _build(question, style, {"task": "countdown", "target": target, "nums": nums})


def gsm8k_prompt(question: str, style: str = "chat", reference: str | None = None) -> TaskPrompt:
    """Prompt for a GSM8K question; ``reference`` (the number, or the full ``#### N`` answer) goes to meta."""
    if reference is not None and "####" in reference:
        reference = extract_reference(reference)
    return _build(GSM8K_QUESTION.format(question=question.strip()), style,
                  {"task": "gsm8k", "reference": reference})


# ---------------------------------------------------------------- loaders


def _rows(path: str, limit: int | None):
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


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_countdown_jsonl(path: str, limit: int | None = None) -> list[dict]:
    """Rows ``{"target": int, "nums": [int, ...]}``; a malformed row raises a one-line ValueError
    ``"{path}:{line}: field '{field}': {problem}"``."""
    tasks = []
    for line_number, row in _rows(path, limit):
        where = f"{path}:{line_number}"
        if not _is_int(row.get("target")):
            raise ValueError(f"{where}: field 'target': expected an integer, got {_short(row.get('target'))}")
        nums = row.get("nums")
        if not isinstance(nums, list) or not nums or not all(_is_int(n) for n in nums):
            raise ValueError(f"{where}: field 'nums': expected a non-empty list of integers, got {_short(nums)}")
        tasks.append({"target": row["target"], "nums": list(nums)})
    return tasks


def load_gsm8k_jsonl(path: str, limit: int | None = None) -> list[dict]:
    """Rows ``{"question", "answer", "reference"}`` where reference is the number after ``####``;
    a malformed row raises ``ValueError("{path}:{line}: field '{field}': {problem}")``."""
    rows = []
    for line_number, row in _rows(path, limit):
        where = f"{path}:{line_number}"
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: field 'question': expected a non-empty string")
        if not isinstance(answer, str) or "####" not in answer:
            raise ValueError(f"{where}: field 'answer': expected a string ending with '#### N'")
        reference = extract_reference(answer)
        if not reference:
            raise ValueError(f"{where}: field 'answer': nothing after '####'")
        rows.append({"question": question, "answer": answer, "reference": reference})
    return rows
