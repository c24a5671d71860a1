"""Tests of utils/data: readers for every layout, validation, splits, templates, tokenised datasets,
collators, the tokenisation cache, the validate CLI and the synthetic generator.

Expected values are written out by hand (token counts in the comments use the tiny char/word
tokenizer of tests/tiny.py: every printable char is a token, plus words like "yes", "the", "Human").
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.tiny import build_tiny_tokenizer
from utils.data.cache import cache_key_parts, cached_tokenize
from utils.data.datasets import (IGNORE_INDEX, PairDataset, PromptDataset, SFTDataset, collate_left_padded_prompts,
                                 collate_pairs, collate_right_padded, fit_lengths)
from utils.data.readers import read_rows, read_source
from utils.data.rows import DataError, PreferenceRow, parse_hh_text
from utils.data.splits import load_stage_rows, split_indices
from utils.data.synthetic import make_synthetic_preferences
from utils.data.templates import format_prompt, render_hh_text, response_text
from utils.data.validate import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return str(path)


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), str(path))
    return str(path)


def row(prompt, chosen, rejected="bad"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# ----------------------------------------------------------------------------- local layouts
def test_plain_jsonl_and_json_list(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [row("What is 2+2?", " 4 ", "5"), row("Hi", "Hello!", "Go away.")])
    rows = read_rows(path).rows
    assert rows[0] == PreferenceRow((U("What is 2+2?"),), "4", "5", f"{path}:1")  # replies stripped
    assert rows[1].origin == f"{path}:2"
    listed = tmp_path / "b.json"
    listed.write_text(json.dumps([row("q1", "a1"), row("q2", "a2")], indent=2))
    rows = read_rows(str(listed)).rows
    assert [r.origin for r in rows] == [f"{listed}:1", f"{listed}:2"]  # 1-based item index
    assert [r.chosen for r in rows] == ["a1", "a2"]


def test_hh_text_inline_messages_and_response_only(tmp_path):
    hh = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    path = write_jsonl(tmp_path / "x.jsonl", [
        row(hh, " Fine, thanks."),
        row(" Human: Please tell me a joke. Assistant:", " Why not?"),     # DeepSpeed-Chat one-line form
        row([{"role": "system", "content": "Be brief."}, U("Name a colour.")], "Blue."),
        {"prompt": "Say hi.", "response": " Hi! "},                     # SFT-only
    ])
    rows = read_rows(path).rows
    assert rows[0].prompt == (U("Hi"), A("Hello!"), U("How are you?")) and rows[0].chosen == "Fine, thanks."
    assert rows[1].prompt == (U("Please tell me a joke."),)
    assert rows[2].prompt == ({"role": "system", "content": "Be brief."}, U("Name a colour."))
    assert (rows[3].chosen, rows[3].rejected) == ("Hi!", None)


def test_parse_hh_text_merges_repeated_turns():
    text = "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d\n\nAssistant:"
    assert parse_hh_text(text) == [U("a"), A("b\n\nc"), U("d")]


def test_local_jsonfile_layout_and_split_dir(tmp_path, monkeypatch):
    # upstream's data/train.json is read with load_dataset("json"), so JSON Lines content is allowed
    write_jsonl(tmp_path / "data" / "train.json", [row(f"q{i}", f"a{i}") for i in range(3)])
    (tmp_path / "data" / "eval.json").write_text(json.dumps([row("qe", "ae")]))
    monkeypatch.chdir(tmp_path)
    source = read_source("local/jsonfile")
    assert [r.chosen for r in source.train.rows] == ["a0", "a1", "a2"]
    assert [r.chosen for r in source.eval.rows] == ["ae"]
    other = tmp_path / "mine"
    write_jsonl(other / "train.jsonl", [row("q", "a")])
    source = read_source(str(other))
    assert len(source.train.rows) == 1 and source.eval is None


def test_sharegpt_preferences(tmp_path):
    items = [
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"}],
         "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "What?"}},
        {"conversations": [{"from": "human", "value": "1+1?"}, {"from": "gpt", "value": "2"},
                           {"from": "human", "value": "and 2+2?"}],
         "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}},
    ]
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps(items))
    rows = read_rows(str(path)).rows
    assert rows[0].prompt == ({"role": "system", "content": "Be kind."}, U("Hi"))
    assert (rows[0].chosen, rows[0].rejected) == ("Hello!", "What?")
    assert rows[1].prompt == (U("1+1?"), A("2"), U("and 2+2?"))


# ----------------------------------------------------------------------------- Hub layouts (local copies)
HH2 = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell me a fact."
HUB_CASES = {
    "Dahoas/rm-static": (
        {"data/train-00000-of-00001.parquet": [
            {"prompt": HH2 + "\n\nAssistant:", "response": " Water is wet.", "chosen": " Water is wet.",
             "rejected": " No."}],
         "data/test-00000-of-00001.parquet": [
             {"prompt": "\n\nHuman: Q\n\nAssistant:", "response": " A", "chosen": " A", "rejected": " B"}]},
        [((U("Hi"), A("Hello."), U("Tell me a fact.")), "Water is wet.", "No.")], [((U("Q"),), "A", "B")]),
    "Dahoas/full-hh-rlhf": (
        {"train.jsonl": [{"prompt": "\n\nHuman: Q1\n\nAssistant:", "response": " A1", "chosen": " A1",
                          "rejected": " B1"}],
         "test.jsonl": [{"prompt": "\n\nHuman: Q2\n\nAssistant:", "response": " A2", "chosen": " A2",
                         "rejected": " B2"}]},
        [((U("Q1"),), "A1", "B1")], [((U("Q2"),), "A2", "B2")]),
    "Dahoas/synthetic-instruct-gptj-pairwise": (  # train split only: eval is carved later
        {"data/train-00000-of-00001.parquet": [{"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Car."},
                                               {"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Dog."}]},
        [((U("Name a fruit."),), "Apple.", "Car."), ((U("Name a colour."),), "Red.", "Dog.")], None),
    "yitingxie/rlhf-reward-datasets": (  # prompt lacks the final "Assistant:"; replies carry it
        {"data/train.parquet": [{"prompt": "\n\nHuman: Q\n\n", "chosen": " Assistant: Good.",
                                 "rejected": "Assistant: Bad."}],
         "data/test.parquet": [{"prompt": HH2 + "\n\n", "chosen": " Assistant: Sure.", "rejected": " Assistant: No."}]},
        [((U("Q"),), "Good.", "Bad.")], [((U("Hi"), A("Hello."), U("Tell me a fact.")), "Sure.", "No.")]),
    "Anthropic/hh-rlhf": (  # full transcripts only; the reply follows the LAST Assistant turn
        {"harmless-base/train.jsonl": [{"chosen": HH2 + "\n\nAssistant: Fish swim.",
                                        "rejected": HH2 + "\n\nAssistant: Go away."}],
         "harmless-base/test.jsonl": [{"chosen": "\n\nHuman: Q\n\nAssistant: A",
                                       "rejected": "\n\nHuman: Q\n\nAssistant: B"}]},
        [((U("Hi"), A("Hello."), U("Tell me a fact.")), "Fish swim.", "Go away.")], [((U("Q"),), "A", "B")]),
    "openai/webgpt_comparisons": (  # ties dropped; citations stripped; the higher score wins
        {"train.jsonl": [
            {"question": {"full_text": "Why is the sky blue?"}, "answer_0": "Rayleigh scattering [1].",
             "answer_1": "Because.", "score_0": 1.0, "score_1": -1.0},
            {"question": {"full_text": "Tie?"}, "answer_0": "x", "answer_1": "y", "score_0": 0.0, "score_1": 0.0},
            {"question": {"full_text": "Best?"}, "answer_0": "Meh.", "answer_1": "Great [2, 3] answer.",
             "score_0": -0.5, "score_1": 0.5}]},
        [((U("Why is the sky blue?"),), "Rayleigh scattering.", "Because."),
         ((U("Best?"),), "Great answer.", "Meh.")], None),
    "stanfordnlp/SHP": (  # labels 1 = A preferred; eval is the validation split
        {"askscience/train.json": [{"history": "Why?", "human_ref_A": "Because A.", "human_ref_B": "B.",
                                    "labels": 1},
                                   {"history": "How?", "human_ref_A": "A.", "human_ref_B": "Like B.", "labels": 0}],
         "askscience/validation.json": [{"history": "V?", "human_ref_A": "x", "human_ref_B": "y", "labels": 0}]},
        [((U("Why?"),), "Because A.", "B."), ((U("How?"),), "Like B.", "A.")], [((U("V?"),), "y", "x")]),
}


@pytest.mark.parametrize("name", sorted(HUB_CASES))
def test_hub_set_local_copy(tmp_path, name):
    files, want_train, want_eval = HUB_CASES[name]
    root = tmp_path / "hub" / name
    for rel, records in files.items():
        (write_parquet if rel.endswith(".parquet") else write_jsonl)(root / rel, records)
    source = read_source(str(root))
    assert [(r.prompt, r.chosen, r.rejected) for r in source.train.rows] == want_train
    if want_eval is None:
        assert source.eval is None
    else:
        assert [(r.prompt, r.chosen, r.rejected) for r in source.eval.rows] == want_eval


def test_save_to_disk_copy(tmp_path):
    import datasets
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([row("\n\nHuman: Q\n\nAssistant:", " A", " B")]),
                               "test": datasets.Dataset.from_list([row("\n\nHuman: R\n\nAssistant:", " C", " D")])})
    root = tmp_path / "Dahoas" / "rm-static"
    dd.save_to_disk(str(root))
    source = read_source(str(root))
    assert source.train.rows[0].origin == f"{root}[train]:1" and source.eval.rows[0].chosen == "C"


def test_offline_hub_name_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        read_source("Dahoas/rm-static")
    assert str(err.value) == ("cannot load Hub dataset 'Dahoas/rm-static': no network (offline). Download it "
                              "elsewhere and pass the local directory, e.g. --data_path /data/Dahoas/rm-static")


def test_unknown_name_lists_supported():
    with pytest.raises(DataError) as err:
        read_source("nobody/such-set")
    message = str(err.value)
    assert "'nobody/such-set'" in message and "Dahoas/rm-static" in message and "local/jsonfile" in message
    assert "\n" not in message


# ----------------------------------------------------------------------------- bad rows
GOOD = b'{"prompt": "q", "chosen": "yes", "rejected": "no"}'
BAD_ROWS = [  # (second line of the file, field named, words in the problem, kind)
    (b'{"prompt": "q", "chosen": ', "(row)", "invalid JSON", "bad_json"),
    (b'{"prompt": "q2", "rejected": "a"}', "chosen", "missing", "missing_field"),
    (b'{"prompt": "q2", "chosen": "a", "rejected": null}', "rejected", "null (expected a string)", "null_field"),
    (b'{"prompt": "q2", "chosen": 5, "rejected": "b"}', "chosen", "expected a string, got int", "not_string"),
    (b'{"prompt": "q2", "chosen": "   ", "rejected": "b"}', "chosen", "empty reply", "empty"),
    (b'{"prompt": "q2", "chosen": "same", "rejected": " same "}', "rejected", "identical to chosen", "same_reply"),
    (b'{"prompt": "q2", "chosen": "caf\xe9", "rejected": "b"}', "chosen", "not valid UTF-8", "not_utf8"),
    (GOOD, "(row)", "exact duplicate of", "duplicate"),
]


@pytest.mark.parametrize("line, field, words, kind", BAD_ROWS, ids=[b[3] for b in BAD_ROWS])
def test_bad_rows_error_and_skip(tmp_path, line, field, words, kind):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD + b"\n" + line + b"\n")
    with pytest.raises(DataError) as err:
        read_rows(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}:2: field '{field}': ") and words in message and "\n" not in message
    assert err.value.kind == kind
    report = read_rows(str(path), on_bad_rows="skip")
    assert [r.chosen for r in report.rows] == ["yes"] and report.skipped == [message] and report.kinds == [kind]


def test_bad_item_in_json_list_names_item(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([row("q", "a"), {"chosen": "a", "rejected": "b"}]))
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'prompt': missing")):
        read_rows(str(path))


def test_other_bad_shapes(tmp_path):
    listed = tmp_path / "l.json"  # non-UTF-8 inside a JSON list: named by item index and field
    listed.write_bytes(b'[' + GOOD + b', {"prompt": "q2", "chosen": "caf\xe9", "rejected": "b"}]')
    with pytest.raises(DataError, match=re.escape(f"{listed}:2: field 'chosen': not valid UTF-8")):
        read_rows(str(listed))
    obj = tmp_path / "o.json"  # one pretty-printed object is one clear error, not one per line
    obj.write_text(json.dumps({"rows": [row("q", "a")]}, indent=2))
    with pytest.raises(DataError, match=re.escape(f"{obj}:1: field '(file)': one JSON object (keys: rows)")):
        read_rows(str(obj), on_bad_rows="skip")
    shapes = write_jsonl(tmp_path / "s.jsonl", [
        [1, 2],                                                                  # not an object
        {"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"},
        {"prompt": [U("q"), A("a")], "chosen": "c", "rejected": "d"},            # ends with assistant
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},  # SFT
    ])
    report = read_rows(shapes, on_bad_rows="skip")
    assert report.skipped == [f"{shapes}:1: field '(row)': expected a JSON object, got list",
                              f"{shapes}:2: field 'prompt[0].role': unknown role 'robot' (use system, user, assistant)",
                              f"{shapes}:3: field 'prompt': must end with a user turn, ends with assistant"]
    assert [(r.prompt, r.chosen, r.rejected) for r in report.rows] == [((U("hi"),), "hello", None)]
    with pytest.raises(ValueError, match="on_bad_rows"):
        read_rows(shapes, on_bad_rows="ignore")


# ----------------------------------------------------------------------------- validate CLI
def run_validate(*args):
    proc = subprocess.run([sys.executable, "-m", "utils.data.validate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout.strip().splitlines()


def test_validate_cli_exit_codes_and_every_problem(tmp_path):
    clean = write_jsonl(tmp_path / "clean.jsonl", [row("q1", "a1"), row("q2", "a2")])
    assert run_validate(clean) == (0, ["2 rows, 0 problems"])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join([GOOD, b'{"prompt": ', b'{"prompt": "q2", "chosen": "", "rejected": "b"}',
                                b'{"chosen": "x", "rejected": "y"}', json.dumps(row("x" * 30, "a")).encode()]) + b"\n")
    code, lines = run_validate(str(bad), "--max_chars", "50")
    assert code == 1
    assert lines[0].startswith(f"{bad}:2: field '(row)': invalid JSON")
    assert lines[1] == f"{bad}:3: field 'chosen': empty reply"
    assert lines[2] == f"{bad}:4: field 'prompt': missing"
    # rendered prompt "\n\nHuman: " (9) + 30 x + "\n\nAssistant:" (12) = 51 characters > 50
    assert lines[3] == f"{bad}:5: field 'prompt': too long: 51 characters (limit 50)"
    assert lines[4] == "5 rows, 4 problems (bad_json: 1, empty: 1, missing_field: 1, too_long: 1)"
    code, lines = run_validate(str(tmp_path / "missing.jsonl"))
    assert code == 2 and lines[0] == f"{tmp_path / 'missing.jsonl'}: no such file or directory"


def test_validate_token_limit(tmp_path, tiny_tokenizer, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", [row("hi there", "ok")])
    # <|im_start|> user \n h i ' ' the r e <|im_end|> \n <|im_start|> assistant \n = 14 tokens
    assert validate([path], tokenizer=tiny_tokenizer, max_seq_len=15) == 0
    assert validate([path], tokenizer=tiny_tokenizer, max_seq_len=14) == 1
    assert "field 'prompt': too long: 14 tokens" in capsys.readouterr().out


# ----------------------------------------------------------------------------- splits
def test_split_indices_disjoint_complete_deterministic():
    parts = [split_indices(10, "2,4,4", stage, seed=1234) for stage in range(3)]
    assert [len(p) for p in parts] == [2, 4, 4]  # bounds [0, 2, 6, 10]
    assert sorted(parts[0] + parts[1] + parts[2]) == list(range(10))
    assert split_indices(10, "2,4,4", 1, seed=1234) == parts[1]
    assert split_indices(10, "2,4,4", 1, seed=99) != parts[1]
    # upstream DeepSpeed-Chat: np.random.RandomState(seed).shuffle(arange(n, dtype=uint32)), slice by bounds
    upstream = np.arange(10, dtype=np.uint32)
    np.random.RandomState(seed=1234).shuffle(upstream)
    assert parts[1] == upstream[2:6].tolist()
    assert sorted(split_indices(10, "10,0,0", 0)) == list(range(10))
    with pytest.raises(DataError, match="stage 1 \\(reward\\) no data"):
        split_indices(10, "10,0,0", 1)


def test_load_stage_rows_blends_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [row(f"a{i}", f"x{i}") for i in range(10)])
    b = tmp_path / "b"
    write_jsonl(b / "train.jsonl", [row(f"b{i}", f"y{i}") for i in range(5)])
    write_jsonl(b / "eval.jsonl", [row(f"be{i}", f"z{i}") for i in range(2)])
    stages = [load_stage_rows([a, str(b)], "2,4,4", stage, seed=7) for stage in range(3)]
    # a: 10 rows, no eval split -> 1 carved (round(10 * 0.1)), 9 left: bounds [0, 1, 5, 9] -> 1, 4, 4
    # b: own eval (2 rows); 5 train rows: bounds [0, 1, 3, 5] -> 1, 2, 2
    assert [len(train) for train, _, _ in stages] == [1 + 1, 4 + 2, 4 + 2]
    for train, evals, skipped in stages:
        assert len(evals) == 1 + 2 and skipped == []
        assert train[0].origin.startswith(a) and train[-1].origin.startswith(str(b))  # concatenated in order
    all_train = [r.origin for train, _, _ in stages for r in train]
    eval_origins = {r.origin for r in stages[0][1]}
    # every pool row is trained on by exactly one stage (a: 9, b: 5), never an eval row
    assert len(all_train) == len(set(all_train)) == 9 + 5 and not eval_origins & set(all_train)


# ----------------------------------------------------------------------------- templates
def test_hh_rendering_reproduces_dahoas_text():
    text = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    assert render_hh_text(parse_hh_text(text)) == text
    assert format_prompt(None, parse_hh_text(text)) + response_text(None, "Fine.") == text + " Fine."


def test_chat_template_rendering(tiny_tokenizer):
    assert format_prompt(tiny_tokenizer, [U("hi")]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert response_text(tiny_tokenizer, "yes") == "yes<|im_end|>"


# ----------------------------------------------------------------------------- tokenised datasets
def ids(tok, *tokens):
    return tok.convert_tokens_to_ids(list(tokens))


def test_sft_labels_mask_exactly_the_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    ds = SFTDataset([PreferenceRow((U("hi"),), "yes", "no", "t:1")], tok, max_seq_len=64)
    prompt = ids(tok, "<|im_start|>", "user", "\n", "h", "i", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n")
    reply = ids(tok, "yes", "<|im_end|>", "</s>")  # reply + end-of-turn + EOS
    assert ds[0]["input_ids"] == prompt + reply
    assert ds[0]["labels"] == [IGNORE_INDEX] * 10 + reply
    assert ds[0]["input_ids"][-1] == tok.eos_token_id
    full = SFTDataset([PreferenceRow((U("hi"),), "yes", "no", "t:1")], tok, 64, train_on_prompt=True)
    assert full[0]["labels"] == prompt + reply


def test_sft_without_chat_template(tmp_path):
    tok = build_tiny_tokenizer(str(tmp_path), chat_template=False)
    ds = SFTDataset([PreferenceRow((U("hi"),), "yes", None, "t:1")], tok, max_seq_len=64)
    prompt = ids(tok, "\n", "\n", "Human", ":", " ", "h", "i", "\n", "\n", "Assistant", ":")
    reply = ids(tok, " ", "yes", "</s>")
    assert ds[0]["input_ids"] == prompt + reply and ds[0]["labels"] == [IGNORE_INDEX] * 11 + reply


def test_truncation_rule(tmp_path):
    # fit_lengths(prompt, [responses], max): prompt keeps max - longest reply, but >= min(max // 2)
    assert fit_lengths(11, [3], 8) == (5, [3])   # 8 - 3 = 5 >= floor 4
    assert fit_lengths(11, [8], 8) == (4, [4])   # floor 4 wins; reply cut to 8 - 4
    assert fit_lengths(3, [20], 8) == (3, [5])   # short prompt kept whole
    assert fit_lengths(11, [8], 8, min_prompt_len=8) == (8, [0])
    tok = build_tiny_tokenizer(str(tmp_path), chat_template=False)
    prompt = ids(tok, "\n", "\n", "Human", ":", " ", "h", "i", "\n", "\n", "Assistant", ":")  # 11 tokens
    r = PreferenceRow((U("hi"),), "yes", "no", "t:7")
    # reply " yes</s>" = 3 tokens -> prompt keeps its last 5 tokens
    assert SFTDataset([r], tok, 8)[0]["input_ids"] == prompt[-5:] + ids(tok, " ", "yes", "</s>")
    # reply " yes yes yes yes</s>" = 9 tokens -> prompt keeps 4, reply cut to its first 4 (EOS lost)
    long = PreferenceRow((U("hi"),), "yes yes yes yes", "no", "t:8")
    assert SFTDataset([long], tok, 8)[0]["input_ids"] == prompt[-4:] + ids(tok, " ", "yes", " ", "yes")
    skipped = SFTDataset([r], tok, 8, min_prompt_len=8)
    assert len(skipped) == 0 and skipped.skipped == ["t:7: no room for the response in 8 tokens"]
    pairs = PairDataset([PreferenceRow((U("hi"),), "yes", "no no no", "t:9")], tok, 16)
    # longest reply " no no no</s>" = 7 tokens -> both share the prompt's last max(16 - 7, 16 // 2) = 9 tokens
    assert pairs[0]["chosen_input_ids"] == prompt[-9:] + ids(tok, " ", "yes", "</s>")
    assert pairs[0]["rejected_input_ids"] == prompt[-9:] + ids(tok, " ", "no", " ", "no", " ", "no", "</s>")
    assert pairs[0]["prompt_len"] == 9
    with pytest.raises(DataError, match="t:10: field 'rejected'"):
        PairDataset([PreferenceRow((U("hi"),), "yes", None, "t:10")], tok, 12)
    prompts = PromptDataset([r], tok, 3)
    assert prompts[0]["prompt_input_ids"] == prompt[-3:] and prompts.prompts == [format_prompt(tok, r.prompt)]


def test_collators_pad_from_lengths():
    pad = 2  # deliberately equal to a real token (think pad == eos)
    sft = collate_right_padded([{"input_ids": [5, 6, 2], "labels": [-100, 6, 2]},
                                {"input_ids": [2], "labels": [2]}], pad)
    assert sft["input_ids"].tolist() == [[5, 6, 2], [2, 2, 2]]
    assert sft["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert sft["labels"].tolist() == [[-100, 6, 2], [2, -100, -100]]
    pairs = collate_pairs([{"chosen_input_ids": [1, 2], "rejected_input_ids": [4, 5, 6]},
                           {"chosen_input_ids": [3], "rejected_input_ids": [7]}], 0)
    assert pairs["input_ids"].tolist() == [[1, 2, 0], [3, 0, 0], [4, 5, 6], [7, 0, 0]]  # chosen first
    assert pairs["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    left = collate_left_padded_prompts([{"prompt_input_ids": [1, 2, 3]}, {"prompt_input_ids": [2]}], pad)
    assert left["input_ids"].tolist() == [[1, 2, 3], [2, 2, 2]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["input_ids"].dtype == torch.long


# ----------------------------------------------------------------------------- cache
def test_cache_hit_and_miss(tmp_path, tiny_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [row("hi", "yes"), row("hello", "no")])
    rows = read_rows(data).rows
    calls = []

    def build(max_len):
        calls.append(max_len)
        return SFTDataset(rows, tiny_tokenizer, max_len).columns()

    cache = str(tmp_path / "cache")
    key = cache_key_parts([data], "10,0,0", 0, 1234, tiny_tokenizer, 64)
    first = cached_tokenize(key, lambda: build(64), cache)
    second = cached_tokenize(key, lambda: build(64), cache)
    assert calls == [64] and second == first
    restored = SFTDataset.from_columns(second)
    assert restored[1] == SFTDataset(rows, tiny_tokenizer, 64)[1]
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".npz")  # no temp files left behind
    np.load(os.path.join(cache, files[0]), allow_pickle=False).close()  # loadable without pickle
    cached_tokenize(cache_key_parts([data], "10,0,0", 0, 1234, tiny_tokenizer, 32), lambda: build(32), cache)
    assert calls == [64, 32]
    os.utime(data, ns=(1, 1))  # data file changed -> new key
    assert cache_key_parts([data], "10,0,0", 0, 1234, tiny_tokenizer, 64) != key


# ----------------------------------------------------------------------------- real data
def test_real_preference_files(shared_data):
    hh = os.path.join(shared_data, "preference", "hh_harmless_base_1500.jsonl")
    report = read_rows(hh, on_bad_rows="skip")
    # 1500 lines; lines 663 and 1002 have chosen == " " (empty after stripping)
    assert len(report.rows) + len(report.skipped) == 1500 and len(report.rows) == 1498
    assert report.skipped == [f"{hh}:663: field 'chosen': empty reply", f"{hh}:1002: field 'chosen': empty reply"]
    assert report.rows[1].prompt == (U("My wife loves to cook."),)
    assert report.rows[1].chosen == "Great, what can I help you with today?"
    with pytest.raises(DataError, match=re.escape(f"{hh}:663: field 'chosen'")):
        read_rows(hh)
    demo = os.path.join(shared_data, "preference", "llamafactory_dpo_en_demo.json")
    report = read_rows(demo, on_bad_rows="skip")
    # 300 items, 5 of which repeat an earlier item exactly
    assert len(report.rows) + len(report.skipped) == 300 and report.kinds == ["duplicate"] * 5
    assert report.skipped[0] == f"{demo}:158: field '(row)': exact duplicate of {demo}:14"
    assert all(r.prompt[-1]["role"] == "user" for r in report.rows)


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_unique_and_correct(tmp_path):
    rows = make_synthetic_preferences(500, seed=3)
    assert rows == make_synthetic_preferences(500, seed=3)
    assert rows != make_synthetic_preferences(500, seed=4)
    assert len({r.prompt[0]["content"] for r in rows}) == 500
    assert all(r.chosen != r.rejected for r in rows)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
    checked = 0
    for r in rows:
        m = re.fullmatch(r"What is (\d+) ([+\-x]) (\d+)\?", r.prompt[0]["content"])
        if m:
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            assert r.chosen == f"{a} {op} {b} = {ops[op](a, b)}."
            checked += 1
    assert checked > 20
    out = tmp_path / "syn.jsonl"
    subprocess.run([sys.executable, "-m", "utils.data.synthetic", "--out", str(out), "--n", "50", "--seed", "3"],
                   cwd=REPO, check=True, capture_output=True, timeout=60)
    report = read_rows(str(out))
    assert [(r.prompt, r.chosen, r.rejected) for r in report.rows] == \
        [(r.prompt, r.chosen, r.rejected) for r in rows[:50]]


@pytest.mark.parametrize("text,expected", [
    ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n<|im_start|>user\nfirst?"
     "<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n"
     "<|im_start|>assistant\n", "How do I bake bread?"),
    ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: What is 2+2?\n\nAssistant:", "What is 2+2?"),
    ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a fruit. [/INST]", "Name a fruit."),
    ("plain text with no turns", "plain text with no turns"),
])
def test_last_user_message_shows_the_question_not_the_system_prompt(text, expected):
    from utils.data.templates import last_user_message
    assert last_user_message(text) == expected


# ----------------------------------------------------------------------------- issue 19: formats, stages, caps
SFT_LAYOUTS = [  # (record, expected prompt text, expected reply)
    ({"prompt": "q", "chosen": "a"}, "q", "a"),
    ({"prompt": "q", "response": "a"}, "q", "a"),
    ({"prompt": "q", "completion": "a"}, "q", "a"),
    ({"prompt": "q", "output": "a"}, "q", "a"),
    ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "Add.\n\n2 and 3", "5"),
    ({"instruction": "Say hi.", "input": "", "output": "hi"}, "Say hi.", "hi"),
]


@pytest.mark.parametrize("record,prompt,reply", SFT_LAYOUTS, ids=[",".join(r[0]) for r in SFT_LAYOUTS])
def test_sft_layouts_load_for_step1_without_rejected(tmp_path, record, prompt, reply):
    path = write_jsonl(tmp_path / "sft.jsonl", [record] * 1)
    train, _, skipped = load_stage_rows([path], "1,0,0", 0, 1234, 0.0, "error")
    assert [(r.prompt, r.chosen, r.rejected) for r in train] == [((U(prompt),), reply, None)] and skipped == []


def test_stage_needs_are_checked_after_the_split(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(3)])
    train, _, _ = load_stage_rows([path], "0,0,1", 2, 1234, 0.0, "error")  # prompts only: fine for step 3
    assert [r.prompt[0]["content"] for r in train] == ["q0", "q1", "q2"] and train[0].chosen is None
    with pytest.raises(DataError, match=re.escape(f"{path}:") + r"\d: field 'chosen': missing: step 1 \(SFT\)"):
        load_stage_rows([path], "1,0,0", 0, 1234, 0.0, "error")
    sft = write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"q{i}", "response": "a"} for i in range(3)])
    with pytest.raises(DataError, match=r"all 3 rows are unusable for stage 2 \(reward\).*field 'rejected': "
                                        r"missing: step 2 \(reward model\) compares two replies"):
        load_stage_rows([sft], "0,1,0", 1, 1234, 0.0, "skip")


def test_every_row_bad_names_file_count_and_first_reason_not_data_split(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "chosen": 1, "rejected": "b"}\n{"prompt": ""}\n')
    with pytest.raises(DataError) as err:
        load_stage_rows([str(path)], "1,1,1", 0, 1234, 0.0, "skip")
    assert str(err.value) == (f"{path}: all 2 rows are bad (--on_bad_rows skip dropped them); first: {path}:1: "
                              "field 'chosen': expected a string, got int")
    assert "data_split" not in str(err.value)


def test_empty_source_is_an_error(tmp_path):
    for name, body in (("empty.jsonl", b""), ("blank.jsonl", b"\n \n"), ("list.json", b"[]")):
        (tmp_path / name).write_bytes(body)
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}: empty: no rows")):
            read_source(str(tmp_path / name), on_bad_rows="skip")
    code, lines = run_validate(str(tmp_path / "empty.jsonl"))
    assert code == 1 and lines == [f"{tmp_path / 'empty.jsonl'}: empty: no rows (a data source needs at least one "
                                   "row object)", "0 rows, 1 problems (empty_source: 1)"]


def test_null_field_says_null(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": None, "chosen": "a"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: field 'prompt': null (expected a string)")):
        read_rows(path)


def test_long_field_cut_in_skip_mode_refused_in_error_mode(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "p" * 90 + "END", "chosen": "START" + "c" * 200,
                                                 "rejected": "short"}])
    report = read_source(path, "skip", max_field_chars=50).train
    row = report.rows[0]
    assert row.prompt[0]["content"] == "p" * 47 + "END" and row.chosen == "START" + "c" * 45
    assert row.rejected == "short"
    assert report.cut == [f"{path}:1: field 'prompt[0].content': 93 characters cut to 50"]
    with pytest.raises(DataError, match=re.escape(f"{path}:1: field 'prompt[0].content': too long: 93 characters, "
                                                  "over the cap of 50")):
        read_source(path, "error", max_field_chars=50)


def test_field_char_cap_from_max_seq_len():
    from types import SimpleNamespace
    from utils.data.pipeline import field_char_cap
    assert field_char_cap(SimpleNamespace(max_field_chars=0, max_seq_len=512)) == 10240
    assert field_char_cap(SimpleNamespace(max_field_chars=7, max_seq_len=512)) == 7
    assert field_char_cap(SimpleNamespace(max_field_chars=0, max_prompt_seq_len=256, max_answer_seq_len=256)) == 10240


def test_validate_stage_and_char_cap(tmp_path, capsys):
    path = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "q1", "response": "a"}, {"prompt": "q2", "chosen": "x" * 30,
                                                                                   "rejected": "y"}])
    assert validate([path], stage=1) == 0 and validate([path], stage=3) == 0
    capsys.readouterr()
    assert validate([path], stage=2) == 1
    assert f"{path}:1: field 'rejected': missing: step 2 (reward model)" in capsys.readouterr().out
    assert validate([path], field_cap=20) == 1
    assert f"{path}:2: field 'chosen': too long: 30 characters, over the cap of 20" in capsys.readouterr().out
    code, lines = run_validate(path, "--stage", "2", "--max_seq_len", "1")  # cap 20 characters
    assert code == 1 and lines[-1] == "2 rows, 2 problems (too_long: 1, wrong_stage: 1)"
