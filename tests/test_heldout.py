"""inference/heldout.py and its tables: base / step-1 / step-3 answers on held-out synthetic prompts, right by rule
beside the mean reward; the shown examples are the first held-out prompts in order."""
import json
import os
import shutil

import pytest

import inference.heldout as heldout
from inference.summary import summarize
from utils.data.splits import load_stage_rows
from utils.data.synthetic_check import expected_answer
from utils.report_tables import HELDOUT_FILE, before_after_table, correctness_table


def fake_result():
    prompts = ["What is 2 + 3?", "Write 'cookie' in capital letters.", "What day comes after Monday?"]
    answers = {"base": ["2 + 3 = 6.", 'defCOBcookie= "cookie"', "Tuesday"],
               "step 1": ["5", "COOKIE", "Sunday"],
               "step 3": ["2 + 3 = 5.", "COOKIE", "It is Tuesday."]}
    rows = [type("Row", (), {"prompt": ({"role": "user", "content": p},)})() for p in prompts]
    scores = {"base": [0.5, 2.0, 0.25], "step 1": [1.0, 1.0, -1.0], "step 3": [1.5, 1.0, 0.5]}
    return {"prompts": 3, "decoding": "greedy, at most 32 new tokens", "reward_model": "out/step2",
            "models": {k: heldout.grade(rows, answers[k], scores[k]) for k in answers}}


def test_grade_counts_by_rule_not_by_reward():
    models = fake_result()["models"]
    assert [models[k]["correct"] for k in models] == [1, 2, 3]
    # the reward model's favourite (2.0) is the garbage answer: it stays wrong
    assert models["base"]["samples"][1] == {"prompt": "Write 'cookie' in capital letters.",
                                            "response": 'defCOBcookie= "cookie"', "correct": False, "score": 2.0}
    assert models["base"]["reward_mean"] == pytest.approx(2.75 / 3)


def test_correctness_table_cells_and_fixed_examples():
    table = correctness_table(fake_result(), n_examples=2)
    lines = table.splitlines()
    assert lines[0].split() == ["base", "step", "1", "step", "3"]
    assert lines[1].split()[-6:] == ["1/3", "(33%)", "2/3", "(67%)", "3/3", "(100%)"]
    assert lines[2].split()[-3:] == ["0.9167", "0.3333", "1.0000"]
    assert "3 held-out synthetic prompts no stage trained on, greedy" in table and "not by the reward model" in table
    # the first two prompts in order, each answer marked; the third is not shown
    assert "the first 2 held-out prompts, in order:" in table
    assert 'base    : defCOBcookie= "cookie"  [wrong, reward 2.000]' in table
    assert "step 3  : 2 + 3 = 5.  [correct, reward 1.500]" in table
    assert "Monday" not in table


def test_table_without_reward_model():
    result = fake_result()
    for part in result["models"].values():
        part["reward_mean"] = None
        for s in part["samples"]:
            del s["score"]
    table = correctness_table(result)
    assert "mean reward" not in table and "step 1  : COOKIE  [correct]" in table


def test_summary_and_report_show_the_table(tmp_path):
    from inference.report import write_report
    from tests.test_report import STEP1, write_logs
    (tmp_path / HELDOUT_FILE).write_text(json.dumps(fake_result()))
    assert "correct (by rule)" in summarize(str(tmp_path)) and "3/3 (100%)" in summarize(str(tmp_path))
    write_logs(tmp_path / "step1", STEP1)
    md = open(write_report(str(tmp_path), str(tmp_path / "report")).markdown_path).read()
    assert "## Held-out answers, checked by rule" in md and "2/3 (67%)" in md


def test_step3_table_counts_correct_when_graded():
    before = {"reward_mean": 0.5, "n": 2, "correct": 0, "graded": 2,
              "samples": [{"prompt": "What is 2 + 3?", "response": "6", "score": 0.5, "correct": False}] * 2}
    after = {"reward_mean": 1.0, "n": 2, "correct": 1, "graded": 2,
             "samples": [{"prompt": "What is 2 + 3?", "response": "5", "score": 1.0, "correct": True}] * 2}
    table = before_after_table(before, after)
    assert "0/2 (0%)" in table and "1/2 (50%)" in table and "[correct, reward 1.000]" in table
    plain = before_after_table(*({k: v for k, v in s.items() if k not in ("correct", "graded")}
                                 for s in (before, after)))
    assert "correct (by rule)" not in plain  # a non-synthetic run: no rule, no row


def test_heldout_rows_are_the_eval_pool_in_order():
    rows = heldout.heldout_rows(20)
    _, pool, _ = load_stage_rows(["synthetic"], "2,4,4", 2, 1234, 0.1)
    assert [r.prompt for r in rows] == [r.prompt for r in pool[:20]]  # step 3's held-out prompts come first
    trained = {r.prompt[-1]["content"] for stage in range(3)
               for r in load_stage_rows(["synthetic"], "2,4,4", stage, 1234, 0.1)[0]}
    assert len(trained) > 1000 and not trained & {r.prompt[-1]["content"] for r in rows}
    assert all(expected_answer(r) for r in rows)


@pytest.fixture()
def pipeline_dir(tiny_model_dir, tmp_path):
    from utils.models import load_tokenizer, load_value_model
    shutil.copytree(tiny_model_dir, tmp_path / "step1")
    shutil.copytree(tiny_model_dir, tmp_path / "step3" / "actor")
    load_value_model(tiny_model_dir, head_init_std=1.0).save_pretrained(tmp_path / "step2")
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "step2")
    return tmp_path


