"""GSM8K: pull the final number out of a reference or a model answer and compare numerically.

References end with ``#### N`` where N may carry thousands separators (``#### 1,234``). Models
write answers like ``$18.00``, ``The answer is 42.`` or ``<answer> 42 </answer>``; the reward
compares numbers exactly (as fractions), so ``"18" == "18.0"`` and ``0.1 + 0.2`` rounding is
never an issue.
"""
from __future__ import annotations

import re
from fractions import Fraction

from step3_rlhf.rewards.countdown import extract_answer

__all__ = ["extract_reference", "extract_model_answer", "numbers_equal", "gsm8k_reward"]

# A number: optional minus (not when glued to a preceding word/digit, as in "2019-2020"), then
# either digits with ","-grouped thousands or plain digits, then an optional decimal part.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-"})


def _clean(text: str) -> str:
    return text.translate(_MINUS_SIGNS).replace(",", "").replace("$", "").strip()


def extract_reference(answer_field: str) -> str:
    """The text after the last ``####`` of a GSM8K answer, commas and ``$`` removed, stripped."""
    if "####" not in answer_field:
        raise ValueError("GSM8K answer has no '####' line")
    return _clean(answer_field.rsplit("####", 1)[1])


def _parse_number(text: str) -> Fraction | None:
    text = _clean(text).rstrip(".")
    if not text or len(text) > 64:
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text.translate(_MINUS_SIGNS))
    return _clean(matches[-1]) if matches else None


def extract_model_answer(text: str) -> str | None:
    """The model's final answer as a cleaned string, or None.

    With an ``<answer>...</answer>`` pair, its content: as-is (cleaned) when it is one number,
    otherwise the last number inside it (``"x = 18 dollars"`` -> ``"18"``), otherwise the cleaned
    content. Without the tag, the last number in the whole text. Commas and ``$`` are removed,
    so ``"$1,234.50"`` -> ``"1234.50"``.
    """
    if not isinstance(text, str):
        return None
    tagged = extract_answer(text)
    if tagged is not None:
        if _parse_number(tagged) is not None:
            return _clean(tagged).rstrip(".")
        return _last_number(tagged) or _clean(tagged) or None
    return _last_number(text)


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Numeric equality of two answer strings (``"18" == "18.0" == "$18.00"``); False if either is not a number."""
    if a is None or b is None:
        return False
    x, y = _parse_number(str(a)), _parse_number(str(b))
    return x is not None and y is not None and x == y


def gsm8k_reward(response: str, reference: str, score: float = 1.0, format_score: float = 0.0) -> float:
    """``score`` if the response's final number equals the reference, else ``format_score`` when
    the response at least has an ``<answer>`` tag, else 0.

    ``reference`` may be the extracted number or the whole GSM8K answer field (with ``####``).
    """
    if "####" in reference:
        reference = extract_reference(reference)
    if numbers_equal(extract_model_answer(response), reference):
        return score
    return format_score if extract_answer(response) is not None else 0.0
