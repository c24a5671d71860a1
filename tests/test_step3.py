"""Step 3 invariants and end-to-end runs on tiny random models (CPU, fp32, one process).

- actor == reference: per-token KL exactly 0, and the first PPO update sees ratio exactly 1;
- left padding never changes a response log-prob (llama: rotary, OPT: learned positions);
- the action mask is 1 up to and including the first EOS, 0 after, also when pad == eos;
- PPO end to end at ZeRO 0 and ZeRO 3 (EMA + PTX on the latter): outputs load, TensorBoard has the scalars;
- learning proof: PPO (critic) and GRPO (no critic) raise a rule reward that is easy to satisfy.
"""
import functools
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import step3_rlhf.main as rl_main
import step3_rlhf.trainer as rl_trainer
from step3_rlhf.config import RLHFConfig
from step3_rlhf.engines import build_engines
from step3_rlhf.experience import response_logprobs
from step3_rlhf.experience_maker import ExperienceMaker
from step3_rlhf.rollout import action_mask_from, generate
from step3_rlhf.prompt_data import collate_prompts, load_prompts
from step3_rlhf.trainer import RLTrainer
from utils.data.datasets import pad_sequences
from utils.data.synthetic import make_synthetic_preferences, write_jsonl
from utils.losses import masked_mean
from utils.models import load_tokenizer, load_value_model
from utils.options import parse_config
from utils.stage import start_stage

LETTER = "a"


def count_token_reward(prompt, response, meta):
    """The rule reward of the learning tests: how often LETTER occurs in the response (easy to raise: the tiny
    vocabulary has words like "assistant" and "a")."""
    return float(response.count(LETTER))


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rl_data") / "pref.jsonl")
    write_jsonl(make_synthetic_preferences(160, seed=3), path)
    return path


