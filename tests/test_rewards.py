"""Rule rewards for step 3: safe arithmetic, Countdown (TinyZero rule), GSM8K, format, prompts, registry."""
import json
import os
import time

import pytest

from step3_rlhf.tasks.countdown import (countdown_prompt, countdown_reward, countdown_steps_reward,
                                        generate_tasks, load_countdown_jsonl, solution_text, solve)
from step3_rlhf.tasks.format import extract_answer, format_reward, length_reward
from step3_rlhf.tasks.gsm8k import (extract_model_answer, extract_reference, gsm8k_prompt, gsm8k_reward,
                                    load_gsm8k_jsonl, numbers_equal)
from step3_rlhf.tasks.rewards import ModelRewardSpec, RuleRewards, RuleSpec, parse_reward_specs, split_specs
from step3_rlhf.tasks.safe_arith import UnsafeExpression, safe_eval


# A user reward for the registry tests, imported by name as "tests.test_rewards:my_fn".
def my_fn(prompt, response, meta):
    return 2.0 if "yes" in response else 0.0


NOT_CALLABLE = 3


def _boom(prompt, response, meta):
    raise RuntimeError("buggy user reward")


# ---------------------------------------------------------------- safe_eval

@pytest.mark.parametrize("expr, value", [
    ("(95 - 37) + 4", 62.0),       # 58 + 4
    ("74 - (96 + 37) / 7", 55.0),  # 133 / 7 = 19; 74 - 19
    ("-(-3) * +2", 6.0),
    ("7 / 2", 3.5),                # true division
    ("  1.5 * 2 ", 3.0),
])
def test_safe_eval_values(expr, value):
    assert safe_eval(expr) == value


@pytest.mark.parametrize("expr", [
    "9**9**9", "__import__('os')", "().__class__", "1" * 10000, "(" * 1000 + "1" + ")" * 1000, "-" * 150 + "1",
])
def test_safe_eval_refuses_hostile_input_before_evaluating(expr):
    # bounded work by construction: the length cap is checked before parsing, the node cap and the operator
    # whitelist before evaluating (no timing here; speed belongs in bench/)
    with pytest.raises(UnsafeExpression):
        safe_eval(expr)


def test_safe_eval_deep_but_short_nesting_is_fine():
    assert safe_eval("(" * 99 + "1" + ")" * 99) == 1.0


# ---------------------------------------------------------------- countdown reward

NUMS, TARGET = [95, 37, 4], 62


def _ans(equation):
    return f"<think> reasoning </think> <answer>{equation}</answer>"


@pytest.mark.parametrize("response, expected", [
    (_ans("(95 - 37) + 4"), 1.0),                 # 58 + 4 = 62
    (_ans("4 + 95 - 37"), 1.0),                   # order does not matter: 99 - 37 = 62
    ("<answer>\n(95 - 37) + 4\n</answer>", 1.0),  # content spans lines (DOTALL), stripped
    (_ans("95 - 37 - 4"), 0.1),                   # wrong value: 54
    (_ans("95 - 37 + 4 + 4 - 4"), 0.1),           # 4 used three times (value is still 62)
    (_ans("95 - 37"), 0.1),                       # missing 4
    (_ans("95 - 37 + 4 + 0"), 0.1),               # extra number 0 (value is still 62)
    (_ans("95 - 37 + 4 = 62"), 0.1),              # '=' is not allowed, and 62 is an extra number
    ("(95 - 37) + 4", 0.0),                       # no answer tag
    ("<answer>(95 - 37) + 4", 0.0),               # unclosed tag
    # several answers are never graded, whichever is right (no hedging): format score only
    (_ans("95 - 37 - 4") + " then " + _ans("(95 - 37) + 4"), 0.1),
    (_ans("(95 - 37) + 4") + " then " + _ans("95 - 37 - 4"), 0.1),
])
def test_countdown_reward_table(response, expected):
    assert countdown_reward(response, TARGET, NUMS) == expected


