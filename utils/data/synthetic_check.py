"""Rule checker for the synthetic tasks (utils/data/synthetic.py): is a reply to one of its prompts right?

The reward model can like a reply that is wrong (``defCOBcookie= "cookie"`` for "Write 'cookie' in capital
letters."), so the demo also counts correct answers by rule. Every synthetic prompt determines its answer, so
the answer is re-derived from the prompt text (no extra field the readers and caches would have to carry).

The rule is lenient about wording ("Sure! 17 + 25 = 42." and "42" both pass) and strict about the fact: the
right number / word / list must appear and nothing may conflict with it (another number, another city, another
day), and a refusal, a rude or off-topic reply, or code-like text is wrong whatever it contains.

    expected_answer(prompt) -> str | None      check(prompt_or_row, response) -> bool

Also a step-3 rule reward beside the reward model, which cannot check arithmetic (the demo's liked "9 kilograms
is 900 grams"): ``--reward model:STEP2_DIR utils.data.synthetic_check:rule_reward=2``. Tried in the demo
(2026-12-04, with a trial set whose rejected replies were half near misses): at weight 2 and the preset's 24 steps
right answers stayed 7/32; at weight 3, lr 2e-5 and 48 steps the reward model's score rose (2.8 -> 3.8) while right
answers fell 7 -> 5 - the rule did not outweigh a reward model that can be fooled, so the demo does not use it.
Tried again with a step 1 that answers 15-20 of 32 (2026-12-04): weight 3 at lr 2e-5 with warm-up, 48 steps, 15 ->
13 right; at lr 5e-5, 20 -> 5 (step3_rlhf/training_scripts/demo.sh says more).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from utils.data.synthetic import CAPITALS, DAYS, NAMES, UNITS, WORDS
from utils.data.templates import last_user_message

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
# how a reply may restate the operation ("17 plus 25", "17 * 25")
_OP_WORDS = {"+": r"(?:\+|plus|and)", "-": r"(?:-|−|minus)", "x": r"(?:x|\*|×|times|multiplied by)"}
_NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?![\d,])|(?<![\w.])\d+(?:\.\d+)?")
_COUNT_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                           "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty"
                                           .split())}
# a reply with any of these is not an answer, whatever else it holds (the generator's bad styles, and code)
_REFUSAL_OR_RUDE = re.compile(r"\b(?:can't|cannot|won't|not able|unable|not sure|figure it out|yourself|silly|"
                              r"stupid|ugh|seriously|whatever|wasting|busy)\b",
                              re.IGNORECASE)
# prose may hold parentheses or a semicolon; a call, an assignment or brackets are code
_CODE = re.compile(r"[{}\[\]<>`\\|#$_]|[A-Za-z_]\(|[A-Za-z_]=|=\s*[\"']|==|\b(?:def|print|return|import|lambda)\b")
_GREETING = re.compile(r"\b(?:hello|hi|good (?:morning|afternoon|evening|day)|dear|greetings|welcome)\b",
                       re.IGNORECASE)


@dataclass(frozen=True)
class Task:
    kind: str          # the generator family: arithmetic, units, reverse, sort, upper, greeting, capital, ...
    answer: str        # the expected answer, as the generator's chosen reply states it
    allowed: tuple = ()  # what a reply may restate without conflicting (numbers / words from the prompt)


def _prompt_text(prompt_or_row) -> str:
    """The user's question from a prompt string (plain or chat-rendered), a PreferenceRow or a dict row."""
    if isinstance(prompt_or_row, dict):
        prompt_or_row = prompt_or_row["prompt"]
    prompt = getattr(prompt_or_row, "prompt", prompt_or_row)
    if isinstance(prompt, (tuple, list)):  # PreferenceRow.prompt: the messages
        prompt = prompt[-1]["content"]
    return last_user_message(str(prompt)).strip()


def _items(text: str) -> list[str]:
    return [t.strip() for t in text.split(",")]


def _numeric_task(q: str) -> Task | None:
    m = re.fullmatch(r"What is (\d+) ([+\-x]) (\d+)\?", q)
    if m:
        a, op, b = int(m[1]), m[2], int(m[3])
        return Task("arithmetic", str(_OPS[op](a, b)), (a, op, b))
    m = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", q)
    if m:
        factor = next((f for big, small, f in UNITS if big == m[3] and small == m[1]), None)
        if factor is not None:
            n = int(m[2])
            return Task("units", str(n * factor), (n, factor, 1))
    m = re.fullmatch(r"How many letters are in the word '(\w+)'\?", q)
    if m:
        return Task("letters", str(len(m[1])), ())
    m = re.fullmatch(r"Sort these numbers from smallest to largest: ([\d, ]+)\.", q)
    if m:
        nums = [int(x) for x in _items(m[1])]
        return Task("sort", ", ".join(str(x) for x in sorted(nums)), tuple(nums))
    return None


