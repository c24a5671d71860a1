"""Countdown: the TinyZero reward, a task generator, a solver and SFT warm-start text.

The task: combine the given numbers with + - * / (each exactly once) into an equation equal to
the target. The reward follows TinyZero's ``countdown.compute_score``:

* 0 when the response has no ``<answer>...</answer>``;
* ``format_score`` (0.1) when the equation does not use exactly the given numbers once each (as
  a multiset, numbers read with the regex ``\\d+``), has characters other than digits,
  ``+ - * / ( ) .`` and whitespace, fails to evaluate, or misses the target;
* ``score`` (1.0) when it evaluates to the target within 1e-5.

Differences, all on the safe side: the equation is evaluated with :func:`safe_eval` instead of
``eval`` (so ``9**9**9`` scores 0.1 instead of hanging the trainer); the answer is the last tag pair
anywhere in the response (TinyZero looks only at the last line of prompt+response); digits are
ASCII only. TinyZero's loophole of decimal literals (``1.5`` reads as the numbers 1 and 5) is kept
by default for fidelity; ``allow_decimals=False`` closes it.
"""
from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import NamedTuple

from step3_rlhf.rewards.safe_arith import UnsafeExpression, safe_eval

__all__ = ["extract_answer", "countdown_reward", "generate_tasks", "solve", "solution_text"]

_ALLOWED_CHARS = re.compile(r"[0-9+\-*/().\s]+")
_NUMBER = re.compile(r"[0-9]+")
_MAX_DIGITS = 18  # Countdown numbers are small; longer digit runs cannot match and int() of huge runs is slow.


def extract_answer(text: str) -> str | None:
    """Stripped content of the last complete ``<answer>...</answer>`` pair, or None.

    Works by ``rfind`` (linear time) instead of a lazy regex, which is quadratic on hostile
    text like ``"<answer>" * 100000``; the content is what lies between the last ``</answer>``
    and the nearest ``<answer>`` before it (it may span lines).
    """
    if not isinstance(text, str):
        return None
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>"):end].strip()


def _uses_exactly(equation: str, nums: list[int]) -> bool:
    runs = _NUMBER.findall(equation)
    if any(len(run) > _MAX_DIGITS for run in runs):
        return False
    return sorted(int(run) for run in runs) == sorted(int(n) for n in nums)


def countdown_reward(response: str, target: int, nums: list[int], format_score: float = 0.1,
                     score: float = 1.0, allow_decimals: bool = True) -> float:
    """TinyZero's Countdown score of one response (see the module docstring for the rule)."""
    equation = extract_answer(response)
    if equation is None:
        return 0.0
    if not _uses_exactly(equation, nums):
        return format_score
    if not _ALLOWED_CHARS.fullmatch(equation) or (not allow_decimals and "." in equation):
        return format_score
    try:
        value = safe_eval(equation)
    except UnsafeExpression:
        return format_score
    return score if abs(value - float(target)) < 1e-5 else format_score


# ---------------------------------------------------------------- solver


class _Node(NamedTuple):
    value: Fraction
    expr: str        # equation text for this subtree
    steps: tuple     # (left, op, right, result) for every operation in the subtree, in order
    leaf: bool


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _wrap(node: _Node) -> str:
    return node.expr if node.leaf else f"({node.expr})"


def _combine(a: _Node, op: str, b: _Node, value: Fraction) -> _Node:
    step = (_fmt(a.value), op, _fmt(b.value), _fmt(value))
    return _Node(value, f"{_wrap(a)} {op} {_wrap(b)}", a.steps + b.steps + (step,), False)


def _candidates(a: _Node, b: _Node, natural: bool):
    """(left, op, right, value) for every way to combine a and b.

    ``natural`` keeps only non-negative integer results (subtract smaller from larger, exact
    division), which gives the readable solutions a person would write.
    """
    if a.leaf and not b.leaf:  # for + and *, write the compound part first: "(95 - 37) + 4"
        a, b = b, a
    x, y = a.value, b.value
    yield a, "+", b, x + y
    yield a, "*", b, x * y
    for left, right in ((a, b), (b, a)):
        diff = left.value - right.value
        if not natural or diff >= 0:
            yield left, "-", right, diff
        if right.value != 0:
            quotient = left.value / right.value
            if not natural or quotient.denominator == 1:
                yield left, "/", right, quotient