@pytest.mark.parametrize("response, expected", [
    # a warm-start reply: 14+4=18 true, 18+14=32 true (twice each), "reaches 49" false (last result 32): 4 of 5
    (" 14 + 4 = 18. 18 + 14 = 32, not 49. 14 + 4 = 18. 18 + 14 = 32. That reaches 49 using each number once. "
     "</think> <answer>(14 + 4) + 14</answer>", 0.8),
    (" 40 + 74 = 114. 114 - 58 = 56. That reaches 56 using each number once. </think> <answer>x</answer>", 1.0),
    (" 86 - 54 = 30. 49 - 30 = 91. That reaches 91. </think>", 0.0),   # 32, 19, and 19 is not 91
    (" 7 * 6 = 42. 84 / 2 = 42. 8 / 0 = 1. </think>", 2 / 3),          # dividing by zero is no result
    (" 9 / 2 = 4. 9 / 3 = 3. </think>", 0.5),                          # exact: 9 / 2 is 4.5
    (" 7 / 2 = 3.5 and 1.5 + 2 = 3.5 </think>", 0.0),                  # decimals are no statements: none
    (" That reaches 12. 3 * 4 = 12. </think>", 0.5),                   # a claim before any step is false
    (" 2 + 2 = 4. </think> <answer>1 + 1 = 3</answer> 5 + 5 = 11", 1.0),  # only before </think> / <answer>
    (" 2 + 2 = 4. <answer>2 + 2</answer> 5 + 5 = 11", 1.0),
    ("no statements at all", 0.0),
    (None, 0.0),
])
def test_countdown_steps_reward_by_hand(response, expected):
    assert countdown_steps_reward(response) == pytest.approx(expected)


def test_countdown_steps_reward_is_a_share_of_every_statement():
    true_step, false_step = " 2 + 2 = 4.", " 2 + 2 = 5."
    assert countdown_steps_reward(false_step + true_step * 3) == 0.75
    # true filler dilutes false steps but never hides them: every statement is read, however many
    assert countdown_steps_reward(false_step * 40 + true_step * 10) == pytest.approx(0.2)
    assert countdown_steps_reward(true_step * 10_000) == 1.0


def test_countdown_division_tolerance_and_duplicates():
    # 133 / 7 = 19, 74 - 19 = 55
    assert countdown_reward(_ans("74 - (96 + 37) / 7"), 55, [96, 7, 37, 74]) == 1.0
    # 1 / 49 * 49 = 0.9999999999999999 in floats; the reward computes with fractions: exactly 1
    assert (1 / 49) * 49 != 1
    assert countdown_reward(_ans("(1 / 49) * 49"), 1, [1, 49, 49]) == 1.0
    # 5 / (3 - 3) divides by zero: evaluates to nothing -> format score
    assert countdown_reward(_ans("5 / (3 - 3)"), 5, [5, 3, 3]) == 0.1
    # repeated numbers in the task are a multiset: 4*4 + 4/4 = 17
    assert countdown_reward(_ans("(4 * 4) + (4 / 4)"), 17, [4, 4, 4, 4]) == 1.0
    assert countdown_reward(_ans("(4 * 4) + 4 / 4 + 4"), 21, [4, 4, 4, 4]) == 0.1  # five 4s
    # custom scores
    assert countdown_reward(_ans("95 - 37 - 4"), TARGET, NUMS, format_score=0.0, score=2.0) == 0.0
    assert countdown_reward(_ans("95 - 37 + 4"), TARGET, NUMS, format_score=0.0, score=2.0) == 2.0


def test_countdown_decimal_loophole_closed():
    # TinyZero's regex reads "1.5" as the numbers 1 and 5, so 1.5 * 2 = 3 scored 1.0 there; here a '.' is
    # never part of an equation.
    assert countdown_reward(_ans("1.5 * 2"), 3, [1, 5, 2]) == 0.1


HOSTILE_ANSWERS = [
    _ans("95**37**4"),                              # right numbers, '**' would hang eval
    _ans("9**9**9"),
    _ans("__import__('os').system('echo pwned')"),
    _ans("().__class__.__bases__[0].__subclasses__()"),
    _ans("1" * 10000),
    _ans("(" * 1000 + "95 - 37 + 4" + ")" * 1000),  # right numbers, 1000 deep
    _ans("-" * 5000 + "95 - 37 + 4"),
    _ans("95 - 37 + 4 if True else 0"),
    _ans("(lambda: 62)()"),
    _ans("9" * 5000 + " * 95 - 37 + 4"),
    _ans("٩٥ - 37 + 4"),                             # Arabic-Indic digits
    _ans("(95 - 37) + 4\x00"),
    _ans("124 // 2"),
    "<answer>" * 100000,                            # no closing tag at all
    "</answer>" * 50000 + "<answer>",
    "<answer>1</answer>" * 20000,
]