def _value_model_dir(model_dir, out, head_std):
    torch.manual_seed(0)
    load_value_model(model_dir, head_init_std=head_std).save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A step-2-style reward model: the tiny LM with a random head (std 1, so scores differ)."""
    return _value_model_dir(tiny_model_dir, str(tmp_path_factory.mktemp("rm")), 1.0)


@pytest.fixture(scope="module")
def critic_dir(tiny_model_dir, tmp_path_factory):
    """The tiny LM with a zero value head: a critic that starts at V = 0."""
    return _value_model_dir(tiny_model_dir, str(tmp_path_factory.mktemp("critic")), 0.0)


def rl_argv(actor, critic, data, out, *extra):
    return ["--actor_model_name_or_path", actor, "--critic_model_name_or_path", critic, "--data_path", data,
            "--data_split", "0,0,1", "--output_dir", out, "--max_prompt_seq_len", "32", "--max_answer_seq_len", "8",
            "--dtype", "fp32", "--threads", "1", "--disable_progress_bar", "--no_resume", *extra]


# ----------------------------------------------------------------------------- invariants on built pieces
def build_trainer(argv, total_steps=10):
    """(experience maker, trainer, prompt items) of a step-3 run built from `argv`."""
    cfg = parse_config(RLHFConfig, argv)
    ctx = start_stage(cfg)
    tok = load_tokenizer(cfg.actor_model_name_or_path)
    items, _ = load_prompts(cfg, tok, ctx.log)
    engines = build_engines(cfg, ctx, total_steps, ctx.log)
    maker = ExperienceMaker(cfg, engines, tok, ctx, functools.partial(collate_prompts, pad_id=tok.pad_token_id))
    return maker, RLTrainer(cfg, engines, ctx), items


def test_actor_equal_to_reference_gives_zero_kl_and_unit_ratio(tiny_model_dir, reward_model_dir, prompt_data,
                                                               tmp_path, monkeypatch):
    maker, trainer, items = build_trainer(rl_argv(tiny_model_dir, reward_model_dir, prompt_data, str(tmp_path / "out"),
                                           "--per_device_generation_batch_size", "8",
                                           "--per_device_training_batch_size", "4", "--actor_learning_rate", "1e-3"))
    exp = maker.make(items[:8])
    assert exp.action_mask.sum() > 0
    # same weights, same forward: logp - ref is exactly 0 on every token (so the KL penalty is exactly 0)
    assert torch.equal(exp.logprobs * exp.action_mask, exp.ref_logprobs * exp.action_mask)

    seen = []
    real_policy_loss = rl_trainer.policy_loss

    def recording_policy_loss(mb, logp, cfg):
        loss, stats = real_policy_loss(mb, logp, cfg)
        seen.append((loss.detach(), stats, mb, logp.detach()))
        return loss, stats

    monkeypatch.setattr(rl_trainer, "policy_loss", recording_policy_loss)
    trainer.train_on([exp], step=1)
    assert len(seen) == 2  # 8 sequences / micro-batch 4
    loss, stats, mb, logp = seen[0]
    # first micro-batch of the first epoch: nothing was updated yet, so ratio = exp(logp - old) = 1 exactly,
    # both PPO branches are -A * 1 and the token-mean loss is -masked_mean(A)
    assert torch.equal(logp * mb.action_mask, mb.logprobs * mb.action_mask)
    assert stats["clipfrac"].item() == 0.0 and stats["ratio_mean"].item() == 1.0
    assert torch.equal(loss, -masked_mean(mb.advantages, mb.action_mask))
    assert mb.advantages.abs().max() > 0  # the comparison above is not 0 == 0
    # the second micro-batch comes after an update of the actor: its ratio is no longer 1
    assert seen[1][1]["ratio_mean"].item() != 1.0


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_left_padding_does_not_change_response_logprobs(arch, tiny_model_dir, tiny_opt_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir if arch == "llama" else tiny_opt_dir,
                                                 dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    short_prompt, long_prompt = torch.randint(6, 100, (5,), generator=g), torch.randint(6, 100, (13,), generator=g)
    responses = torch.randint(6, 100, (2, 6), generator=g)
    R = responses.shape[1]

    def scored(prompts, resp):
        ids, mask = pad_sequences([p.tolist() for p in prompts], 0, left=True)
        seq = torch.cat([ids, resp], 1)
        attn = torch.cat([mask, torch.ones_like(resp)], 1)
        with torch.no_grad():
            return response_logprobs(model, seq, attn, R), seq, attn

    alone, _, _ = scored([short_prompt], responses[:1])
    batched, seq, attn = scored([short_prompt, long_prompt], responses)  # short prompt gets 8 pad tokens
    assert attn[0, :8].sum() == 0 and attn[1].all()
    assert torch.allclose(alone[0], batched[0], atol=1e-5, rtol=0)
    if arch == "opt":  # the check has teeth: OPT's learned positions, counted from the pads, change the result
        with torch.no_grad():
            wrong = model(input_ids=seq, attention_mask=attn, position_ids=torch.arange(seq.shape[1]).expand(2, -1),
                          use_cache=False).logits[0, -R - 1:-1].log_softmax(-1)
        wrong = wrong.gather(-1, seq[0, -R:, None]).squeeze(-1)
        assert (wrong - alone[0]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- action mask
def test_action_mask_ends_at_the_first_eos():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 7, 2, pad, pad],   # EOS at k=2, then pad
                              [5, 7, 8, 9, 10],      # no EOS: every token is an action
                              [2, pad, pad, pad, pad],  # EOS first: only the EOS itself
                              [5, 2, 6, 2, 7]])       # a token after EOS (not generated past it) is masked
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float)
    assert torch.equal(action_mask_from(responses, [eos]), expected)


def test_action_mask_when_pad_is_eos():
    eos = pad = 2  # finished rows are filled with the EOS id itself: "!= pad" would also drop the real EOS
    responses = torch.tensor([[5, 7, eos, pad, pad], [eos, pad, pad, pad, pad], [5, 6, 7, 8, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float)
    assert torch.equal(action_mask_from(responses, [eos]), expected)
    # several end ids (e.g. <|im_end|> and </s>): the first of any of them ends the response
    assert torch.equal(action_mask_from(torch.tensor([[5, 9, 2, 2]]), [2, 9]), torch.tensor([[1.0, 1, 0, 0]]))


def test_generated_action_mask_with_pad_equal_to_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    enders = [tok.eos_token_id] + list(range(6, 40))  # many end ids: rows stop at different lengths
    model.generation_config.eos_token_id = enders
    ids, mask = pad_sequences([tok("the answer is")["input_ids"], tok("what")["input_ids"]] * 6, tok.pad_token_id,
                              left=True)
    cfg = SimpleNamespace(max_answer_seq_len=8, min_answer_seq_len=0, temperature=1.0, top_p=1.0, top_k=0)
    torch.manual_seed(0)
    seq, action_mask = generate(model, ids, mask, cfg, tok)
    responses = seq[:, ids.shape[1]:]
    ended_early = 0
    for row, m in zip(responses.tolist(), action_mask.tolist()):
        k = next((i for i, t in enumerate(row) if t in enders), len(row) - 1)  # first end id, else the last token
        assert m == [1.0] * (k + 1) + [0.0] * (len(row) - k - 1)
        assert all(t == tok.eos_token_id for t in row[k + 1:])  # generate filled the rest with pad (== eos)
        ended_early += k < len(row) - 1
    assert ended_early >= 2


# ----------------------------------------------------------------------------- end to end
def tensorboard_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard", "step3_rlhf"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def run_rl(argv):
    rl_main.main(argv)
    with open(os.path.join(argv[argv.index("--output_dir") + 1], "summary.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("zero", [0, 3])
def test_ppo_end_to_end(zero, tiny_model_dir, reward_model_dir, prompt_data, tmp_path, monkeypatch):
    out = str(tmp_path / f"ppo_z{zero}")
    extra = ["--enable_ema", "--unsupervised_dataset_name", _ptx_file(tmp_path)] if zero == 3 else []
    built, real_build = [], rl_main.build_engines
    monkeypatch.setattr(rl_main, "build_engines", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    summary = run_rl(rl_argv(tiny_model_dir, reward_model_dir, prompt_data, out, "--actor_zero_stage", str(zero),
                             "--critic_zero_stage", str(zero), "--per_device_generation_batch_size", "4",
                             "--per_device_training_batch_size", "2", "--max_steps", "3", "--eval_prompts", "4",
                             "--actor_learning_rate", "1e-3", "--enable_tensorboard", *extra))
    assert summary["steps"] == 3 and len(summary["history"]) == 3
    # each cosine schedule is as long as its engine's updates, so both end at lr 0: 3 steps x 4 rows / micro 2
    # = 6 critic updates, and 6 actor updates (12 with PTX, which steps the actor once more per micro-batch)
    assert built[0].actor.get_lr()[0] == 0.0 and built[0].critic.get_lr()[0] == 0.0
    assert summary["before"]["n"] == summary["after"]["n"] == 4
    actor = AutoModelForCausalLM.from_pretrained(os.path.join(out, "actor"), dtype=torch.float32)
    critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "critic"), dtype=torch.float32)
    assert critic.config.num_labels == 1
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    moved = max((v - start[k]).abs().max().item() for k, v in actor.state_dict().items())
    assert moved > 1e-4  # the actor was trained
    tags = tensorboard_tags(out)
    assert {"reward/mean", "kl/mean", "loss/policy", "loss/value", "time/generation"} <= tags
    if zero == 3:
        assert "loss/ptx" in tags and all(math.isfinite(h["loss/ptx"]) for h in summary["history"])
        ema = AutoModelForCausalLM.from_pretrained(os.path.join(out, "actor_ema"), dtype=torch.float32).state_dict()
        # EMA (decay 0.992, a dozen updates) sits between the start and the actor, much closer to the start
        actor_sd = actor.state_dict()
        key = "model.layers.0.self_attn.q_proj.weight"
        ema_step, actor_step = (ema[key] - start[key]).norm(), (actor_sd[key] - start[key]).norm()
        assert 0 < ema_step < 0.5 * actor_step


def test_gradient_accumulation_divides_the_optimizer_steps(tiny_model_dir, reward_model_dir, prompt_data, tmp_path,
                                                         monkeypatch):
    """--gradient_accumulation_steps 2: the engines step their optimizer (and LR schedule) once per 2 micro-steps,
    and plan_steps sized the schedules for that (both cosine schedules end exactly at lr 0)."""
    built, real_build = [], rl_main.build_engines
    monkeypatch.setattr(rl_main, "build_engines", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    argv = rl_argv(tiny_model_dir, reward_model_dir, prompt_data, str(tmp_path / "accum"),
                   "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "2",
                   "--max_steps", "3", "--eval_prompts", "0", "--gradient_accumulation_steps", "2",
                   "--unsupervised_dataset_name", _ptx_file(tmp_path))
    summary = run_rl(argv)
    assert summary["steps"] == 3
    actor, critic = built[0].actor, built[0].critic
    # 3 steps x 2 micro-batches: 6 critic micro-steps and 12 actor ones (PTX steps the actor once more)
    assert (actor.micro_steps, actor.global_steps) == (12, 6)
    assert (critic.micro_steps, critic.global_steps) == (6, 3)
    assert actor.lr_scheduler.last_epoch == 6 and critic.lr_scheduler.last_epoch == 3
    assert rl_main.plan_steps(parse_config(RLHFConfig, argv), 100, 1) == (3, 6, 3)
    assert actor.get_lr()[0] == 0.0 and critic.get_lr()[0] == 0.0


def _ptx_file(tmp_path):
    path = tmp_path / "ptx.txt"
    path.write_text("the answer is yes\n\nwhat is the question\n\nhow are you I am good thanks\n\nplease help\n")
    return str(path)


# ----------------------------------------------------------------------------- learning proof
def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_rl_learns_an_easy_rule_reward(algo, tiny_model_dir, critic_dir, prompt_data, tmp_path):
    """Count of the letter "a" in 8-token answers: random init gives about 1, the best answer about 16."""
    out = str(tmp_path / algo)
    if algo == "ppo":  # 32 samples, 2 updates of actor and critic per step; KL penalty 0.1 as upstream
        extra = ["--per_device_generation_batch_size", "32", "--critic_learning_rate", "3e-3"]
    else:  # 8 prompts x 4 samples, group-normalised advantages, no critic, no reference
        extra = ["--num_generations", "4", "--per_device_generation_batch_size", "8", "--beta", "0"]
    summary = run_rl(rl_argv(tiny_model_dir, critic_dir, prompt_data, out, "--algo", algo, "--reward",
                             f"{__name__}:count_token_reward", "--per_device_training_batch_size", "16",
                             "--actor_learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--max_steps", "40",
                             "--eval_prompts", "0", "--seed", "1", *extra))
    rewards = [h["reward/mean"] for h in summary["history"]]
    first, last = _mean(rewards[:5]), _mean(rewards[-5:])
    assert first < 2.0
    assert last > first + 3.0, rewards
