"""The task registry (a toy task added from a test, end to end through config, prompts, rewards and warm start)
and the rule-reward exploits a policy can find, each with its expected score."""
import json
import time
from fractions import Fraction
from types import SimpleNamespace

import pytest

from step3_rlhf.config import RLHFConfig
from step3_rlhf.prompt_data import load_prompts
from step3_rlhf.tasks import TASKS, Task, get_task, register, unregister
from step3_rlhf.tasks.countdown import countdown_reward, load_countdown_jsonl
from step3_rlhf.tasks.format import format_reward, sole_answer
from step3_rlhf.tasks.gsm8k import gsm8k_reward
from step3_rlhf.tasks.prompts import jsonl_rows, r1_prompt
from step3_rlhf.tasks.rewards import RuleRewards, parse_reward_specs, rule_table, split_specs
from step3_rlhf.tasks.safe_arith import UnsafeExpression, safe_eval
from step3_rlhf.warm_start import build_rows
from utils.options import ConfigError, build_parser


# ---------------------------------------------------------------- the registry

def test_builtin_tasks_are_registered():
    assert list(TASKS) == ["countdown", "gsm8k"]
    assert {"countdown", "gsm8k", "format", "length"} <= set(rule_table())
    assert get_task("countdown").rewards.keys() == {"countdown", "countdown_steps"}
    with pytest.raises(ValueError, match="unknown task 'nosuch'"):
        get_task("nosuch")


@pytest.mark.parametrize("task, fragment", [
    (Task(name="countdown", prompt=None, load=None), "already registered"),
    (Task(name="preference", prompt=None, load=None), "reserved"),
    (Task(name="new1", prompt=None, load=None, rewards={"gsm8k": None}), "'gsm8k' is taken"),
    (Task(name="new2", prompt=None, load=None, rewards={"format": None}), "'format' is taken"),
    (Task(name="new3", prompt=None, load=None, rewards={"a:b": None}), "not a plain name"),
])
def test_register_refuses_clashes(task, fragment):
    with pytest.raises(ValueError, match=fragment):
        register(task)
    assert list(TASKS) == ["countdown", "gsm8k"]


# A toy task, defined and registered here only: reward 1 when the answer repeats a number of the prompt.
def _echo_prompt(row, style):
    question = f"Repeat one of these numbers: {row['numbers']}."
    return r1_prompt(question, style, {"task": "echo", "numbers": row["numbers"]})


def _echo_load(path):
    return [{"numbers": row["numbers"]} for _, row in jsonl_rows(path)]


def _echo_reward(prompt, response, meta):
    answer = sole_answer(response)
    return 1.0 if answer in {str(n) for n in meta["numbers"]} else 0.0


ECHO = Task(name="echo", prompt=_echo_prompt, load=_echo_load, rewards={"echo": _echo_reward},
            solution=lambda row: f"<think> I repeat {row['numbers'][0]}. </think> <answer>{row['numbers'][0]}</answer>")


@pytest.fixture
def echo_task(tmp_path):
    register(ECHO)
    path = tmp_path / "echo.jsonl"
    path.write_text("".join(json.dumps({"numbers": [i, i + 10]}) + "\n" for i in range(20)), encoding="utf-8")
    yield str(path)
    unregister("echo")


def _config(argv):
    cfg = RLHFConfig(**vars(build_parser(RLHFConfig).parse_args(argv)))
    cfg.validate()
    return cfg


def test_a_task_registered_from_outside_runs_through_every_path(echo_task, tiny_tokenizer, tiny_model_dir):
    # config: --task echo is a valid choice, and the echo rule needs --task echo
    rl = ["--actor_model_name_or_path", tiny_model_dir, "--algo", "grpo", "--num_generations", "2"]
    assert _config(rl + ["--task", "echo", "--reward", "echo", "format=0.5"]).task == "echo"
    with pytest.raises(ConfigError, match="--reward echo needs --task echo"):
        _config(rl + ["--task", "countdown", "--reward", "echo"])
    # prompts: the loader and the R1 template through prompt_data, an eval part carved from the one file
    cfg = SimpleNamespace(task="echo", data_path=[echo_task], seed=1, prompt_style="base", eval_fraction=0.1,
                          max_prompt_seq_len=512, eval_prompts=8)
    train, evals = load_prompts(cfg, tiny_tokenizer, print)
    assert len(train) + len(evals) == 20 and len(evals) >= 1
    item = train[0]
    assert "User: Repeat one of these numbers: [" in item["prompt"] and item["prompt"].endswith("<think>")
    n = item["meta"]["numbers"][1]
    # rewards: the rule by name through the --reward parser, weighted with a generic rule
    rules = RuleRewards(split_specs(parse_reward_specs(["echo", "format=0.5"]))[0])
    responses = [f" ok </think> <answer>{n}</answer>", f"<answer>{n + 1}</answer>", f"<answer>{n}</answer>" * 2]
    totals, parts = rules.evaluate([item["prompt"]] * 3, responses, [item["meta"]] * 3)
    assert parts == {"echo": [1.0, 0.0, 0.0], "format": [1.0, 0.0, 0.0]} and totals == [1.5, 0.0, 0.0]
    # warm start: the task's own solution text, with the same chat messages step 3 uses
    rows = build_rows("echo", echo_task, n=5)
    assert len(rows) == 5 and rows[0]["prompt"] == _echo_prompt({"numbers": [0, 10]}, "chat").messages
    assert rows[0]["response"].endswith("<answer>0</answer>")
    with pytest.raises(ValueError, match="no generator"):
        build_rows("echo", "generate")
    with pytest.raises(ValueError, match="no task size"):
        build_rows("echo", echo_task, num_count=3)