@pytest.mark.parametrize("index", range(len(HOSTILE_ANSWERS)))
def test_countdown_hostile_answers(index):
    start = time.perf_counter()
    value = countdown_reward(HOSTILE_ANSWERS[index], TARGET, NUMS)
    elapsed = time.perf_counter() - start
    assert value <= 0.1
    assert elapsed < 2.0  # a super-linear scan would take minutes here; not a speed target (bench/)


def test_extract_answer():
    assert extract_answer("a <answer> 1 + 2 </answer> b <answer>3</answer>") == "3"
    assert extract_answer("<answer>x<answer>y</answer>") == "y"  # nearest opening tag
    assert extract_answer("no tags") is None
    assert extract_answer(None) is None


# ---------------------------------------------------------------- solver and generator

def test_solver_small_cases():
    assert solve([95, 37, 4], 62) == "(95 - 37) + 4"
    assert solve([5], 5) == "5"
    assert solve([], 0) is None
    # 3, 5, 2 -> 3 is impossible: e.g. 5-2=3 leaves 3 which cannot be absorbed (3*3, 3/3, 3+3, 3-3 != 3)
    assert solve([3, 5, 2], 3) is None
    with pytest.raises(ValueError):
        solution_text([3, 5, 2], 3)
    # 8 / (3 - 8/3) = 8 / (1/3) = 24 needs a fractional intermediate
    equation = solve([3, 3, 8, 8], 24)
    assert equation is not None and countdown_reward(_ans(equation), 24, [3, 3, 8, 8]) == 1.0


def test_solution_text_shows_steps():
    text = solution_text([95, 37, 4], 62)
    assert text.startswith("<think> ") and "</think> <answer>(95 - 37) + 4</answer>" in text
    assert "95 - 37 = 58." in text and "58 + 4 = 62." in text
    assert format_reward(text) == 1.0 and countdown_reward(text, 62, [95, 37, 4]) == 1.0
    continuation = solution_text([95, 37, 4], 62, include_think_open=False)
    assert "<think>" not in continuation and format_reward(continuation) == 1.0


def test_generator_yields_solvable_tasks():
    tasks = generate_tasks(40, seed=3)
    assert tasks == generate_tasks(40, seed=3) and tasks != generate_tasks(40, seed=4)
    assert len(tasks) == 40
    for task in tasks:
        assert type(task["target"]) is int and 1 <= task["target"] <= 1000
        assert 3 <= len(task["nums"]) <= 4 and all(1 <= n <= 100 for n in task["nums"])
        equation = solve(task["nums"], task["target"])
        assert equation is not None
        assert countdown_reward(_ans(equation), task["target"], task["nums"]) == 1.0
        assert countdown_reward(solution_text(task["nums"], task["target"]), task["target"], task["nums"]) == 1.0
    small = generate_tasks(10, seed=0, num_count=3, max_number=10, max_target=50)
    assert all(len(t["nums"]) == 3 and t["target"] <= 50 and max(t["nums"]) <= 10 for t in small)


def test_solver_on_shared_countdown_rows(shared_data):
    rows = load_countdown_jsonl(os.path.join(shared_data, "countdown", "test.jsonl"), limit=50)
    assert len(rows) == 50
    start = time.perf_counter()
    for row in rows:
        equation = solve(row["nums"], row["target"])
        assert equation is not None, row
        assert countdown_reward(_ans(equation), row["target"], row["nums"]) == 1.0
    assert (time.perf_counter() - start) / len(rows) < 2.0  # no exponential search blow-up; not a speed target


# ---------------------------------------------------------------- gsm8k

