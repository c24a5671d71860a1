"""utils/data/synthetic_check.py: the rule that says whether a reply to a synthetic prompt is right."""
import pytest

from utils.data.rows import PreferenceRow
from utils.data.synthetic import make_synthetic_preferences
from utils.data.synthetic_check import check, expected_answer, is_synthetic, parse_task, rule_reward

# prompt -> (hand-written right replies, hand-written wrong replies), one entry per generator template
CASES = {
    "What is 17 + 25?": (["17 + 25 = 42.", "42", "Sure! The answer is 42.", "17 plus 25 equals 42."],
                         ["17 + 25 = 43.", "It is 42 or 43.", "x = 17 + 25; print(x)", "17 + 25", ""]),
    "What is 10 - 5?": (["10 - 5 = 5.", "The answer is 5."], ["10 - 5", "10 - 5 = 15."]),
    "What is 7 x 8?": (["7 x 8 = 56.", "7 * 8 is 56", "56!"], ["7 x 8 = 54.", "15"]),
    "How many centimeters are in 5 meters?": (["5 meters is 500 centimeters.", "500",
                                               "1 meter is 100 centimeters, so 5 meters is 500 centimeters."],
                                              ["5 meters is 50 centimeters.", "500 or 5000", "5 meters"]),
    "How many meters are in 40 kilometers?": (["40 kilometers is 40,000 meters.", "40000 meters"],
                                              ["40 kilometers is 4000 meters."]),
    "Reverse this list: apple, river, garden.": (["Reversed: garden, river, apple.", "garden, river, apple",
                                                  "apple, river, garden reversed is garden, river, apple."],
                                                 ["Reversed: river, garden, apple.", "garden, river",
                                                  "Reversed: garden, river, apple, tiger."]),
    "Sort these numbers from smallest to largest: 42, 7, 19.": (["Sorted: 7, 19, 42.", "7, 19, 42"],
                                                                ["Sorted: 7, 42, 19.", "7, 19", "7, 19, 42, 50"]),
    "Write 'cookie' in capital letters.": (["COOKIE", "Sure: COOKIE.", "'cookie' in capital letters is COOKIE."],
                                           ['defCOBcookie= "cookie"',  # the garbage the RM liked
                                            'COOKIE = "cookie"', "Cookie", "cookie", "COOKIES", "COOKIE TIGER",
                                            "print('COOKIE')"]),
    "Write 'apple river' in capital letters.": (["APPLE RIVER"], ["APPLE", "RIVER APPLE", "APPLE  river"]),
    "Say hello politely to Maria this morning.": (["Hello Maria, it is very nice to meet you!",
                                                   "Good morning, Maria!"],
                                                  ["Hey Maria, whatever.", "Hello Ahmed!", "Hello Maria and Omar.",
                                                   "Maria."]),
    "What is the capital of France?": (["The capital of France is Paris.", "Paris!"],
                                       ["The capital of France is Rome.", "Paris or Rome.", "France."]),
    "Name the capital of Australia?": (["Canberra."], ["Sydney.", "Vienna."]),
    "How many letters are in the word 'apple'?": (["The word 'apple' has 5 letters.", "5", "It has five letters."],
                                                  ["The word 'apple' has 6 letters.", "5 or 6", "apple"]),
    "What day comes after Monday?": (["It is Tuesday.", "After Monday comes Tuesday."],
                                     ["It is Wednesday.", "Tuesday or Wednesday", "Monday"]),
    "What day is it 3 days after Friday?": (["It is Monday.", "3 days after Friday it is Monday."],
                                            ["It is Sunday.", "Friday"]),
}
# the generator's other bad styles are wrong for every template
BAD_STYLES = ["I can't help with that.", "Do it yourself, I'm busy.", "Ugh, why would you even ask me that?",
              "Well, hmm, let me think about that. I am not sure, maybe, maybe not.",
              "My favourite colour is green, and I think it will rain tomorrow."]


@pytest.mark.parametrize("prompt", sorted(CASES))
def test_hand_written_replies(prompt):
    good, bad = CASES[prompt]
    for reply in good:
        assert check(prompt, reply), f"{prompt!r}: {reply!r} should be right"
    for reply in bad + BAD_STYLES:
        assert not check(prompt, reply), f"{prompt!r}: {reply!r} should be wrong"


def test_every_template_is_covered():
    kinds = {parse_task(p).kind for p in CASES}
    assert kinds == {"arithmetic", "units", "reverse", "sort", "upper", "greeting", "capital", "letters", "day"}


def test_generated_chosen_right_and_rejected_wrong():
    # every chosen reply of the generator states the answer; every rejected style (wrong fact, refusal, rude,
    # ramble, off-topic) is wrong by the rule
    for row in make_synthetic_preferences(1500, seed=7):
        assert check(row, row.chosen), (row.prompt, row.chosen)
        assert not check(row, row.rejected), (row.prompt, row.rejected)


def test_prompt_forms_and_expected_answers():
    chat = "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nWhat is 3 x 4?<|im_end|>\n<|im_start|>assistant\n"
    assert expected_answer(chat) == "12"
    row = PreferenceRow(prompt=({"role": "user", "content": "What is the capital of Peru?"},), chosen="Lima.",
                        rejected="Oslo.", origin="test")
    assert expected_answer(row) == "Lima" and check(row, "Lima.")
    assert expected_answer({"prompt": "Reverse this list: tiger, apple, river."}) == "river, apple, tiger"
    assert expected_answer("Write 'apple river' in capital letters.") == "APPLE RIVER"
    assert not is_synthetic("Tell me a story.") and expected_answer("What is the capital of Mars?") is None
    with pytest.raises(ValueError):
        check("Tell me a story.", "Once upon a time.")


def test_rule_reward_scores_one_for_right_zero_for_wrong():
    chat = "<|im_start|>user\nHow many grams are in 9 kilograms?<|im_end|>\n<|im_start|>assistant\n"
    assert rule_reward(chat, "9 kilograms is 9000 grams.", {}) == 1.0
    assert rule_reward(chat, "9 kilograms is 9 * 1000 = 900 grams.", {}) == 0.0  # the demo's liked wrong answer
    with pytest.raises(ValueError):  # step 3's RuleRewards turns this into a logged 0
        rule_reward("Tell me a story.", "Once upon a time.", {})


def test_arithmetic_probe_pairs_are_unseen_and_graded_right():
    # bench/reward_arithmetic_probe.py: each pair's right answer passes the rule, its near miss fails, and no
    # prompt is one the demo's stages could have trained on
    from bench.reward_arithmetic_probe import probe_pairs
    avoid = {row.prompt[-1]["content"] for row in make_synthetic_preferences(300, seed=1234)}
    pairs = probe_pairs(120, seed=5, avoid=avoid)
    assert len({p["prompt"] for p in pairs}) == 120 and not avoid & {p["prompt"] for p in pairs}
    assert {p["op"] for p in pairs} == {"+", "-", "*"}
    for p in pairs:
        assert check(p["prompt"], p["right"]) and not check(p["prompt"], p["wrong"]), p
