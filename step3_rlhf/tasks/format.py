"""Generic pieces about the form of a response: the R1 tag layout (format reward), the ``<answer>`` tag
every task reads its answer from, and length shaping.

The R1-Zero prompts end with ``<think>``, so the response usually starts inside the think block;
a leading ``<think>`` is accepted too (chat models often repeat it).

Format rule (:func:`format_reward`): ``score`` only for exactly one think block followed by exactly one
non-blank answer and nothing else. So these score 0: a second think block or a second ``</think>``,
an ``<answer>`` tag anywhere but the final answer (also inside the think block), a think tag inside
the answer, an empty or blank
``<answer> </answer>`` (else "</think><answer></answer>" would earn full format credit for no answer),
text after the answer, and a missing or unclosed tag.
"""
from __future__ import annotations

__all__ = ["ANSWER_OPEN", "ANSWER_CLOSE", "extract_answer", "sole_answer", "format_reward",
           "length_reward"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def _is_r1_layout(text: str) -> bool:
    """The exact R1 layout: optional whitespace, optional ``<think>``, a think body with no think or answer
    tag, ``</think>``, optional whitespace, ``<answer>``, a non-blank body with no think or answer tag, ``</answer>``,
    optional whitespace - and nothing else. Tag counts and finds only: linear, about 1 ms per MB (a
    tempered-token regex took 0.4 s per MB)."""
    body = text.strip()
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN):]
    if THINK_OPEN in body or body.count(THINK_CLOSE) != 1 or body.count(ANSWER_OPEN) != 1 \
            or body.count(ANSWER_CLOSE) != 1 or not body.endswith(ANSWER_CLOSE):
        return False
    think_end, answer_start = body.find(THINK_CLOSE), body.find(ANSWER_OPEN)
    if answer_start < think_end or body[think_end + len(THINK_CLOSE):answer_start].strip():
        return False  # the answer is inside the think block, or text lies between the two blocks
    return bool(body[answer_start + len(ANSWER_OPEN):-len(ANSWER_CLOSE)].strip())


def extract_answer(text: str) -> str | None:
    """Stripped content of the last complete ``<answer>...</answer>`` pair, or None.

    Works by ``rfind`` (linear time) instead of a lazy regex, which is quadratic on hostile
    text like ``"<answer>" * 100000``; the content is what lies between the last ``</answer>``
    and the nearest ``<answer>`` before it (it may span lines).
    """
    if not isinstance(text, str):
        return None
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(ANSWER_OPEN):end].strip()


def sole_answer(text: str) -> str | None:
    """Like :func:`extract_answer`, but None unless the text has exactly one ``<answer>`` and one ``</answer>``.

    Task rewards grade only a sole answer: with several, a policy could hedge (write candidates and
    let the grader pick one), so a response with more than one answer tag gets no more than the
    format score.
    """
    if not isinstance(text, str) or text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return None
    return extract_answer(text)


def format_reward(response: str, score: float = 1.0) -> float:
    """``score`` when the response has exactly the R1 layout (module docstring), else 0.

    Decode responses with ``skip_special_tokens=True``: a trailing EOS string counts as extra text.
    """
    return score if isinstance(response, str) and _is_r1_layout(response) else 0.0


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
