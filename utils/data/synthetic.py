"""Offline synthetic preference data: the demo's default, so the pipeline runs with no downloads.

Designed so a ~135M instruct model learns a visible preference in minutes: short templated tasks
whose CHOSEN reply is correct, concise and polite ("17 + 25 = 42."), and whose REJECTED reply is one
bad style drawn at random - a wrong answer (same polite form, so the model must learn correctness
too; half of them then trail off into chatter), a refusal, a rude reply, rambling/repetition, or an
off-topic reply. Every fact is computed or taken from a fixed table, so answers are always
consistent. Deterministic per seed; prompts are unique within a set.

    python -m utils.data.synthetic --out data/synthetic.jsonl --n 2000 --seed 1234
"""
from __future__ import annotations

import argparse
import json
import os
import random

from utils.data.rows import PreferenceRow

NAMES = ("Maria", "Ahmed", "Yuki", "Olga", "Kwame", "Lucia", "Ravi", "Emma", "Chen", "Fatima", "Noah",
         "Ines", "Tomas", "Aisha", "Liam", "Sofia", "Mateo", "Priya", "Jonas", "Zara", "Hugo", "Mei",
         "Omar", "Elena", "Kofi", "Nina", "Pablo", "Hana", "Ivan", "Leila")
WORDS = ("apple", "river", "garden", "pencil", "window", "rocket", "candle", "forest", "bridge", "guitar",
         "planet", "tiger", "castle", "orange", "silver", "button", "meadow", "harbor", "lantern", "pepper",
         "violin", "marble", "island", "jacket", "cookie", "ladder", "mirror", "parrot", "tunnel", "wizard")
CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
            ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Sweden", "Stockholm"),
            ("Chile", "Santiago"), ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Australia", "Canberra"))
UNITS = (("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("kilograms", "grams", 1000),
         ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24),
         ("weeks", "days", 7), ("liters", "milliliters", 1000), ("feet", "inches", 12), ("years", "months", 12))
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

REFUSALS = ("I can't help with that.", "Sorry, I won't answer that.", "I'm not able to do that.",
            "That is not something I can help with.")
RUDE = ("That's a silly question. Figure it out yourself.", "Ugh, why would you even ask me that?",
        "Do it yourself, I'm busy.", "Seriously? Anyone knows that. Stop wasting my time.")
OFF_TOPIC = ("Did you know octopuses have three hearts? Anyway, I really like trains.",
             "My favourite colour is green, and I think it will rain tomorrow.",
             "Bananas are berries, but strawberries are not. Isn't that fun?",
             "I have been thinking about the ocean a lot lately.")
FILLERS = ("Well, hmm, let me think about that.", "So, um, this is a question, you know.",
           "Okay okay okay, let me see, let me see.", "Right, so, basically, well, hmm.")


def _join(items) -> str:
    return ", ".join(str(x) for x in items)


ARITHMETIC_SIGNS = {"+": "+", "-": "-", "*": "x"}  # how the arithmetic task writes each operation


def arithmetic_value(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_texts(a: int, op: str, b: int, answer: int) -> tuple[str, str]:
    """The arithmetic task's question and a reply stating `answer`, in its wording (bench probes reuse it)."""
    shown = f"{a} {ARITHMETIC_SIGNS[op]} {b}"
    return f"What is {shown}?", f"{shown} = {answer}."


def _arithmetic(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 19), rng.randint(2, 19)
    if op == "-" and b > a:
        a, b = b, a
    value = arithmetic_value(a, op, b)
    wrong = value + rng.choice((-10, -2, -1, 1, 2, 10))
    prompt, chosen = arithmetic_texts(a, op, b, value)
    return prompt, chosen, arithmetic_texts(a, op, b, wrong)[1]


def _units(rng):
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 40)
    wrong = n * factor + rng.choice((-factor, factor, -1, 1)) if rng.random() < 0.5 else n + factor
    return (f"How many {small} are in {n} {big}?", f"{n} {big} is {n * factor} {small}.",
            f"{n} {big} is {wrong} {small}.")


def _reverse(rng):
    items = rng.sample(WORDS, rng.randint(3, 5))
    wrong = items[1:] + items[:1]
    return (f"Reverse this list: {_join(items)}.", f"Reversed: {_join(items[::-1])}.",
            f"Reversed: {_join(wrong)}.")


