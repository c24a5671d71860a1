"""Step 3's held-out learning curve (--eval_interval, --eval_temperature) and wall-time budget
(--max_train_seconds), on the tiny random model."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from step3_rlhf.evaluate import eval_scalars
from step3_rlhf.main import main as rl_main

RULE = "tests.test_critic_free:my_rule"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(tiny_model_dir, out, *extra):
    argv = ["--actor_model_name_or_path", tiny_model_dir, "--algo", "grpo", "--num_generations", "2",
            "--reward", RULE, "--data_path", "synthetic:60", "--data_split", "1,1,1", "--max_prompt_seq_len", "32",
            "--max_answer_seq_len", "6", "--per_device_generation_batch_size", "2",
            "--per_device_training_batch_size", "4", "--lr_scheduler_type", "constant", *extra,
            "--output_dir", str(out), "--dtype", "fp32", "--threads", "1", "--disable_progress_bar", "--no_resume"]
    rl_main(argv)
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def test_eval_scalars_by_hand():
    result = {"reward_mean": 0.55, "kl_mean": 0.25, "components": {"countdown": 0.325, "format": 1.0, "model": 0.1},
              "full_marks": {"countdown": 0.25, "format": 1.0}}
    assert eval_scalars(result) == {"eval/reward": 0.55, "eval/kl": 0.25, "eval/countdown": 0.325,
                                    "eval/format": 1.0, "eval/model": 0.1, "eval/countdown_full": 0.25,
                                    "eval/format_full": 1.0}


def test_curve_every_interval_and_greedy(tiny_model_dir, tmp_path):
    summary = _run(tiny_model_dir, tmp_path / "run", "--max_steps", "4", "--eval_interval", "2", "--eval_prompts",
                   "3", "--eval_temperature", "0", "--per_device_eval_batch_size", "3", "--actor_learning_rate", "0")
    history = summary["history"]
    assert len(history) == 4
    # step 2 carries the curve point; step 4 does not (the after-run evaluation is that point)
    assert "eval/reward" in history[1] and not any("eval/reward" in history[i] for i in (0, 2, 3))
    # the rule's mean score and its full-marks share (my_rule counts "a"s: >= 1 is full marks)
    before, after = summary["before"], summary["after"]
    counts = [s["response"].count("a") for s in before["samples"]]
    assert before["components"][RULE] == pytest.approx(sum(counts) / 3)
    assert before["full_marks"][RULE] == pytest.approx(sum(c >= 1 for c in counts) / 3)
    # learning rate 0 and greedy decoding: every evaluation gives the same answers, which are the argmax ones
    assert [s["response"] for s in after["samples"]] == [s["response"] for s in before["samples"]]
    assert history[1]["eval/reward"] == pytest.approx(before["reward_mean"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "actor")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    sample = before["samples"][0]
    ids = tok(sample["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                            pad_token_id=tok.pad_token_id)
    assert tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True) == sample["response"]


def test_max_train_seconds_stops_early_and_saves(tiny_model_dir, tmp_path, capsys):
    summary = _run(tiny_model_dir, tmp_path / "budget", "--max_steps", "500", "--max_train_seconds", "0.001",
                   "--eval_prompts", "2", "--actor_learning_rate", "1e-3")
    assert summary["steps"] == 1 and summary["after"] is not None
    assert os.path.isfile(tmp_path / "budget" / "actor" / "config.json")
    assert "--max_train_seconds 0.001 spent after 1 of 500 steps" in capsys.readouterr().err