def _search(items: list[_Node], target: Fraction, natural: bool, failed: set) -> _Node | None:
    if len(items) == 1:
        return items[0] if items[0].value == target else None
    key = tuple(sorted(node.value for node in items))
    if key in failed:  # solvability depends only on the multiset of values
        return None
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            rest = items[:i] + items[i + 1:j] + items[j + 1:]
            for left, op, right, value in _candidates(items[i], items[j], natural):
                found = _search(rest + [_combine(left, op, right, value)], target, natural, failed)
                if found is not None:
                    return found
    failed.add(key)
    return None


def _solve_node(nums: list[int], target: int) -> _Node | None:
    if not nums:
        return None
    leaves = [_Node(Fraction(int(n)), str(int(n)), (), True) for n in nums]
    goal = Fraction(target)
    # First try non-negative integer intermediates only, then any rational intermediate.
    for natural in (True, False):
        found = _search(leaves, goal, natural, set())
        if found is not None:
            return found
    return None


def solve(nums: list[int], target: int) -> str | None:
    """An equation using every number of ``nums`` exactly once that equals ``target``, or None.

    Exhaustive search over combination trees (pick two values, combine, recurse) with exact
    rational arithmetic; failed multisets are memoised. Prefers solutions whose intermediate
    results are non-negative integers. Compound operands are always parenthesised:
    ``solve([95, 37, 4], 62) -> "(95 - 37) + 4"``.
    """
    found = _solve_node(nums, target)
    return None if found is None else found.expr


def solution_text(nums: list[int], target: int, include_think_open: bool = True) -> str:
    """R1-format warm-start answer: ``<think> steps </think> <answer>EQUATION</answer>``.

    The think part spells out each intermediate operation of the found equation (e.g.
    ``95 - 37 = 58. 58 + 4 = 62.``). Pass ``include_think_open=False`` when the prompt already
    ends with ``<think>`` (the R1-Zero templates do). Raises ValueError if there is no solution.
    """
    found = _solve_node(nums, target)
    if found is None:
        raise ValueError(f"no solution for nums={list(nums)} target={target}")
    steps = " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in found.steps)
    think = (f"I need to combine {', '.join(str(n) for n in nums)} to make {target}. {steps} "
             f"That reaches {target} using each number once.").replace("  ", " ")
    opening = "<think> " if include_think_open else " "
    return f"{opening}{think} </think> <answer>{found.expr}</answer>"


# ---------------------------------------------------------------- generator


def _random_value(nums: list[int], rng: random.Random) -> Fraction | None:
    """Combine the numbers in a random order with random ops; None if a division is not exact."""
    values = [Fraction(n) for n in nums]
    rng.shuffle(values)
    while len(values) > 1:
        a, b = values.pop(), values.pop()
        op = rng.choice("+-*/")
        if op == "+":
            value = a + b
        elif op == "-":
            value = abs(a - b)
        elif op == "*":
            value = a * b
        else:
            big, small = max(a, b), min(a, b)
            if small == 0 or big % small:
                return None
            value = big / small
        values.insert(rng.randrange(len(values) + 1), value)
    return values[0]


def generate_tasks(n: int, seed: int, num_count: tuple[int, int] | int = (3, 4), max_number: int = 100,
                   max_target: int = 1000, min_target: int = 1) -> list[dict]:
    """``n`` solvable Countdown tasks ``{"target": int, "nums": [int, ...]}``, same for the same seed.

    Each task is built backwards: draw ``num_count`` numbers (inclusive range) from
    1..``max_number``, combine them by a random expression tree with non-negative integer
    intermediates, keep the result as the target if it lies in [min_target, max_target], and
    confirm with :func:`solve`.
    """
    lo, hi = (num_count, num_count) if isinstance(num_count, int) else num_count
    if n < 0 or lo < 1 or hi < lo or max_number < 1 or max_target < min_target:
        raise ValueError("generate_tasks: bad arguments")
    rng = random.Random(seed)
    tasks: list[dict] = []
    attempts = 0
    while len(tasks) < n:
        attempts += 1
        if attempts > 1000 * (n + 1):
            raise RuntimeError("generate_tasks: could not find enough targets in range")
        nums = [rng.randint(1, max_number) for _ in range(rng.randint(lo, hi))]
        value = _random_value(nums, rng)
        if value is None or value.denominator != 1 or not min_target <= value <= max_target:
            continue
        target = int(value)
        if solve(nums, target) is not None:
            tasks.append({"target": target, "nums": nums})
    return tasks
