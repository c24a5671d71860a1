"""Countdown: the task module - prompt, JSONL loader, the TinyZero reward, solver, generator, warm-start text.

The task: combine the given numbers with + - * / (each exactly once) into an equation equal to the
target. Prompt wording is TinyZero's. Rows are ``{"target": int, "nums": [int, ...]}`` (non-negative
numbers); ``--data_path generate[:N]`` makes N solvable 3-number tasks (default 2000).

Scoring rule (``--reward countdown``), TinyZero's ``countdown.compute_score`` values with its holes closed:

* 0 when the response has no complete ``<answer>...</answer>`` pair, or the answer is blank;
* ``format_score`` (0.1) when the response has more than one ``<answer>`` or ``</answer>`` tag (no
  hedging: several candidates are never graded, whichever would be right), or the equation
  - does not write exactly the given numbers, each once: its maximal digit runs must equal the
    decimal spellings of ``nums`` as a multiset (so no ``.5`` for 5, no ``05``, no ``12`` for 1 and 2),
  - has a character other than ASCII digits, ``+ - * / ( )``, space, tab and newline (no ``.``, no
    ``**`` or ``//`` past :func:`safe_eval`, no unicode digits such as ``５``, no unicode spaces),
  - uses a unary sign (``-5 + 6`` writes a number -5 that was not given),
  - fails to evaluate (syntax, division by zero, over :func:`safe_eval`'s caps: 200 characters after
    whitespace is collapsed, 64 nodes, magnitude 1e12), or misses the target;
* ``score`` (1.0) when it equals the target exactly (computed with fractions, so ``(1 / 49) * 49``
  is 1); non-integer intermediate values are fine (``5 / 2 * 2`` for [5, 2, 2] -> 5), as in TinyZero;
  redundant parentheses are fine.

Only the response is read, and only inside the answer tags (an equation written before ``<answer>``
does not count). Differences from TinyZero, all stricter: :func:`safe_eval` instead of ``eval``
(``9**9**9`` scores 0.1 instead of hanging the trainer); TinyZero reads ``1.5`` as the numbers 1 and
5, accepts ``05`` for 5, unary minus and the last of several answers, gives 0.1 to an empty answer,
and compares floats within 1e-5 (``1 / 100001 + 5`` hits 5 for [1, 100001, 5]).

``--reward countdown_steps`` (:func:`countdown_steps_reward`) grades the reasoning instead: the share of true
worked steps ("a op b = c", "reaches N") before ``</think>``.
"""
from __future__ import annotations

import operator
import random
import re
from fractions import Fraction
from itertools import islice
from typing import NamedTuple

from step3_rlhf.tasks.format import extract_answer, sole_answer
from step3_rlhf.tasks.prompts import TaskPrompt, is_int, jsonl_rows, r1_prompt, short_repr
from step3_rlhf.tasks.registry import Task, register
from step3_rlhf.tasks.safe_arith import UnsafeExpression, safe_eval

__all__ = ["COUNTDOWN_QUESTION", "countdown_prompt", "load_countdown_jsonl", "countdown_reward",
           "countdown_steps_reward", "generate_tasks", "solve", "solution_text", "search_solution_text", "TASK"]

