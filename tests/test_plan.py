"""--dry_run: the memory estimate's arithmetic against a hand computation, and a
dry run of a real stage that plans without training."""
import re

import pytest

from utils.plan import (ModelShape, activation_bytes, kv_cache_bytes, rlhf_memory,
                        supervised_memory, trained_bytes)

SHAPE = ModelShape(params=1000, layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=50,
                   model_type="llama")


def test_trained_bytes_bf16_zero_stages_by_hand():
    # bf16: weights 2 B; gradients 2 + 4 (fp32 buffer); Adam 8 + fp32 master 4
    assert trained_bytes(1000, 1000, 2, 0, 4) == {"weights": 2000, "gradients": 6000, "optimizer": 12000}
    assert trained_bytes(1000, 1000, 2, 1, 4) == {"weights": 2000, "gradients": 6000, "optimizer": 3000}
    assert trained_bytes(1000, 1000, 2, 2, 4) == {"weights": 2000, "gradients": 1500, "optimizer": 3000}
    assert trained_bytes(1000, 1000, 2, 3, 4) == {"weights": 500, "gradients": 1500, "optimizer": 3000}
    # fp32: no master copy, no extra gradient buffer
    assert trained_bytes(1000, 100, 4, 0, 1) == {"weights": 4000, "gradients": 400, "optimizer": 800}


def test_supervised_memory_step1_by_hand():
    mem = supervised_memory(SHAPE, nbytes=2, zero_stage=0, world=1, micro_batch=2, seq_len=10, value_model=False,
                            fused=True)
    tokens = 20
    act = tokens * 2 * 2 * (8 * 8 + 1 * 16)   # tokens x bytes x layers x (8h + i), fused layers
    logits = tokens * 50 * (2 + 8)
    assert mem["activations"] == act == 6400
    assert mem["logits"] == logits == 10000
    assert mem["total"] == pytest.approx(2000 + 6000 + 12000 + act + logits + mem["runtime"])
    # step 2: chosen + rejected in one backward, no LM logits
    mem2 = supervised_memory(SHAPE, nbytes=2, zero_stage=0, world=1, micro_batch=2, seq_len=10, value_model=True)
    assert mem2["activations"] == 2 * act and "logits" not in mem2
    # step 2 with --lm_loss_coef: the chosen rows' (micro_batch of them) LM logits as well
    mem3 = supervised_memory(SHAPE, nbytes=2, zero_stage=0, world=1, micro_batch=2, seq_len=10, value_model=True,
                             lm_loss=True)
    assert mem3["activations"] == 2 * act and mem3["logits"] == logits == 10000


def test_checkpointing_keeps_one_hidden_state_per_block():
    assert activation_bytes(SHAPE, 10, 2, fused=True, checkpointing=True) == 10 * 2 * (2 * 8 + 8 * 8 + 16)


def test_rlhf_memory_peak_phase_by_hand():
    mem = rlhf_memory(SHAPE, SHAPE, nbytes=2, world=1, actor_zero=0, critic_zero=0, reference=True,
                      reward_model=SHAPE, gen_rows=4, train_rows=2, prompt_len=6, answer_len=4)
    # resident: actor and critic weights + optimizer (2000 + 12000 each), reference and reward model 2000 each;
    # gradients (2 + 4 fp32 buffer = 6000 per model) only while one model trains: the training phase's
    assert mem["weights"] == 4 * 2000 and mem["optimizer"] == 24000
    kv = 2 * 2 * 1 * 4 * 4 * 10 * 2            # 2 x layers x kv heads x head dim x rows x length x bytes
    assert kv_cache_bytes(SHAPE, 4, 10, 2) == kv == 1280
    experience = 4 * 10 * 50 * (2 + 4)         # no-grad logits of every generated row: 12000
    act, logits = 2 * 10 * 2 * 2 * 80, 2 * 10 * 50 * 2 * 2  # a training micro-batch: 2 rows x 10 tokens
    assert act + logits == 10400 and 6000 + 10400 > experience > kv
    assert mem["phase"] == "train" and mem["gradients"] == 6000 and mem["activations"] == act
    assert mem["total"] == pytest.approx(8000 + 24000 + 6000 + 10400 + mem["runtime"])
    # twice the generated rows: scoring them (24000) is the peak, and no gradient is alive then
    mem = rlhf_memory(SHAPE, SHAPE, nbytes=2, world=1, actor_zero=0, critic_zero=0, reference=True,
                      reward_model=SHAPE, gen_rows=8, train_rows=2, prompt_len=6, answer_len=4)
    assert mem["phase"] == "experience" and mem["logits"] == 2 * experience and "gradients" not in mem
    assert mem["total"] == pytest.approx(8000 + 24000 + 2 * experience + mem["runtime"])
    # no critic, a larger training micro-batch
    mem = rlhf_memory(SHAPE, None, nbytes=2, world=1, actor_zero=0, critic_zero=0, reference=False,
                      reward_model=None, gen_rows=4, train_rows=4, prompt_len=6, answer_len=4)
    assert mem["phase"] == "train" and mem["activations"] == 2 * act and mem["logits"] == 2 * logits


def test_dry_run_plans_without_training(tiny_model_dir, tmp_path, capsys):
    from step1_sft.main import main
    out = tmp_path / "step1"
    main(["--model_name_or_path", tiny_model_dir, "--max_seq_len", "32", "--dtype", "fp32", "--dry_run",
          "--output_dir", str(out), "--data_path", "synthetic:40"])
    printed = capsys.readouterr().out
    assert "peak memory per process (estimate)" in printed and "optimizer steps" in printed
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()


def test_dry_run_bad_model_config_is_one_line(tmp_path):
    from utils.models import ModelLoadError
    from utils.plan import model_shape
    (tmp_path / "config.json").write_text("{\"model_type\": \"no-such-family\"}")
    with pytest.raises(ModelLoadError, match="cannot read the config"):
        model_shape(str(tmp_path))



def test_step3_dry_run_names_models_generation_path_and_peak(tiny_model_dir, tmp_path, capsys):
    from step3_rlhf.main import main
    main(["--actor_model_name_or_path", tiny_model_dir, "--critic_model_name_or_path", tiny_model_dir,
          "--data_path", "synthetic:40", "--max_prompt_seq_len", "16", "--max_answer_seq_len", "8", "--dtype", "fp32",
          "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2", "--dry_run",
          "--output_dir", str(tmp_path / "step3")])
    printed = capsys.readouterr().out
    assert "actor" in printed and "reference (frozen copy)" in printed and "critic" in printed
    assert "reward model" in printed and "generation: fast" in printed
    assert re.search(r"peak memory per process \(estimate\): [0-9.]+ GB at (train|experience|generation)", printed)
    assert not (tmp_path / "step3" / "actor").exists()


def test_dry_run_fails_on_a_bad_data_path_before_anything(tiny_model_dir, tmp_path):
    from step2_reward_model.main import main
    from utils.options import ConfigError
    with pytest.raises(ConfigError, match="no such file"):
        main(["--model_name_or_path", tiny_model_dir, "--data_path", str(tmp_path / "missing.jsonl"), "--dry_run",
              "--output_dir", str(tmp_path / "step2")])