def _sort(rng):
    nums = rng.sample(range(1, 100), rng.randint(3, 6))
    ordered = sorted(nums)
    wrong = ordered[:]
    i = rng.randrange(len(wrong) - 1)
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    return (f"Sort these numbers from smallest to largest: {_join(nums)}.", f"Sorted: {_join(ordered)}.",
            f"Sorted: {_join(wrong)}.")


def _capitals_letters(rng):
    phrase = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
    wrong = phrase.capitalize()
    return f"Write '{phrase}' in capital letters.", f"{phrase.upper()}", f"{wrong}"


def _greeting(rng):
    name = rng.choice(NAMES)
    when = rng.choice(("", " this morning", " at the party", " on the phone", " in an email", " at work"))
    return (f"Say hello politely to {name}{when}.", f"Hello {name}, it is very nice to meet you!",
            f"Hey {rng.choice(NAMES if rng.random() < 0.5 else (name,))}, whatever.")


def _capital_city(rng):
    i = rng.randrange(len(CAPITALS))
    country, city = CAPITALS[i]
    wrong = CAPITALS[(i + rng.randint(1, len(CAPITALS) - 1)) % len(CAPITALS)][1]
    lead = rng.choice(("What is the capital of", "Which city is the capital of", "Name the capital of"))
    return f"{lead} {country}?", f"The capital of {country} is {city}.", f"The capital of {country} is {wrong}."


def _letter_count(rng):
    word = rng.choice(WORDS) + rng.choice(("", "s"))
    wrong = len(word) + rng.choice((-2, -1, 1, 2))
    return (f"How many letters are in the word '{word}'?", f"The word '{word}' has {len(word)} letters.",
            f"The word '{word}' has {wrong} letters.")


def _next_day(rng):
    i = rng.randrange(7)
    k = rng.randint(1, 5)
    ask = "What day comes after" if k == 1 else f"What day is it {k} days after"
    wrong = DAYS[(i + k + rng.choice((1, 2, 6))) % 7]
    return f"{ask} {DAYS[i]}?", f"It is {DAYS[(i + k) % 7]}.", f"It is {wrong}."


FAMILIES = (_arithmetic, _units, _reverse, _sort, _capitals_letters, _greeting, _capital_city,
            _letter_count, _next_day)


def _bad_reply(rng, prompt: str, wrong: str, chatter_rng) -> str:
    style = rng.choice(("wrong", "wrong", "refusal", "rude", "ramble", "off_topic"))
    if style == "wrong":
        # half trail off into chatter, the base model's habit: the demo's reward model, never shown such a reply
        # rejected, scored "cookie" + a sentence about cookies above "COOKIE"
        return f"{wrong} {chatter_rng.choice(OFF_TOPIC + FILLERS)}" if chatter_rng.random() < 0.5 else wrong
    if style == "refusal":
        return rng.choice(REFUSALS)
    if style == "rude":
        return rng.choice(RUDE)
    if style == "ramble":
        filler = rng.choice(FILLERS)
        return " ".join([filler] * rng.randint(2, 4)) + " I am not sure, maybe, maybe not."
    return rng.choice(OFF_TOPIC)


def make_synthetic_preferences(n: int, seed: int = 1234) -> list[PreferenceRow]:
    """n rows with unique prompts; raises ValueError if the task families cannot supply that many."""
    rng = random.Random(seed)
    chatter_rng = random.Random(f"{seed}:chatter")  # its own stream: the prompts and chosen replies stay as they were
    rows, seen = [], set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could only make {len(rows)} unique synthetic rows (asked for {n})")
        prompt, chosen, wrong = rng.choice(FAMILIES)(rng)
        if prompt in seen:
            continue
        rejected = _bad_reply(rng, prompt, wrong, chatter_rng)
        if rejected == chosen:
            continue
        seen.add(prompt)
        rows.append(PreferenceRow(prompt=({"role": "user", "content": prompt},), chosen=chosen,
                                  rejected=rejected, origin=f"synthetic[seed={seed}]:{len(rows) + 1}"))
    return rows


def write_json_lines(records, path: str) -> None:
    """One JSON object per line, written atomically (a temporary file renamed into place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_jsonl(rows: list[PreferenceRow], out: str) -> None:
    """prompt (plain text) / chosen / rejected JSONL, written atomically."""
    write_json_lines(({"prompt": row.prompt[-1]["content"], "chosen": row.chosen, "rejected": row.rejected}
                      for row in rows), out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write synthetic prompt/chosen/rejected JSONL.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    rows = make_synthetic_preferences(args.n, args.seed)
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
