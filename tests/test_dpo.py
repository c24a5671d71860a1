"""step2_dpo end to end on a tiny random Llama (CPU fp32): DPO moves the held-out implicit-reward accuracy and
margin the right way, the saved model loads as a plain causal LM with the trainer's logits, TensorBoard gets the
reward scalars, IPO / cDPO / reference-free runs train, bad options are refused with one line, --dry_run plans,
and a run killed with -9 resumes to the same weights as an uninterrupted one."""
import json
import math
import os
import shutil
import signal
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import step2_dpo.main as dpo_main
from step2_dpo.config import DPOConfig
from step2_dpo.plan import dpo_memory
from tests.test_reliability import max_diff, run
from tests.test_stages import fixed_input, logits_of, run_stage
from utils.data.synthetic import make_synthetic_preferences, write_jsonl
from utils.models import load_tokenizer, unwrap
from utils.options import parse_config
from utils.plan import RUNTIME_BYTES, ModelShape


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dpo_data") / "pref.jsonl")
    write_jsonl(make_synthetic_preferences(200, seed=7), path)
    return path


def dpo_argv(model_dir, data, out, *extra):
    return ["--model_name_or_path", model_dir, "--data_path", data, "--data_split", "0,1,0", "--output_dir", out,
            "--max_seq_len", "64", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
            "--learning_rate", "3e-3", "--dtype", "fp32", "--max_steps", "20", "--threads", "1",
            "--disable_progress_bar", "--no_resume", *extra]


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, pairs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dpo"))
    engine, summary = run_stage(dpo_main, dpo_argv(tiny_model_dir, pairs, out, "--enable_tensorboard"))
    return engine, summary, out


def test_dpo_raises_the_held_out_reward_accuracy_and_margin(dpo_run):
    _, summary, _ = dpo_run
    before, after = summary["before"], summary["after"]
    assert summary["steps"] == 20 and summary["eval_pairs"] > 0
    # policy == reference at the start: every implicit reward is exactly 0, every pair ties, the loss is log 2
    assert before["eval/tie_fraction"] == 1.0 and before["eval/accuracy"] == 0.5
    assert before["eval/margin"] == 0.0 and before["eval/loss"] == pytest.approx(math.log(2), abs=1e-9)
    assert after["eval/accuracy"] >= 0.75 and after["eval/margin"] > 0.2
    assert after["eval/rewards/chosen"] > after["eval/rewards/rejected"]
    assert after["eval/loss"] < 0.6


def test_the_saved_model_loads_with_the_trainers_logits(dpo_run, tiny_model_dir):
    engine, _, out = dpo_run
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    trained = unwrap(engine)
    ids = fixed_input(trained.config.vocab_size)
    assert torch.equal(logits_of(reloaded, ids), logits_of(trained, ids))
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert not torch.equal(logits_of(start, ids), logits_of(reloaded, ids))  # it did train
    assert load_tokenizer(out).get_vocab() == load_tokenizer(tiny_model_dir).get_vocab()


def test_tensorboard_has_the_reward_scalars(dpo_run):
    from inference.report import find_run_dirs, load_scalars
    _, _, out = dpo_run
    tags = {t for d in find_run_dirs(out) for t in load_scalars(d)}
    for tag in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "train/loss",
                "eval/loss", "eval/accuracy", "eval/margin"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"