def test_cli_with_tiny_models(pipeline_dir, tiny_model_dir, capsys):
    argv = [str(pipeline_dir), "--base", tiny_model_dir, "--n_prompts", "3", "--max_new_tokens", "3",
            "--dtype", "fp32"]
    assert heldout.main(argv) == 0
    result = json.loads((pipeline_dir / HELDOUT_FILE).read_text())
    assert list(result["models"]) == ["base", "step 1", "step 3"] and result["prompts"] == 3
    for part in result["models"].values():
        assert part["n"] == 3 and isinstance(part["reward_mean"], float)
        assert [s["prompt"] for s in part["samples"]] == [r.prompt[-1]["content"] for r in heldout.heldout_rows(3)]
    # same weights, greedy: the three models answer alike
    assert result["models"]["base"]["samples"] == result["models"]["step 3"]["samples"]
    assert "correct (by rule)" in capsys.readouterr().out


def test_right_answers_are_counted(pipeline_dir, tiny_model_dir, monkeypatch):
    # fake generations: step 3 gives the generator's own answers, the others answer nothing
    def fake_answers(path, messages, cfg):
        return [expected_answer(m[-1]["content"]) if path.endswith("actor") else "" for m in messages]
    monkeypatch.setattr(heldout, "_answers", fake_answers)
    os.remove(pipeline_dir / "step2" / "config.json")  # no reward model: correctness alone
    cfg = heldout.HeldoutConfig(output_dir=str(pipeline_dir), base=tiny_model_dir, n_prompts=8)
    result = heldout.evaluate(cfg)
    assert [result["models"][k]["correct"] for k in ("base", "step 1", "step 3")] == [0, 0, 8]
    assert result["reward_model"] is None and result["models"]["step 3"]["reward_mean"] is None


def test_step3_evaluation_grades_synthetic_prompts():
    import contextlib
    import types

    import torch

    from step3_rlhf.evaluate import evaluate_policy
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    answers = {chat.format("What is 2 + 3?"): "5", chat.format("Name the capital of Peru?"): "Oslo.",
               chat.format("Tell me a story."): "Once upon a time."}

    class Maker:
        log = types.SimpleNamespace(pop_timers=dict)
        cfg = types.SimpleNamespace(eval_temperature=None)
        rollout = types.SimpleNamespace(temperature=lambda value: contextlib.nullcontext())

        def make(self, rows, sample=True):
            return types.SimpleNamespace(scores=torch.ones(len(rows)), ref_logprobs=None, prompts=rows,
                                         responses=[answers[p] for p in rows], components={})
    out = evaluate_policy(Maker(), list(answers), 2, seed=1)
    assert (out["correct"], out["graded"], out["n"]) == (1, 2, 3)  # the story has no exact answer: not graded
    assert [s.get("correct") for s in out["samples"]] == [True, False, None]


def test_driver_runs_the_check_only_when_step1_wrote_a_model(tmp_path, monkeypatch):
    import e2e_rlhf
    calls = []
    monkeypatch.setattr(e2e_rlhf, "run_logged", lambda cmd, log: calls.append(cmd) or 0)
    e2e_rlhf.heldout_check(str(tmp_path), "base-model")
    assert calls == []  # no step-1 model yet (a fake or failed run): nothing to compare
    (tmp_path / "step1").mkdir()
    (tmp_path / "step1" / "config.json").write_text("{}")
    (tmp_path / HELDOUT_FILE).write_text("{}")  # an earlier run's result is never shown beside this run's
    e2e_rlhf.heldout_check(str(tmp_path), "base-model")
    assert calls[0][1:] == ["-m", "inference.heldout", str(tmp_path), "--base", "base-model", "--quiet"]
    assert not (tmp_path / HELDOUT_FILE).exists()


def test_reward_audit_by_hand():
    """Right scores 0.25 (base), 1.0, 1.0 (step 1), 1.5, 1.0, 0.5 (step 3); wrong: 0.5 and 2.0 (base), -1.0 (step 1).
    Right-over-wrong pairs: vs 0.5 four wins and a tie (4.5), vs 2.0 none, vs -1.0 all six: 10.5/18. With the right
    reference answers scored 1.0, 1.8, 0.0: base's 0.5 < 1.0 and 2.0 >= 1.8 are liked once, step 1's -1.0 < 0.0 not."""
    from utils.report_tables import reward_audit
    result = fake_result()
    audit = reward_audit(result["models"])
    assert audit["right_over_wrong"] == pytest.approx(10.5 / 18) and audit["wrong_liked"] is None
    assert "RM-liked" not in correctness_table(result) and "58% of the time" in correctness_table(result)
    for part in result["models"].values():
        for s, ref in zip(part["samples"], [1.0, 1.8, 0.0]):
            s["reference_score"] = ref
    assert reward_audit(result["models"])["wrong_liked"] == {"base": 1, "step 1": 0, "step 3": 0}
    table = correctness_table(result)
    assert table.splitlines()[3].split()[-3:] == ["1", "0", "0"] and "same prompt" in table
    for part in result["models"].values():
        for s in part["samples"]:
            s["correct"] = True
    assert reward_audit(result["models"]) is None  # nothing wrong: no audit, no row
    assert "RM-liked" not in correctness_table(result)