def test_gsm8k_extraction():
    assert extract_reference("She pays 1,000 + 234 = <<1000+234=1234>>1,234\n#### 1,234") == "1234"
    assert extract_reference("#### $18") == "18"
    assert extract_model_answer("She makes $18.00 every day.") == "18.00"
    assert extract_model_answer("The answer is 42.") == "42"
    assert extract_model_answer("It fell from 5 to -7 degrees.") == "-7"
    assert extract_model_answer("Seasons 2019-2020") == "2020"   # a hyphen between digits is not a minus
    assert extract_model_answer("I got 17 first. <answer> 1,234 </answer> done 99") == "1234"
    assert extract_model_answer("<answer>x = 18 dollars</answer>") == "18"
    assert extract_model_answer("<answer>$-3.5</answer>") == "-3.5"
    assert extract_model_answer("no numbers here") is None
    assert numbers_equal("18", "18.0") and numbers_equal("18.00", "$18") and numbers_equal("1,234", "1234")
    assert not numbers_equal("18", "18.5") and not numbers_equal("abc", "1") and not numbers_equal(None, "1")


def test_gsm8k_reward():
    assert gsm8k_reward("<think> 9 * 2 </think> <answer> 18 </answer>", "18") == 1.0
    assert gsm8k_reward("so she makes $18.00", "18") == 0.0                 # no answer tag
    assert gsm8k_reward("so she makes $18.00", "18", strict=False) == 1.0   # lenient: last number
    assert gsm8k_reward("<answer>17</answer>", "18") == 0.0
    assert gsm8k_reward("<answer>17</answer>", "18", format_score=0.1) == 0.1  # tagged but wrong
    assert gsm8k_reward("17", "18", format_score=0.1) == 0.0                  # untagged and wrong
    assert gsm8k_reward("17", "18", format_score=0.1, strict=False) == 0.0
    assert gsm8k_reward("<answer>70000</answer>", "... profit\n#### 70,000") == 1.0  # full answer field


# ---------------------------------------------------------------- format and length

@pytest.mark.parametrize("response", [
    " 9 * 2 = 18 </think> <answer> 18 </answer>",   # continuation of a prompt ending in <think>
    "<think>a\nb</think>\n<answer>18</answer>\n",
    "</think><answer>x</answer>",                   # an empty think block is form enough
])
def test_format_reward_positive(response):
    assert format_reward(response) == 1.0
    assert format_reward(response, score=0.5) == 0.5


@pytest.mark.parametrize("response", [
    "<answer>18</answer>",                                  # no think block
    "thinking </think>",                                   # no answer
    "x </think> <answer>18</answer> and more text",        # text after the answer
    "x </think> <answer>1</answer><answer>2</answer>",     # two answers
    "x </think> y </think> <answer>1</answer>",            # two think closings
    "<think> a <think> b </think> <answer>1</answer>",     # nested think
    "<answer>1</answer> x </think>",                       # wrong order
    "x </think> <answer>1",                                # unclosed answer
    "</think><answer></answer>",                           # empty answer: no format credit for no answer
])
def test_format_reward_negative(response):
    assert format_reward(response) == 0.0


def test_length_reward():
    assert length_reward("a" * 50, target_chars=100) == 1.0
    assert length_reward("a" * 100, target_chars=100) == 1.0
    assert length_reward("a" * 150, target_chars=100) == 0.5               # 1 - 50/100
    assert length_reward("a" * 300, target_chars=100) == 0.0               # past 2 * target
    assert length_reward("a" * 120, target_chars=100, decay_chars=40) == 0.5  # 1 - 20/40
    assert length_reward("a" * 5, target_chars=100, min_chars=10) == 0.5   # 5 / 10
    assert length_reward("", target_chars=100, min_chars=10) == 0.0
    with pytest.raises(ValueError):
        length_reward("a", target_chars=10, min_chars=20)


# ---------------------------------------------------------------- prompts and loaders

