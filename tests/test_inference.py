"""inference.common / inference.score / inference.chatbot with tiny random models (CPU, fp32)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from inference.chatbot import fit_history, side_by_side
from inference.chatbot import main as chatbot_main
from inference.common import encode_replies, load_for_inference, model_label, score_items
from inference.score import bootstrap_ci, pairwise_summary
from inference.score import main as score_main
from tests.conftest import REPO
from utils.data.datasets import tokenize_prompt, tokenize_response
from utils.data.templates import format_prompt, response_text
from utils.models import load_tokenizer, load_value_model, sequence_scores

ENV = {**os.environ, "PYTHONPATH": REPO, "COLUMNS": "80", "TOKENIZERS_PARALLELISM": "false"}

ITEMS = [
    ([{"role": "user", "content": "what is the answer"}], "yes it is good"),
    ([{"role": "user", "content": "how"}, {"role": "assistant", "content": "fine"},
      {"role": "user", "content": "why"}], "no"),
    ([{"role": "user", "content": "please help"}], "sorry I cannot help, it is a bad question"),
    ([{"role": "user", "content": "thanks"}], "great"),
    ([{"role": "system", "content": "answer the question"}, {"role": "user", "content": "is it good"}],
     "yes, it is great and good and not bad"),
    ([{"role": "user", "content": "a question of the answer"}], "I"),
]
PAIRS = [  # prompt, chosen, rejected
    ("what is the answer", "yes it is good", "no"),
    ("how are you", "good thanks", "terrible"),
    ("please help", "yes I help", "sorry"),
    ("why is it bad", "it is bad", "it is a great question and an answer"),
    ("thanks", "you", "no thanks"),
    ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what\n\nAssistant:", " the answer", " a question"),
]


def run_module(module, args, stdin=""):
    return subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=120)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_model_dir, tmp_path_factory):
    """The tiny causal LM with a fresh value head (std 1, so scores of different texts are far apart and
    never tie), saved as a reward model dir."""
    out = str(tmp_path_factory.mktemp("tiny_rm"))
    torch.manual_seed(0)
    load_value_model(tiny_model_dir, head_init_std=1.0).save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rm(tiny_rm_dir):
    return load_for_inference(tiny_rm_dir, "value", "fp32", device=torch.device("cpu"))


def direct_score(model, tok, messages, reply):
    """The score built by hand: format_prompt + response_text + EOS, one unpadded row, sequence_scores."""
    text = format_prompt(tok, messages) + response_text(tok, reply)
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # the template writes specials
    ids = torch.tensor([ids])
    with torch.no_grad():
        return sequence_scores(model, ids, torch.ones_like(ids)).item()


# ------------------------------------------------------------------------------------------ common
def test_model_label_is_last_two_path_parts():
    assert model_label("/runs/exp1/step3/actor/") == "step3/actor"
    assert model_label("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert model_label("smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_scores_deterministic_and_equal_to_sequence_scores(rm):
    model, tok = rm
    first, truncated = score_items(model, tok, ITEMS, max_seq_len=512, batch_size=3)
    second, _ = score_items(model, tok, ITEMS, max_seq_len=512, batch_size=3)
    assert first == second and not any(truncated)
    direct = [direct_score(model, tok, m, r) for m, r in ITEMS]
    assert first == pytest.approx(direct, abs=1e-5)
    assert len(set(round(s, 4) for s in first)) == len(ITEMS)  # the head really separates texts
    # the text fed is the chat prompt, the reply, the end-of-turn marker and EOS
    ids = encode_replies(tok, ITEMS[0][0], [ITEMS[0][1]])[0].input_ids
    assert tok.decode(ids) == ("<|im_start|>user\nwhat is the answer<|im_end|>\n<|im_start|>assistant\n"
                               "yes it is good<|im_end|></s>")


def test_batching_and_padding_do_not_change_scores(rm):
    model, tok = rm
    one, _ = score_items(model, tok, ITEMS, batch_size=1)
    four, _ = score_items(model, tok, ITEMS, batch_size=4)   # 6 items: batches of 4 and 2, right-padded
    assert four == pytest.approx(one, abs=1e-5)


def test_truncation_keeps_prompt_end_then_cuts_response(tiny_tokenizer):
    messages = [{"role": "user", "content": "what is the answer " * 6}]
    reply = "yes it is good " * 3
    prompt, response = tokenize_prompt(tiny_tokenizer, messages), tokenize_response(tiny_tokenizer, reply)
    p, r = len(prompt), len(response)
    assert p > 30 and r < 30
    # max_seq_len 40: room beside the full reply is 40 - r, above the floor 40 // 2 = 20 only if r < 20
    enc = encode_replies(tiny_tokenizer, messages, [reply], 40)[0]
    keep_prompt = max(40 - r, 20)
    assert enc.truncated and enc.input_ids == prompt[p - keep_prompt:] + response[:40 - keep_prompt]
    assert len(enc.input_ids) == 40
    # max_seq_len 8: the prompt keeps its floor 8 // 2 = 4 tokens, the reply its first 4 (EOS cut off)
    enc = encode_replies(tiny_tokenizer, messages, [reply], 8)[0]
    assert enc.input_ids == prompt[-4:] + response[:4]
    # enough room: nothing cut
    enc = encode_replies(tiny_tokenizer, messages, [reply], p + r)[0]
    assert not enc.truncated and enc.input_ids == prompt + response


# ------------------------------------------------------------------------------------------ score statistics
def test_pairwise_summary_by_hand():
    # pairs: 1>0 right, 2=2 tie (half), 3>1 right, 0<1 wrong -> accuracy 2.5/4, strict 2/4, ties 1/4
    s = pairwise_summary([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 1.0, 1.0], n_resamples=0)
    assert s["accuracy"] == 0.625 and s["accuracy_strict"] == 0.5 and s["ci95"] is None
    assert s["ties"] == 1 and s["tie_fraction"] == 0.25
    assert s["mean_chosen"] == 1.5        # (1 + 2 + 3 + 0) / 4
    assert s["mean_rejected"] == 1.0      # (0 + 2 + 1 + 1) / 4
    assert s["mean_margin"] == 0.5        # (1 + 0 + 2 - 1) / 4


def test_bootstrap_ci():
    correct = [True] * 70 + [False] * 30
    lo, hi = bootstrap_ci(correct, 1000, seed=7)
    assert (lo, hi) == bootstrap_ci(correct, 1000, seed=7)
    assert lo < 0.7 < hi
    # normal approximation: 0.7 +- 1.96 * sqrt(0.7 * 0.3 / 100) = 0.7 +- 0.090
    assert 0.58 < lo < 0.65 and 0.75 < hi < 0.82
    assert bootstrap_ci([True] * 5, 100, seed=0) == (1.0, 1.0)
    assert bootstrap_ci(correct, 0, seed=0) is None


def test_pairs_accuracy_matches_hand_scores_and_swaps(rm, tiny_rm_dir, tmp_path):
    model, tok = rm
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    file_a = write_jsonl(tmp_path / "a.jsonl", rows)
    file_b = write_jsonl(tmp_path / "b.jsonl", [{**r, "chosen": r["rejected"], "rejected": r["chosen"]}
                                                for r in rows])
    file_4 = write_jsonl(tmp_path / "four.jsonl", rows[:4])
    # scores of the first 4 pairs, computed first, one text at a time
    chosen = [direct_score(model, tok, [{"role": "user", "content": p}], c) for p, c, _ in PAIRS[:4]]
    rejected = [direct_score(model, tok, [{"role": "user", "content": p}], r) for p, _, r in PAIRS[:4]]
    wins = sum(c > r for c, r in zip(chosen, rejected))

    def report(path, *extra):
        out = str(tmp_path / "report.json")
        assert score_main(["--reward_model", tiny_rm_dir, "--pairs", path, "--output", out, "--dtype", "fp32",
                           "--no_progress", "--batch_size", "3", *extra]) == 0
        with open(out) as fh:
            return json.load(fh)

    four = report(file_4, "--bootstrap", "200", "--seed", "5")
    assert four["n_pairs"] == 4 and four["ties"] == 0
    assert four["accuracy"] == wins / 4
    assert four["mean_chosen"] == pytest.approx(sum(chosen) / 4, abs=1e-5)
    assert four["mean_rejected"] == pytest.approx(sum(rejected) / 4, abs=1e-5)
    assert four["mean_margin"] == pytest.approx((sum(chosen) - sum(rejected)) / 4, abs=1e-5)
    assert "left-truncated" in four["truncation"]

    a, b = report(file_a), report(file_b)
    assert a["ties"] == b["ties"] == 0 and a["n_pairs"] == b["n_pairs"] == 6
    assert b["accuracy"] == pytest.approx(1 - a["accuracy"])
    assert b["mean_margin"] == pytest.approx(-a["mean_margin"], abs=1e-5)
    assert a["ci95"][0] <= a["accuracy"] <= a["ci95"][1]
    assert report(file_a)["ci95"] == a["ci95"]                        # same seed, same CI


def test_score_cli_bad_row_names_file_and_line(tiny_rm_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "chosen": "good", "rejected": "bad"},
                                               {"prompt": "how", "chosen": "yes", "rejected": "no"},
                                               {"prompt": "what", "chosen": "it"}])
    proc = run_module("inference.score", ["--reward_model", tiny_rm_dir, "--pairs", bad])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}:3: field 'rejected': missing: an SFT-only row has no "
                                                "pair to compare"]  # prompt + chosen alone is an SFT row (#19)


def test_score_cli_items_jsonl_and_table(rm, tiny_rm_dir, tmp_path, capsys):
    model, tok = rm
    items = write_jsonl(tmp_path / "items.jsonl", [{"prompt": "what is the answer", "response": "yes it is good"},
                                                   {"prompt": [{"role": "user", "content": "thanks"}],
                                                    "response": "great"}])
    out = tmp_path / "scored.jsonl"
    assert score_main(["--reward_model", tiny_rm_dir, "--input", items, "--output", str(out), "--dtype", "fp32"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"] for r in scored] == ["yes it is good", "great"]
    assert scored[0]["score"] == pytest.approx(direct_score(model, tok, ITEMS[0][0], ITEMS[0][1]), abs=1e-5)
    assert score_main(["--reward_model", tiny_rm_dir, "--input", items, "--format", "table", "--dtype", "fp32"]) == 0
    table = capsys.readouterr().out
    assert "what is the answer" in table and f"{scored[1]['score']:.4f}" in table


# ------------------------------------------------------------------------------------------ chatbot
def test_fit_history_drops_oldest_exchanges(tiny_tokenizer):
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
               {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    full, _ = fit_history(tiny_tokenizer, history, "e", None)
    assert [m["content"] for m in full] == ["a", "b", "c", "d", "e"]
    last_two = len(tokenize_prompt(tiny_tokenizer, history[2:] + [{"role": "user", "content": "e"}]))
    kept, ids = fit_history(tiny_tokenizer, history, "e", last_two)   # room for c, d, e but not a, b
    assert [m["content"] for m in kept] == ["c", "d", "e"] and len(ids) == last_two
    kept, ids = fit_history(tiny_tokenizer, [], "what is the answer", 3)  # one long turn: keep its end
    assert len(ids) == 3 and ids == tokenize_prompt(tiny_tokenizer, kept)[-3:]


def test_side_by_side_fits_width():
    text = side_by_side([("run/a", ["the answer is yes " * 5]), ("run/b", ["no", "[reward +1.0000]"])], 40)
    lines = text.splitlines()
    assert all(len(line) <= 40 for line in lines)
    assert lines[0].startswith("run/a") and "| run/b" in lines[0]
    assert "[reward +1.0000]" in text and text.count("answer") == 5


def test_chatbot_missing_model_dir_exits_2(tmp_path, capsys):
    assert chatbot_main(["--model_name_or_path", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope" in err[0]


def test_chatbot_stdin_conversation(tiny_model_dir, tmp_path):
    out = tmp_path / "chat.jsonl"
    stdin = "hello there\nhow are you\nclear\nwhat is it\nquit\nnever asked\n"
    proc = run_module("inference.chatbot", ["--model_name_or_path", tiny_model_dir, "--max_new_tokens", "5",
                                            "--dtype", "fp32", "--output", str(out)], stdin)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Assistant: ") == 3 and "[conversation cleared]" in proc.stdout
    assert "Human: hello there" in proc.stdout and "never asked" not in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["turn"]) for r in rows] == [("hello there", 1), ("how are you", 2), ("what is it", 1)]
    assert all(set(r) == {"prompt", "model", "answer", "turn"} for r in rows)


def test_chatbot_compare_mode(tiny_model_dir, tiny_opt_dir, tiny_rm_dir, rm, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('what is the answer\n\n{"prompt": "how are you"}\n')
    out = tmp_path / "compare.jsonl"
    proc = run_module("inference.chatbot", ["--model_name_or_path", tiny_model_dir, tiny_opt_dir,
                                            "--prompts", str(prompts), "--max_new_tokens", "5", "--dtype", "fp32",
                                            "--reward_model", tiny_rm_dir, "--output", str(out)])
    assert proc.returncode == 0, proc.stderr
    labels = [model_label(tiny_model_dir), model_label(tiny_opt_dir)]
    header = f"{labels[0]:<38} | {labels[1]}"          # COLUMNS=80: two columns of (80 - 3) // 2 = 38
    assert proc.stdout.count(header) == 2                # one header row per prompt
    assert all(len(line) <= 80 for line in proc.stdout.splitlines())
    assert proc.stdout.count("[reward ") == 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["model"]) for r in rows] == [("what is the answer", labels[0]),
                                                         ("what is the answer", labels[1]),
                                                         ("how are you", labels[0]), ("how are you", labels[1])]
    # first turn: the printed score is the reward model's score of (prompt, answer)
    model, tok = rm
    for row in rows[:2]:
        expected = direct_score(model, tok, [{"role": "user", "content": row["prompt"]}], row["answer"])
        assert row["score"] == pytest.approx(expected, abs=1e-5)