def _word_task(q: str) -> Task | None:
    m = re.fullmatch(r"Reverse this list: ([a-z, ]+)\.", q)
    if m:
        items = _items(m[1])
        return Task("reverse", ", ".join(items[::-1]), tuple(items))
    m = re.fullmatch(r"Write '([a-z ]+)' in capital letters\.", q)
    if m:
        return Task("upper", m[1].upper(), tuple(m[1].split()))
    m = re.fullmatch(r"Say hello politely to (\w+)(?: [\w ]+)?\.", q)
    if m and m[1] in NAMES:
        return Task("greeting", m[1])
    m = re.fullmatch(r"(?:What is the capital of|Which city is the capital of|Name the capital of) (\w+)\?", q)
    capitals = dict(CAPITALS)
    if m and m[1] in capitals:
        return Task("capital", capitals[m[1]], (m[1],))
    m = re.fullmatch(r"What day (?:comes after|is it (\d) days after) (\w+)\?", q)
    if m and m[2] in DAYS:
        k = int(m[1] or 1)
        return Task("day", DAYS[(DAYS.index(m[2]) + k) % 7], (m[2],))
    return None


def parse_task(prompt_or_row) -> Task | None:
    """The task and expected answer of a synthetic prompt; None for any other prompt."""
    q = " ".join(_prompt_text(prompt_or_row).split())
    return _numeric_task(q) or _word_task(q)


def expected_answer(prompt_or_row) -> str | None:
    task = parse_task(prompt_or_row)
    return task.answer if task else None


def is_synthetic(prompt_or_row) -> bool:
    return parse_task(prompt_or_row) is not None


def _numbers(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text)]


def _words_in_order(text: str, vocabulary) -> list[str]:
    """The vocabulary words a reply names, in the order it names them (whole words, any case)."""
    pattern = r"\b(" + "|".join(re.escape(w) for w in sorted(vocabulary, key=len, reverse=True)) + r")\b"
    return [w.lower() for w in re.findall(pattern, text, re.IGNORECASE)]


def _echo_then(seq: list, answer: list, echo: list) -> bool:
    """The answer alone, or the prompt's own list restated first and then the answer."""
    return seq == answer or seq == echo + answer


def _check_numeric(task: Task, reply: str) -> bool:
    if task.kind == "arithmetic":
        a, op, b = task.allowed
        # drop the restated sum first, so "10 - 5" alone does not pass for 5 (an operand equal to the answer)
        reply = re.sub(rf"\b{a}\s*{_OP_WORDS[op]}\s*{b}\b", " ", reply, count=1)
        allowed = {a, b}
    else:
        allowed = set(task.allowed)
    found = _numbers(reply)
    if task.kind == "letters":
        found += [float(_COUNT_WORDS[w]) for w in re.findall(r"[a-z]+", reply.lower()) if w in _COUNT_WORDS]
    if task.kind == "sort":
        want = [float(x) for x in _items(task.answer)]
        return _echo_then(found, want, [float(x) for x in task.allowed])
    want = float(task.answer)
    return want in found and all(x == want or x in allowed for x in found)


def _check_words(task: Task, reply: str) -> bool:
    if task.kind == "reverse":
        answer = _items(task.answer)
        return _echo_then(_words_in_order(reply, WORDS), answer, list(task.allowed))
    if task.kind == "upper":
        # the capitals must be the phrase's words, in order, and no other capitalised run ("defCOBcookie")
        runs = re.findall(r"[A-Z]{2,}", reply)
        return re.search(rf"(?<![A-Za-z]){re.escape(task.answer)}(?![A-Za-z])", reply) is not None \
            and all(r.lower() in task.allowed for r in runs if r != "OK")
    if task.kind == "greeting":
        named = set(_words_in_order(reply, NAMES))
        return _GREETING.search(reply) is not None and named == {task.answer.lower()}
    if task.kind == "capital":
        named = set(_words_in_order(reply, [city for _, city in CAPITALS]))
        return named == {task.answer.lower()}
    named = _words_in_order(reply, DAYS)  # "day": the answer, and at most the prompt's day restated
    return task.answer.lower() in named and set(named) <= {task.answer.lower(), task.allowed[0].lower()}


def check(prompt_or_row, response: str) -> bool:
    """True when `response` answers the synthetic prompt correctly (see the module doc for the rule).

    Raises ValueError for a prompt that is not one of the synthetic templates."""
    task = parse_task(prompt_or_row)
    if task is None:
        raise ValueError(f"not a synthetic prompt: {_prompt_text(prompt_or_row)[:80]!r}")
    reply = " ".join(str(response).split())
    if not reply or _REFUSAL_OR_RUDE.search(reply) or _CODE.search(reply):
        return False
    return _check_numeric(task, reply) if task.kind in ("arithmetic", "units", "letters", "sort") \
        else _check_words(task, reply)


def rule_reward(prompt: str, response: str, meta: dict) -> float:
    """Step 3's ``--reward utils.data.synthetic_check:rule_reward``: 1.0 for a reply right by :func:`check`, else 0.0.

    Raises ValueError for a prompt that is not one of the synthetic templates (the rule cannot judge it)."""
    return 1.0 if check(prompt, response) else 0.0