def test_countdown_prompts():
    base = countdown_prompt({"target": 62, "nums": [95, 37, 4]}, style="base")
    assert base.messages is None and base.text.endswith("Assistant: Let me solve this step by step.\n<think>")
    assert base.text.startswith("A conversation between User and Assistant. The user asks a question")
    assert "\nUser: Using the numbers [95, 37, 4], create an equation that equals 62." in base.text
    assert "for example <answer> (1 + 2) / 3 </answer>.\nAssistant:" in base.text
    assert base.render() == base.text
    assert base.meta == {"task": "countdown", "target": 62, "nums": [95, 37, 4]}
    chat = countdown_prompt({"target": 62, "nums": [95, 37, 4]})
    assert chat.text is None and chat.assistant_prefix == "<think>"
    assert [m["role"] for m in chat.messages] == ["system", "user"]
    assert chat.messages[1]["content"].startswith("Using the numbers [95, 37, 4], create an equation that equals 62.")
    with pytest.raises(ValueError):
        countdown_prompt({"target": 62, "nums": [95, 37, 4]}, style="other")


def test_gsm8k_prompts_and_render(tiny_tokenizer):
    base = gsm8k_prompt("How many eggs?", style="base", reference="... \n#### 1,234")
    assert base.text.endswith("<think>") and "User: How many eggs? Show your work" in base.text
    assert base.meta == {"task": "gsm8k", "reference": "1234"}
    chat = gsm8k_prompt("How many eggs?", reference="9")
    assert chat.assistant_prefix == "<think>" and chat.meta["reference"] == "9"
    rendered = chat.render(tiny_tokenizer)
    expected = tiny_tokenizer.apply_chat_template(chat.messages, tokenize=False, add_generation_prompt=True)
    assert rendered == expected + "<think>"
    with pytest.raises(ValueError):
        chat.render()


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_loaders_read_rows(tmp_path):
    path = _write(tmp_path, "cd.jsonl", [json.dumps({"target": 62, "nums": [95, 37, 4]}), "",
                                         json.dumps({"target": 5, "nums": [5]})])
    assert load_countdown_jsonl(path) == [{"target": 62, "nums": [95, 37, 4]}, {"target": 5, "nums": [5]}]
    assert len(load_countdown_jsonl(path, limit=1)) == 1
    path = _write(tmp_path, "g.jsonl", [json.dumps({"question": "Q?", "answer": "2+2=4\n#### 4"})])
    assert load_gsm8k_jsonl(path) == [{"question": "Q?", "answer": "2+2=4\n#### 4", "reference": "4"}]