COUNTDOWN_QUESTION = (
    "Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)
_ALLOWED_CHARS = re.compile(r"[0-9+\-*/() \t\r\n]+")
_DIGIT_RUN = re.compile(r"[0-9]+")


def countdown_prompt(task: dict, style: str = "chat") -> TaskPrompt:
    """Prompt for a Countdown task ``{"target": int, "nums": [int, ...]}`` (TinyZero wording)."""
    nums = [int(n) for n in task["nums"]]
    target = int(task["target"])
    question = COUNTDOWN_QUESTION.format(nums=nums, target=target)
    return r1_prompt(question, style, {"task": "countdown", "target": target, "nums": nums})


def load_countdown_jsonl(path: str, limit: int | None = None) -> list[dict]:
    """Rows ``{"target": int, "nums": [int >= 0, ...]}``; a malformed row raises a one-line ValueError
    ``"{path}:{line}: field '{field}': {problem}"``."""
    tasks = []
    for line_number, row in jsonl_rows(path, limit):
        where = f"{path}:{line_number}"
        if not is_int(row.get("target")):
            raise ValueError(f"{where}: field 'target': expected an integer, got {short_repr(row.get('target'))}")
        nums = row.get("nums")
        if not isinstance(nums, list) or not nums or not all(is_int(n) and n >= 0 for n in nums):
            # A negative number could only be written with a unary minus, which the reward refuses.
            raise ValueError(f"{where}: field 'nums': expected a non-empty list of non-negative integers, "
                             f"got {short_repr(nums)}")
        tasks.append({"target": row["target"], "nums": list(nums)})
    return tasks


def _uses_exactly(equation: str, nums: list[int]) -> bool:
    # Compared as text: "05", "5.0" or ".5" is not the number 5 as given. One run more than needed decides.
    runs = [m.group() for m in islice(_DIGIT_RUN.finditer(equation), len(nums) + 1)]
    return sorted(runs) == sorted(str(int(n)) for n in nums)


def countdown_reward(response: str, target: int, nums: list[int], format_score: float = 0.1,
                     score: float = 1.0) -> float:
    """Countdown score of one response (see the module docstring for the rule)."""
    equation = extract_answer(response)
    if not equation:  # no answer pair, or a blank one
        return 0.0
    if sole_answer(response) is None or not _uses_exactly(equation, nums) or not _ALLOWED_CHARS.fullmatch(equation):
        return format_score
    try:
        # Line breaks inside the answer are just spacing; runs of whitespace count once against max_len.
        value = safe_eval(" ".join(equation.split()), allow_unary=False, exact=True)
    except UnsafeExpression:
        return format_score
    return score if value == target else format_score


# A worked step "a op b = c" in the reasoning, and a claim "reaches N" about the last step's result.
_STEP = re.compile(r"(?<![\d.])(\d{1,6})\s*([-+*/])\s*(\d{1,6})\s*=\s*(\d{1,9})(?!\.?\d)")
_CLAIM = re.compile(r"\breaches (\d{1,9})\b")


def step_result(match) -> Fraction | None:
    """The exact value of a worked step matched by _STEP ("a op b = c" -> a op b), None for a division by zero."""
    a, op, b = int(match[1]), match[2], int(match[3])
    return None if op == "/" and b == 0 else _OPS[op](Fraction(a), Fraction(b))


def countdown_steps_reward(response: str) -> float:
    """Share of the true statements among the worked steps before ``</think>`` (or ``<answer>``): every
    ``a op b = c`` (true when a op b is exactly c) and every ``reaches N`` (true when N is the result of the
    last step before it). 0.0 with no statement. A dense rule beside ``countdown``: the warm-start model's
    usual mistake is a false step ("62 - 42 = 72. That reaches 72."), which the final score cannot point at.
    It is a share of every statement (no cap a policy could pad past), so true filler only dilutes false steps;
    keep its weight below the outcome's."""
    if not isinstance(response, str):
        return 0.0
    end = min((i for i in (response.find("</think>"), response.find("<answer>")) if i >= 0), default=len(response))
    events = sorted([(m.start(), "step", m) for m in _STEP.finditer(response, 0, end)] +
                    [(m.start(), "claim", m) for m in _CLAIM.finditer(response, 0, end)], key=lambda e: e[0])
    true = total = 0
    last = None
    for _, kind, m in events:
        if kind == "step":
            last = step_result(m)
            true += last == int(m[4])
        else:
            true += last is not None and last == int(m[1])
        total += 1
    return true / total if total else 0.0


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


def _steps_text(node: _Node) -> str:
    """A solution's operations in order: ``95 - 37 = 58. 58 + 4 = 62.``"""
    return " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in node.steps)


def solution_text(nums: list[int], target: int, include_think_open: bool = True) -> str:
    """R1-format warm-start answer: ``<think> steps </think> <answer>EQUATION</answer>``.

    The think part spells out each intermediate operation of the found equation (e.g.
    ``95 - 37 = 58. 58 + 4 = 62.``). Pass ``include_think_open=False`` when the prompt already
    ends with ``<think>`` (the R1-Zero templates do). Raises ValueError if there is no solution.
    """
    return _r1_reply(nums, target, _solved(nums, target), (), include_think_open)


def _solved(nums: list[int], target: int) -> _Node:
    found = _solve_node(nums, target)
    if found is None:
        raise ValueError(f"no solution for nums={list(nums)} target={target}")
    return found


def _r1_reply(nums, target, found: _Node, tries, include_think_open: bool) -> str:
    """The warm-start reply both traces share: the task, any failed attempts, the solution's steps, the answer."""
    think = " ".join([f"I need to combine {', '.join(str(n) for n in nums)} to make {target}.", *tries,
                      _steps_text(found), f"That reaches {target} using each number once."]).replace("  ", " ")
    opening = "<think> " if include_think_open else " "
    return f"{opening}{think} </think> <answer>{found.expr}</answer>"


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _failed_try(nums: list[int], target: int, rng: random.Random) -> str | None:
    """One honest wrong attempt: the numbers in a random order, combined left to right with random ops whose
    results stay non-negative integers (a division only where it is exact), every step computed exactly, ending
    ", not TARGET." None when the draw hit the target (the caller draws again)."""
    order = [Fraction(int(n)) for n in nums]
    rng.shuffle(order)
    value, steps = order[0], []
    for b in order[1:]:
        ops = [op for op in "+-*/" if op != "/" or (b != 0 and (value / b).denominator == 1)]
        op = rng.choice(ops)
        left, right = (value, b) if op != "-" or value >= b else (b, value)
        result = _OPS[op](left, right)  # only the chosen op runs: a 0 on the right is fine unless dividing
        steps.append(f"{_fmt(left)} {op} {_fmt(right)} = {_fmt(result)}.")
        value = result
    if value == target:
        return None
    return " ".join(steps)[:-1] + f", not {target}."


def search_solution_text(nums: list[int], target: int, max_tries: int = 2, seed: int = 0,
                         include_think_open: bool = True) -> str:
    """Like :func:`solution_text`, but the think part first shows 0..``max_tries`` honest failed attempts
    (``44 + 19 = 63. 63 - 35 = 28, not 31.``) before the solution: a warm start that checks its result
    and tries again, where :func:`solution_text` teaches a single chain that always claims the target.
    The attempts are drawn from a generator seeded by (seed, nums, target): the same task gives the same text."""
    found = _solved(nums, target)
    rng = random.Random(f"{seed}:{list(nums)}:{target}")
    tries = []
    for _ in range(rng.randint(0, max_tries)):
        for _draw in range(20):
            attempt = _failed_try(nums, target, rng)
            if attempt is not None and attempt not in tries:
                tries.append(attempt)
                break
    return _r1_reply(nums, target, found, tries, include_think_open)


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


# ---------------------------------------------------------------- registration


def _source(data_path: str, seed: int):
    """``generate`` / ``generate:N`` (or ``synthetic[:N]``): N built-in solvable 3-number tasks (default
    2000), no eval file; any other path is a JSONL file (None)."""
    name, _, count = data_path.partition(":")
    if name not in ("generate", "synthetic"):
        return None
    if count and not count.isdigit():
        raise ValueError(f"--data_path {data_path}: expected generate or generate:N (N tasks)")
    return generate_tasks(int(count or 2000), seed, num_count=(3, 3)), None


TASK = register(Task(
    name="countdown",
    prompt=lambda row, style: countdown_prompt(row, style=style),
    load=load_countdown_jsonl,
    rewards={"countdown": lambda prompt, response, meta: countdown_reward(response, meta["target"], meta["nums"]),
             "countdown_steps": lambda prompt, response, meta: countdown_steps_reward(response)},
    solution=lambda row: solution_text(row["nums"], row["target"], include_think_open=True),
    search_solution=lambda row, max_tries, seed: search_solution_text(row["nums"], row["target"], max_tries, seed),
    source=_source,
    generate=lambda n, seed, size: generate_tasks(n, seed, num_count=(size, size) if size else (3, 4)),
    size=lambda row: len(row["nums"]),
    help="combine the given numbers with + - * / into the target (TinyZero)",
))