def test_unregistered_task_is_gone(echo_task):
    unregister("echo")
    with pytest.raises(ValueError, match="unknown reward 'echo'"):
        parse_reward_specs(["echo"])
    with pytest.raises(SystemExit):
        build_parser(RLHFConfig).parse_args(["--task", "echo"])


# ---------------------------------------------------------------- Countdown exploits

def test_countdown_loader_refuses_negative_numbers(tmp_path):
    path = tmp_path / "neg.jsonl"
    path.write_text(json.dumps({"target": 1, "nums": [3, -2]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"neg.jsonl:1: field 'nums': expected a non-empty list of non-negative"):
        load_countdown_jsonl(str(path))


def _ans(equation):
    return f"<think> reasoning </think> <answer>{equation}</answer>"


@pytest.mark.parametrize("response, nums, target, expected", [
    (_ans("(95 - 37) + 4"), [95, 37, 4], 62, 1.0),          # well formed: TinyZero's 1.0
    (_ans("95 - 37 - 4"), [95, 37, 4], 62, 0.1),            # well formed, wrong: TinyZero's 0.1
    # a number must be written exactly as given
    (_ans(".5*2"), [5, 2], 1, 0.1),                         # 1.0 before: ".5" read as the number 5
    (_ans("5.0 * 2"), [5, 0, 2], 10, 0.1),                  # 1.0 before: "5.0" read as 5 and 0
    (_ans("00 + 7"), [0, 7], 7, 0.1),                       # 1.0 before: leading zero
    (_ans("12"), [1, 2], 12, 0.1),                          # digit concatenation
    (_ans("(95 - 3 7) + 4"), [95, 3, 7, 4], 62, 0.1),       # whitespace between digits is not an operator
    (_ans("9\u200b5 - 37 + 4"), [95, 37, 4], 62, 0.1),      # zero-width space
    (_ans("(\uff19\uff15 - 37) + 4"), [95, 37, 4], 62, 0.1),  # fullwidth digits
    (_ans("(95 \u2212 37) + 4"), [95, 37, 4], 62, 0.1),     # unicode minus sign
    (_ans("(95\u00a0- 37) + 4"), [95, 37, 4], 62, 0.1),     # no-break space
    # only binary + - * / on the given numbers
    (_ans("-5 + 6"), [5, 6], 1, 0.1),                       # 1.0 before: unary minus makes a number -5
    (_ans("-(5 - 6)"), [5, 6], 1, 0.1),
    (_ans("+6 - 5"), [5, 6], 1, 0.1),
    (_ans("2 ** 3"), [2, 3], 8, 0.1),
    (_ans("8 // 2"), [8, 2], 4, 0.1),
    (_ans("(95 - 37)(4)"), [95, 37, 4], 62, 0.1),           # implicit product is a call
    (_ans("(95 - 37) + 4 + ()"), [95, 37, 4], 62, 0.1),
    (_ans("5 / 2 * 2"), [5, 2, 2], 5, 1.0),                 # non-integer intermediates are fine (TinyZero)
    (_ans("(1 / 3) * 3"), [1, 3, 3], 1, 1.0),               # exact: 0.333.. * 3 is 1, no float rounding
    (_ans("1 / 100001 + 5"), [1, 100001, 5], 5, 0.1),       # 1.0 before: 5.00000999.. was within 1e-5
    (_ans("((95 - 37)) + (4)"), [95, 37, 4], 62, 1.0),      # redundant parentheses are harmless
    (_ans("(95 - 37)\n+ 4"), [95, 37, 4], 62, 1.0),         # a line break is spacing
    (_ans("\t(95 - 37)" + " " * 5000 + "+ 4"), [95, 37, 4], 62, 1.0),
    # exactly one answer, inside the tags, not blank
    (_ans("") , [95, 37, 4], 62, 0.0),                      # 0.1 before: empty answer
    (_ans("   \n "), [95, 37, 4], 62, 0.0),
    ("(95 - 37) + 4", [95, 37, 4], 62, 0.0),                # no tags
    ("(95 - 37) + 4 " + _ans("95 - 37"), [95, 37, 4], 62, 0.1),   # the right equation outside the tags
    (_ans("95 - 37") + " (95 - 37) + 4", [95, 37, 4], 62, 0.1),
    (_ans("95 - 37 - 4") + _ans("(95 - 37) + 4"), [95, 37, 4], 62, 0.1),  # 1.0 before: the last one counted
    ("<think> I will write <answer> here </think>" + _ans("(95 - 37) + 4"), [95, 37, 4], 62, 0.1),
    ("<answer><answer>(95 - 37) + 4</answer>", [95, 37, 4], 62, 0.1),
])
def test_countdown_exploits(response, nums, target, expected):
    assert countdown_reward(response, target, nums) == expected


@pytest.mark.parametrize("response", [
    "<think>" + "step " * 200_000 + "</think>" + _ans("(95 - 37) + 4"),     # 1 MB of thinking
    _ans("+".join(["95"] * 100_000)),                                       # a 300 kB expression
    _ans("9" * 500_000),                                                    # one huge number
    _ans("(" * 100_000 + "95 - 37 + 4" + ")" * 100_000),
    "<answer>" * 200_000 + "(95 - 37) + 4</answer>",
    "x" * 1_000_000,
], ids=["long-think", "long-expression", "huge-number", "deep-parens", "many-open-tags", "no-tags"])
def test_countdown_huge_responses_are_bounded(response):
    start = time.perf_counter()
    countdown_reward(response, 62, [95, 37, 4])
    format_reward(response)
    gsm8k_reward(response, "62")
    assert time.perf_counter() - start < 5.0  # linear scans only (0.2 s per MB when idle); a blow-up takes minutes


def test_safe_eval_caps_and_switches():
    assert safe_eval("-5 + 6") == 1.0
    assert safe_eval("(1 / 49) * 49") != 1 and safe_eval("(1 / 49) * 49", exact=True) == 1
    assert safe_eval("7 / 2", exact=True) == Fraction(7, 2) and safe_eval("0.5", exact=True) == Fraction(1, 2)
    for expr in ("-5 + 6", "+6 - 5", "5 * -1"):
        with pytest.raises(UnsafeExpression, match="unary"):
            safe_eval(expr, allow_unary=False)
    assert safe_eval("5 - 6", allow_unary=False) == -1.0
    start = time.perf_counter()
    for expr in ("1" * 1_000_000, "1+" * 500_000 + "1", "(" * 500_000):
        with pytest.raises(UnsafeExpression, match="longer than 200"):  # refused before parsing
            safe_eval(expr)
    assert time.perf_counter() - start < 5.0  # bounded work, not a speed target


# ---------------------------------------------------------------- GSM8K exploits

@pytest.mark.parametrize("response, expected", [
    ("<think> 9 * 2 </think> <answer>18</answer>", 1.0),
    ("<answer>$18.00</answer>", 1.0),
    ("<answer>x = 18 dollars</answer>", 1.0),              # words around one number are fine
    ("<answer>17</answer>", 0.1),                          # wrong: format score
    ("<answer>17 or 18</answer>", 0.1),                    # 1.0 before: hedging, the last number counted
    ("<answer>20 - 2 = 18</answer>", 0.1),                 # 1.0 before: work, not a single number
    ("<answer>17</answer><answer>18</answer>", 0.1),       # 1.0 before: several answers
    ("<think> <answer>17</answer> </think> <answer>18</answer>", 0.1),
    ("<answer>\uff11\uff18</answer>", 0.1),                # fullwidth digits are not a number here
    ("The answer is 18.", 0.0),                            # 1.0 before: no answer tag
    ("<answer>17</answer> no wait, 18", 0.1),              # the number after the answer does not count
    ("<answer></answer> 18", 0.0),                         # blank answer
    ("<answer>  </answer>", 0.0),
])
def test_gsm8k_exploits(response, expected):
    assert gsm8k_reward(response, "18", format_score=0.1) == expected


# ---------------------------------------------------------------- format exploits

@pytest.mark.parametrize("response, expected", [
    ("<think> a </think> <answer>18</answer>", 1.0),
    ("<think> a </think> <think> b </think> <answer>18</answer>", 0.0),   # several think blocks
    ("<think> a </think> b </think> <answer>18</answer>", 0.0),
    ("<think> a <answer>17</answer> </think> <answer>18</answer>", 0.0),  # an answer inside the think block
    ("<think> a </think> <answer>18 </think></answer>", 0.0),             # a think tag inside the answer
    ("<think> a </think> <answer></answer>", 0.0),                        # 1.0 before: empty answer
    ("<think> a </think> <answer> \n </answer>", 0.0),
    ("<think> a </think> <answer>18</answer><answer>19</answer>", 0.0),
    ("<think> a </think> <answer>18</answer> 19", 0.0),                   # text after the answer
])
def test_format_exploits(response, expected):
    assert format_reward(response) == expected