@pytest.mark.parametrize("loader, rows, line, field", [
    (load_countdown_jsonl, [{"target": 1, "nums": [1]}, {"target": "7", "nums": [1, 2]}], 2, "target"),
    (load_countdown_jsonl, [{"target": 1, "nums": [1]}, {"target": 3, "nums": [1, "2"]}], 2, "nums"),
    (load_countdown_jsonl, [{"target": True, "nums": [1]}], 1, "target"),
    (load_countdown_jsonl, [{"target": 3, "nums": []}], 1, "nums"),
    (load_countdown_jsonl, ["{not json"], 1, "(row)"),
    (load_gsm8k_jsonl, [{"question": "Q", "answer": "no marker"}], 1, "answer"),
    (load_gsm8k_jsonl, [{"question": "Q", "answer": "#### 1"}, {"answer": "#### 2"}], 2, "question"),
    (load_gsm8k_jsonl, [[1, 2]], 1, "(row)"),
])
def test_loader_errors_name_file_line_field(tmp_path, loader, rows, line, field):
    path = _write(tmp_path, "bad.jsonl", [r if isinstance(r, str) else json.dumps(r) for r in rows])
    with pytest.raises(ValueError) as info:
        loader(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: field '{field}': ") and "\n" not in message


def test_gsm8k_loader_on_shared_data(shared_data):
    rows = load_gsm8k_jsonl(os.path.join(shared_data, "gsm8k", "test.jsonl"), limit=20)
    assert len(rows) == 20 and rows[0]["reference"] == "18"  # Janet's ducks: (16 - 3 - 4) * 2
    assert all(numbers_equal(r["reference"], r["reference"] + ".0") for r in rows)


# ---------------------------------------------------------------- registry

def test_parse_reward_specs():
    specs = parse_reward_specs(["countdown", "format=0.1", "model:/ckpt/rm=0.5", "tests.test_rewards:my_fn=2"])
    assert [type(s) for s in specs] == [RuleSpec, RuleSpec, ModelRewardSpec, RuleSpec]
    assert (specs[0].name, specs[0].weight) == ("countdown", 1.0)
    assert (specs[1].name, specs[1].weight) == ("format", 0.1)
    assert specs[2] == ModelRewardSpec(path="/ckpt/rm", weight=0.5)
    assert specs[3].fn is my_fn and specs[3].weight == 2.0
    assert [s.name for s in parse_reward_specs(["gsm8k, length=-0.5"])] == ["gsm8k", "length"]
    rules, models = split_specs(specs)
    assert [r.name for r in rules] == ["countdown", "format", "tests.test_rewards:my_fn"] and len(models) == 1


@pytest.mark.parametrize("values, fragment", [
    (["nosuch"], "unknown reward"),
    (["countdown=abc"], "not a number"),
    (["countdown=inf"], "finite"),
    (["no_such_module_xyz:fn"], "cannot import"),
    (["tests.test_rewards:missing_fn"], "no attribute"),
    (["tests.test_rewards:NOT_CALLABLE"], "not callable"),
    (["model:"], "needs a path"),
    (["=1"], "empty name"),
    ([], "no reward"),
    (["format", "format=2"], "twice"),
])
def test_parse_reward_specs_errors(values, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_reward_specs(values)


def test_rule_rewards_weighted_sum_and_components():
    rewards = RuleRewards(split_specs(parse_reward_specs(["countdown", "format=0.5", "tests.test_rewards:my_fn=0.25"]))[0])
    meta = {"target": 62, "nums": [95, 37, 4]}
    responses = [" ok </think> <answer>(95 - 37) + 4</answer>",  # countdown 1, format 1, my_fn 0
                 "yes <answer>95 - 37</answer>",                  # countdown 0.1, format 0, my_fn 2
                 "nothing"]                                       # all 0
    totals, parts = rewards.evaluate(["p"] * 3, responses, [meta] * 3)
    assert parts == {"countdown": [1.0, 0.1, 0.0], "format": [1.0, 0.0, 0.0],
                     "tests.test_rewards:my_fn": [0.0, 2.0, 0.0]}
    # 1 + 0.5*1 + 0.25*0 = 1.5;  0.1 + 0 + 0.25*2 = 0.6;  0
    assert totals == pytest.approx([1.5, 0.6, 0.0])
    assert rewards(["p"] * 3, responses, [meta] * 3) == pytest.approx([1.5, 0.6, 0.0])
    with pytest.raises(ValueError):
        rewards(["p"], responses, [meta] * 3)
    with pytest.raises(ValueError):
        RuleRewards(parse_reward_specs(["model:/x"]))


def test_rule_rewards_count_errors_instead_of_crashing():
    rewards = RuleRewards([RuleSpec("gsm8k", 1.0, parse_reward_specs(["gsm8k"])[0].fn),
                           RuleSpec("boom", 1.0, _boom)])
    # first meta lacks "reference" -> KeyError in gsm8k; _boom fails on both rows
    totals = rewards(["p", "p"], ["<answer>4</answer>", "<answer>4</answer>"], [{}, {"reference": "4"}])
    assert totals == [0.0, 1.0]
    assert rewards.errors == 3 and rewards.error_counts == {"gsm8k": 1, "boom": 2}


def test_reward_model_plus_synthetic_rule():
    # a reward model beside the synthetic tasks' rule check at weight 2 (as tried in the demo)
    specs = parse_reward_specs(["model:/ckpt/rm", "utils.data.synthetic_check:rule_reward=2"])
    rules, models = split_specs(specs)
    assert models == [ModelRewardSpec("/ckpt/rm", 1.0)] and rules[0].weight == 2.0
    chat = "<|im_start|>user\nWhat is 17 x 14?<|im_end|>\n<|im_start|>assistant\n"
    scores = RuleRewards(rules)([chat, chat, "Tell me a story."], ["17 x 14 = 238.", "17 x 14 = 204.", "Once."],
                                [{}, {}, {}])
    assert scores == [2.0, 0.0, 0.0]  # right, wrong, and a prompt the rule cannot judge (counted as an error)
