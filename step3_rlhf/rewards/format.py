"""Shaping rewards that look only at the form of a response: R1 tag layout and length.

The R1-Zero prompts end with ``<think>``, so the response usually starts inside the think block;
a leading ``<think>`` is accepted too (chat models often repeat it).
"""
from __future__ import annotations

import re

__all__ = ["R1_FORMAT", "format_reward", "length_reward"]

# The exact R1 layout, matched against the whole response (re.fullmatch, DOTALL):
#   optional whitespace, optional "<think>",
#   a think body with no "<think>" / "</think>" inside, "</think>",
#   optional whitespace, "<answer>", an answer body with no "<answer>" / "</answer>" inside,
#   "</answer>", optional trailing whitespace - and nothing else (no text after the answer).
# Tempered tokens ((?:(?!...).)*) keep matching linear and forbid a second block.
R1_FORMAT = re.compile(
    r"\s*(?:<think>)?"
    r"(?:(?!</?think>).)*"
    r"</think>\s*"
    r"<answer>(?:(?!</?answer>).)*</answer>"
    r"\s*",
    re.DOTALL,
)


def format_reward(response: str, score: float = 1.0) -> float:
    """``score`` when the response fully matches :data:`R1_FORMAT`, else 0.

    Decode responses with ``skip_special_tokens=True``: a trailing EOS string counts as extra text.
    """
    return score if isinstance(response, str) and R1_FORMAT.fullmatch(response) else 0.0


def length_reward(response: str, target_chars: int = 1000, min_chars: int = 0,
                  decay_chars: int | None = None, score: float = 1.0) -> float:
    """Piecewise-linear length shaping in [0, score], measured in characters.

    ``L = len(response)``:

    * ``L < min_chars``: ramps up linearly, ``score * L / min_chars`` (discourages empty answers);
    * ``min_chars <= L <= target_chars``: ``score``;
    * ``L > target_chars``: falls linearly to 0 at ``target_chars + decay_chars``
      (default ``decay_chars = target_chars``, i.e. 0 at twice the target) and stays 0.

    The overlong part is the soft overlong penalty of DAPO, shifted to [0, 1]: it nudges the
    policy away from rambling without a cliff at the generation limit.
    """
    if target_chars <= 0 or min_chars < 0 or min_chars > target_chars:
        raise ValueError("length_reward needs 0 <= min_chars <= target_chars and target_chars > 0")
    decay = target_chars if decay_chars is None else decay_chars
    if decay <= 0:
        raise ValueError("length_reward needs decay_chars > 0")
    length = len(response)
    if length < min_chars:
        return score * length / min_chars
    if length <= target_chars:
        return score
    return score * max(0.0, 1.0 - (length - target_chars) / decay)