def test_the_loss_mask_covers_exactly_the_replies(tiny_model_dir, pairs, tmp_path):
    from utils.data.pipeline import pair_datasets
    cfg = parse_config(DPOConfig, dpo_argv(tiny_model_dir, pairs, str(tmp_path / "o")))
    tok = load_tokenizer(tiny_model_dir)
    train_set, _, _ = pair_datasets(cfg, tok, type("Quiet", (), {"info": staticmethod(lambda m: None)}))
    items = [train_set[i] for i in range(3)]
    batch = dpo_main.collate_dpo(items, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    for row, (item, key) in enumerate([(it, "chosen_input_ids") for it in items] +
                                      [(it, "rejected_input_ids") for it in items]):
        marked = batch["input_ids"][row][batch["loss_mask"][row].bool()].tolist()
        assert item["prompt_len"] > 0 and marked == item[key][item["prompt_len"]:]


@pytest.mark.parametrize("extra", [["--loss_type", "ipo", "--beta", "0.5"],
                                   ["--loss_type", "cdpo", "--label_smoothing", "0.1", "--reference_free"]])
def test_ipo_and_reference_free_cdpo_train(extra, tiny_model_dir, pairs, tmp_path):
    argv = dpo_argv(tiny_model_dir, pairs, str(tmp_path / "o"), *extra)
    argv[argv.index("--max_steps") + 1] = "6"
    _, summary = run_stage(dpo_main, argv)
    assert summary["steps"] == 6 and summary["after"]["eval/margin"] > 0
    assert math.isfinite(summary["after"]["eval/loss"])
    if "ipo" in extra:  # IPO's loss at h = 0 is (1 / (2 beta))^2 = 1
        assert summary["before"]["eval/loss"] == pytest.approx(1.0)
        assert summary["after"]["eval/loss"] < 1.0


@pytest.mark.parametrize("flags,message", [
    (["--loss_type", "cdpo"], "--loss_type cdpo needs --label_smoothing > 0"),
    (["--loss_type", "ipo", "--label_smoothing", "0.1"], "IPO has none"),
    (["--label_smoothing", "0.5"], "--label_smoothing must be in [0, 0.5)"),
    (["--beta", "0"], "--beta must be > 0"),
    (["--offload_reference_model", "--zero_stage", "2"], "--offload_reference_model needs --zero_stage 3")])
def test_bad_options_are_refused_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(DPOConfig, flags)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "\n" not in err


def test_dry_run_plans_without_training(tiny_model_dir, pairs, tmp_path, capsys):
    out = tmp_path / "dry"
    dpo_main.main(dpo_argv(tiny_model_dir, pairs, str(out), "--dry_run"))
    text = capsys.readouterr().out
    assert "reference: a frozen copy, ZeRO 0; loss sigmoid, beta 0.1" in text and "nothing was trained" in text
    assert not (out / "model.safetensors").exists()


def test_dpo_memory_by_hand():
    shape = ModelShape(params=1000, layers=2, hidden=4, intermediate=8, heads=2, kv_heads=2, vocab=10)
    mem = dpo_memory(shape, nbytes=4, zero_stage=0, world=1, micro_batch=1, seq_len=5)
    # policy 1000 x 4 + reference 1000 x 4 weights; gradients 1000 x 4; Adam moments 1000 x 8 (fp32: no master)
    # train phase, 2 rows x 5 tokens: activations 10 x 4 x 2 layers x (8 x 4 + 1 x 8) = 3200, logits and their
    # gradient 10 x 10 x 2 x 4 = 800 (more than the reference forward's 10 x 10 x (4 + 4) = 800? equal: train wins)
    assert (mem["weights"], mem["gradients"], mem["optimizer"]) == (8000, 4000, 8000)
    assert (mem["activations"], mem["logits"], mem["phase"]) == (3200, 800, "train")
    assert mem["total"] == 8000 + 4000 + 8000 + 3200 + 800 + RUNTIME_BYTES
    free = dpo_memory(shape, nbytes=4, zero_stage=0, world=1, micro_batch=1, seq_len=5, reference=False)
    assert free["weights"] == 4000
    sharded = dpo_memory(shape, nbytes=4, zero_stage=3, world=4, micro_batch=1, seq_len=5)
    assert sharded["weights"] == 2 * 1000 * 4 / 4  # ZeRO-3 shards the policy and the reference


def test_sigkill_then_resume_gives_the_same_weights(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo_resume")
    write_jsonl(make_synthetic_preferences(160, seed=5), str(d / "data.jsonl"))

    def cmd(out):  # accumulation and dropout: the micro-step counter and the dropout masks must line up
        return [sys.executable, "step2_dpo/main.py", "--model_name_or_path", tiny_model_dir, "--data_path",
                str(d / "data.jsonl"), "--data_split", "1,1,1", "--output_dir", str(out), "--dtype", "fp32",
                "--disable_progress_bar", "--threads", "1", "--seed", "3", "--max_seq_len", "64",
                "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16", "--learning_rate", "1e-3",
                "--no-compare_before", "--max_eval_samples", "8", "--dropout", "0.1", "--max_steps", "8",
                "--save_interval", "2", "--gradient_accumulation_steps", "2"]
    code, log = run(cmd(d / "ref"))
    assert code == 0, log[-3000:]
    out = d / "run"
    code, log = run(cmd(out), signal_when=str(out / "checkpoints" / "step4"))
    assert code == -signal.SIGKILL, log[-2000:]
    assert not os.path.exists(out / "model.safetensors")  # it really died before the end
    code, log = run(cmd(out))
    assert code == 0 and "resuming from" in log, log[-3000:]
    assert max_diff([str(d / "ref" / "model.safetensors")], [str(out / "model.safetensors")]) <= 1e-6


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_two_processes_zero3_with_uneven_eval_shares(tiny_model_dir, pairs, tmp_path):
    """9 eval pairs in batches of 4: rank 0 has 2 batches, rank 1 one. At ZeRO-3 every forward (policy and
    reference) gathers weights collectively, so rank 1 must run a top-up batch or the ranks would hang."""
    from tests.test_distributed import launch
    out = tmp_path / "dpo2"
    argv = dpo_argv(tiny_model_dir, pairs, str(out), "--zero_stage", "3", "--max_eval_samples", "9",
                    "--per_device_eval_batch_size", "4")
    argv[argv.index("--max_steps") + 1] = "2"
    launch("step2_dpo/main.py", argv, timeout=240)
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["steps"] == 2 and summary["eval_pairs"] == 9
    assert summary["before"]["eval/tie_fraction"] == 1.0  # all 9 pairs gathered, policy == reference
    AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
