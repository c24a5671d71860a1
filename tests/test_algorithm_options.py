"""Issue #14's algorithm options against numbers worked out by hand (arithmetic in the comments): KL estimators
k1/k2/k3 and their place (reward or loss), asymmetric clipping (DAPO clip-higher), GSPO's sequence ratio, the
DAPO aggregation, REINFORCE++, the entropy bonus, and the update-side statistics of the trainer."""
import math
from types import SimpleNamespace

import pytest
import torch

from step3_rlhf.algorithms import compute_advantages, kl_places, policy_loss
from step3_rlhf.config import RLHFConfig
from step3_rlhf.experience import Experience
from step3_rlhf.trainer import RLTrainer
from tests.test_critic_free import _cfg as critic_free_cfg
from tests.test_critic_free import _keep_torch_threads  # noqa: F401 (autouse: --threads 1 is put back)
from tests.test_critic_free import _run as critic_free_run
from utils.options import ConfigError
from utils.policy_losses import (aggregate_loss, clipped_surrogate, kl_estimate, kl_penalized_scores,
                                 reinforce_pp_advantages)

LN2 = math.log(2.0)


def close(a, b, atol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=atol)


def _cfg(**kw):
    """test_critic_free's config (grpo, kl_ctl 0.1, beta 0, cliprange 0.2), in groups of 2, token-mean."""
    return critic_free_cfg(**{"num_generations": 2, "loss_agg": "token-mean", **kw})


# ------------------------------------------------------------------ KL estimators
@pytest.mark.parametrize("estimator,value,grad", [
    # d = logp - ref = ln 2 on the one real token
    ("k1", LN2, 1.0),                  # d; d/dlogp = 1
    ("k2", 0.5 * LN2 ** 2, LN2),       # d^2 / 2 = 0.240227; d/dlogp = d
    ("k3", 0.5 + LN2 - 1, 0.5),        # e^-d + d - 1 = 0.193147; d/dlogp = 1 - e^-d = 0.5
])
def test_kl_estimators_forward_and_backward(estimator, value, grad):
    logp = torch.tensor([[math.log(0.5), 7.0]], requires_grad=True)  # the masked position holds garbage
    ref = torch.tensor([[math.log(0.25), -3.0]])
    kl = kl_estimate(logp, ref, torch.tensor([[1.0, 0.0]]), estimator)
    assert close(kl, [[value, 0.0]])
    kl.sum().backward()
    assert close(logp.grad, [[grad, 0.0]])


def test_kl_estimator_unknown_is_one_line():
    with pytest.raises(ValueError, match="unknown kl estimator 'k4'"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), None, "k4")


def test_kl_places_default_to_todays_behaviour():
    assert kl_places(_cfg(algo="ppo")) == (True, False, "k1", "k3")
    assert kl_places(_cfg(algo="grpo")) == (False, True, "k1", "k3")
    assert kl_places(_cfg(algo="reinforce_pp")) == (True, False, "k1", "k3")
    assert kl_places(_cfg(algo="ppo", kl_in_loss=True, kl_estimator="k2")) == (True, True, "k2", "k2")


def test_kl_in_the_loss_for_ppo_with_k2():
    # ratio 1 everywhere (logp = old), advantages 0: the surrogate is 0 and only beta * k2 is left.
    # d = logp - ref = ln 2 on token (0, 0), 0 elsewhere: k2 = 0.240227 there; token mean over 4 = 0.0600566,
    # x beta 0.5 = 0.0300283. d loss / d logp(0,0) = beta * d / 4 = 0.5 * ln 2 / 4 = 0.0866434.
    logp = torch.zeros(2, 2, requires_grad=True)
    ref = torch.zeros(2, 2)
    ref[0, 0] = -LN2
    mb = SimpleNamespace(logprobs=torch.zeros(2, 2), ref_logprobs=ref, advantages=torch.zeros(2, 2),
                         action_mask=torch.ones(2, 2))
    loss, stats = policy_loss(mb, logp, _cfg(algo="ppo", beta=0.5, kl_in_loss=True, kl_estimator="k2"))
    assert loss.item() == pytest.approx(0.0300283, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(0.0600566, abs=1e-6)
    # the in-reward term (PPO's default place, still on) is watched too, with the same --kl_estimator k2
    assert stats["kl_reward"].item() == pytest.approx(0.0600566, abs=1e-6)
    loss.backward()
    assert close(logp.grad, [[0.5 * LN2 / 4, 0.0], [0.0, 0.0]])


def test_kl_in_the_reward_of_a_group_algorithm():
    # scores [1, 0]; row 0 has logp - ref = 0.5 on both tokens: k1 sum = 1, x kl_ctl 0.1 -> score 0.9.
    # group of 2 without std scaling: mean 0.45 -> advantages [0.45, -0.45].
    logp = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    ref = torch.tensor([[-0.5, -0.5], [0.0, 0.0]])
    mask = torch.ones(2, 2)
    assert close(kl_penalized_scores(torch.tensor([1.0, 0.0]), logp, ref, mask, 0.1), [0.9, 0.0])
    exp = SimpleNamespace(scores=torch.tensor([1.0, 0.0]), logprobs=logp, ref_logprobs=ref, action_mask=mask)
    compute_advantages(exp, _cfg(algo="grpo", kl_in_reward=True, scale_rewards=False))
    assert close(exp.advantages, [0.45, -0.45])
    compute_advantages(exp, _cfg(algo="grpo", scale_rewards=False))  # default: KL in the loss, scores as they are
    assert close(exp.advantages, [0.5, -0.5])


# ------------------------------------------------------------------ clipping
def _clip_batch():
    # ratios [[1.5, 0.7], [0.5, 1.25]] (old log-probs 0), advantages +1 (row 0) and -1 (row 1)
    logp = torch.log(torch.tensor([[1.5, 0.7], [0.5, 1.25]])).requires_grad_()
    return logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2)


def test_asymmetric_clip_forward_backward_and_sides():
    # eps low 0.2, high 0.28. Row 0 (A=+1): r=1.5 -> max(-1.5, -1.28) = -1.28 (clipped, high side);
    #   r=0.7 -> max(-0.7, -0.8) = -0.7.  Row 1 (A=-1): r=0.5 -> max(0.5, 0.8) = 0.8 (clipped, low side);
    #   r=1.25 -> inside [0.8, 1.28]: 1.25.  Token mean = (-1.28 - 0.7 + 0.8 + 1.25) / 4 = 0.0175.
    # Gradient / logp (d r / d logp = r): clipped tokens 0; (0,1): -0.7 / 4 = -0.175; (1,1): 1.25 / 4 = 0.3125.
    logp, old, adv, mask = _clip_batch()
    loss_mat, st = clipped_surrogate(logp, old, adv, mask, 0.2, 0.28)
    assert close(loss_mat, [[-1.28, -0.7], [0.8, 1.25]], atol=1e-5)
    loss = aggregate_loss(loss_mat, mask, "token-mean")
    assert loss.item() == pytest.approx(0.0175, abs=1e-6)
    loss.backward()
    assert close(logp.grad, [[0.0, -0.175], [0.0, 0.3125]])
    assert (st["clipfrac"].item(), st["clipfrac_low"].item(), st["clipfrac_high"].item()) == (0.5, 0.25, 0.25)
    assert st["ratio_mean"].item() == pytest.approx(3.95 / 4) and st["ratio_max"].item() == pytest.approx(1.5)
    # symmetric 0.2 (the default: --cliprange_high unset): r=1.5 clips at 1.2 and r=1.25 (A=-1) is now above
    # 1.2, where the unclipped 1.25 is the larger: (-1.2 - 0.7 + 0.8 + 1.25) / 4 = 0.0375
    loss_mat, st = clipped_surrogate(logp.detach(), old, adv, mask, 0.2)
    assert aggregate_loss(loss_mat, mask, "token-mean").item() == pytest.approx(0.0375, abs=1e-6)


def test_every_ratio_algorithm_reads_cliprange_high():
    logp, old, adv, mask = _clip_batch()
    mb = SimpleNamespace(logprobs=old, ref_logprobs=None, advantages=adv, action_mask=mask)
    for algo in ("ppo", "grpo", "rloo", "reinforce_pp"):
        loss, st = policy_loss(mb, logp.detach(), _cfg(algo=algo, cliprange_high=0.28, kl_ctl=0.0))
        assert loss.item() == pytest.approx(0.0175, abs=1e-6), algo
        assert st["clipfrac_high"].item() == 0.25


def test_gspo_sequence_ratio_forward_and_backward():
    # Row 0: token ratios 2 and 0.5 -> mean log-ratio 0 -> s = 1 (not clipped; per token, 2 would clip).
    # Row 1: one real token, ratio 1.5 -> s = 1.5 -> clipped at 1.2 (A=+1): loss -1.2 on its token.
    # seq-mean-token-mean = (-1 + -1.2) / 2 = -1.1.  d/d logp(0, t) = -(1/2) * s * (1/2) = -0.25; row 1: 0.
    logp = torch.log(torch.tensor([[2.0, 0.5], [1.5, 9.0]])).requires_grad_()
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss_mat, st = clipped_surrogate(logp, torch.zeros(2, 2), torch.tensor([1.0, 1.0]), mask, 0.2, level="sequence")
    loss = aggregate_loss(loss_mat, mask, "seq-mean-token-mean")
    assert loss.item() == pytest.approx(-1.1, abs=1e-6)
    loss.backward()
    assert close(logp.grad, [[-0.25, -0.25], [0.0, 0.0]])
    assert st["clipfrac_high"].item() == pytest.approx(1 / 3) and st["ratio_max"].item() == pytest.approx(1.5)
    # per token instead: 2 clips at 1.2, 0.5 stays (A > 0): row 0 = (-1.2 - 0.5) / 2; loss = (-0.85 - 1.2) / 2
    loss_mat, _ = clipped_surrogate(logp.detach(), torch.zeros(2, 2), torch.tensor([1.0, 1.0]), mask, 0.2)
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-mean").item() == pytest.approx(-1.025, abs=1e-6)
    with pytest.raises(ValueError, match="importance_sampling_level 'word'"):
        clipped_surrogate(logp, torch.zeros(2, 2), torch.ones(2), mask, 0.2, level="word")


# ------------------------------------------------------------------ aggregation
def test_batch_token_mean_divides_by_the_steps_tokens_per_micro_batch():
    # masked tokens 1, 2, 3 (sum 6, 3 tokens). token-mean = 2; with a step mean of 4 tokens per micro-batch: 1.5
    loss_mat = torch.tensor([[1.0, 2.0], [3.0, 100.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert aggregate_loss(loss_mat, mask, "token-mean").item() == 2.0
    assert aggregate_loss(loss_mat, mask, "batch-token-mean").item() == 2.0  # no step count: this micro-batch's
    loss = aggregate_loss(loss_mat, mask, "batch-token-mean", n_tokens=4)
    assert loss.item() == 1.5
    loss.backward()
    assert close(loss_mat.grad, [[0.25, 0.25], [0.25, 0.0]])


# ------------------------------------------------------------------ REINFORCE++
def test_reinforce_pp_advantages_by_hand():
    # mask [[1, 1], [1, 0]]; scores [1, -1]; logp - ref = 0.5 on token (0, 0); kl_ctl 0.1 (k1 in the reward):
    # rewards [[-0.05, 1], [-1, 0]].  gamma 0.5: G = [[-0.05 + 0.5 * 1, 1], [-1, 0]] = [[0.45, 1], [-1, 0]].
    # whiten over the 3 real tokens: mean 0.15, var = (0.09 + 0.7225 + 1.3225) / 3 = 0.711667, std 0.843604:
    # A = [[0.355618, 1.007582], [-1.363200, 0]].
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    exp = SimpleNamespace(scores=torch.tensor([1.0, -1.0]), logprobs=torch.tensor([[0.0, 0.0], [0.0, 0.0]]),
                          ref_logprobs=torch.tensor([[-0.5, 0.0], [0.0, 0.0]]), action_mask=mask, values=None)
    compute_advantages(exp, _cfg(algo="reinforce_pp", gamma=0.5, num_generations=1))
    std = math.sqrt(0.711667)
    assert close(exp.returns, [[0.45, 1.0], [-1.0, 0.0]])
    assert close(exp.advantages, [[0.3 / std, 0.85 / std], [-1.15 / std, 0.0]], atol=1e-5)
    adv, _ = reinforce_pp_advantages(torch.tensor([[0.0, 1.0]]), torch.ones(1, 2))
    assert close(adv, [[0.0, 0.0]])  # G = [1, 1]: no spread, nothing to learn


# ------------------------------------------------------------------ entropy bonus
def test_entropy_bonus_forward_and_backward():
    # zero advantages and ratio 1: the surrogate is 0. loss = -0.01 * token mean of [1, 2, 3, 4] = -0.025,
    # d loss / d entropy = -0.01 / 4 on each token.
    ent = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    mb = SimpleNamespace(logprobs=torch.zeros(2, 2), ref_logprobs=None, advantages=torch.zeros(2),
                         action_mask=torch.ones(2, 2))
    logp = torch.zeros(2, 2, requires_grad=True)
    loss, _ = policy_loss(mb, logp, _cfg(entropy_coeff=0.01), entropy=ent)
    assert loss.item() == pytest.approx(-0.025)
    loss.backward()
    assert close(ent.grad, torch.full((2, 2), -0.0025))
    with pytest.raises(ValueError, match="--entropy_coeff needs the entropy"):
        policy_loss(mb, logp, _cfg(entropy_coeff=0.01), entropy=ent.detach())


# ------------------------------------------------------------------ flags
def test_flags_map_to_the_peers_names(tmp_path):
    def cfg(**kw):
        c = RLHFConfig(actor_model_name_or_path=str(tmp_path), reward=["format"], algo="grpo", num_generations=2,
                       output_dir=str(tmp_path / "out"), **kw)
        c.validate()
        return c
    assert cfg(loss_type="dapo").loss_agg == "batch-token-mean"
    assert cfg(loss_type="dr_grpo").loss_agg == "seq-mean-token-sum-norm"
    assert cfg(loss_type="bnpo", loss_agg="token-mean").loss_agg == "token-mean"
    with pytest.raises(ConfigError, match="--loss_type grpo means --loss_agg seq-mean-token-mean, but --loss_agg "
                                          "token-mean was given"):
        cfg(loss_type="grpo", loss_agg="token-mean")
    c = cfg()
    assert c.cliprange_high is None and c.importance_sampling_level == "token" and c.entropy_coeff == 0.0
    assert kl_places(c) == (False, True, "k1", "k3")
    with pytest.raises(ConfigError, match="--algo reinforce has no importance ratio to clip"):
        RLHFConfig(actor_model_name_or_path=str(tmp_path), reward=["format"], algo="reinforce", num_generations=2,
                   importance_sampling_level="sequence", output_dir=str(tmp_path / "out")).validate()
    c = RLHFConfig(actor_model_name_or_path=str(tmp_path), reward=["format"], algo="reinforce_pp",
                   output_dir=str(tmp_path / "out"))
    c.validate()  # one sample per prompt is enough: the whitening is over the batch
    assert c.loss_agg == "token-mean"


# ------------------------------------------------------------------ what the trainer logs
class _FakeActor:
    """The engine calls the trainer makes; backward is autograd's, step applies nothing."""
    def train(self):
        pass

    def is_gradient_accumulation_boundary(self):
        return True

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def test_trainer_logs_the_update_side_statistics():
    # one micro-batch, the kept experience-time graph as the training forward; its log-probs differ from the
    # stored old ones by [0.1, -0.3] on row 0 (the third position is padding, garbage there is not seen)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, -0.3, 50.0], [0.0, 0.0, 0.0]], requires_grad=True)
    exp = Experience(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4), mask, 1, old, None, None,
                     torch.tensor([1.0, 0.0]), advantages=torch.tensor([1.0, -1.0]),
                     policy_graph=(logp, torch.ones(2, 3)))
    cfg = SimpleNamespace(enable_ema=False, max_bad_steps=3, stage_name="t", ppo_epochs=1, algo="grpo",
                          per_device_training_batch_size=2, loss_agg="token-mean", cliprange=0.2, beta=0.0,
                          kl_ctl=0.0, max_answer_seq_len=3, temperature=1.0, num_generations=2, length_groups=1)
    engines = SimpleNamespace(actor=_FakeActor(), critic=None)
    trainer = RLTrainer(cfg, engines, SimpleNamespace(log=None, device="cpu"))
    stats = trainer.train_on([exp], step=1)
    assert stats["logprob_mismatch/train_mean"] == pytest.approx(0.4 / 5)
    assert stats["logprob_mismatch/train_max"] == pytest.approx(0.3)
    assert stats["ratio/max"] == pytest.approx(math.exp(0.1))
    assert stats["clipfrac/low"] == 0.0 and stats["clipfrac/high"] == 0.0 and stats["entropy"] == 1.0
    assert logp.grad is not None  # the update went through the kept graph


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("algo,flags", [
    # REINFORCE++ with one sample per prompt learns the test_critic_free rule (the number of "a" written)
    ("reinforce_pp", ["--per_device_generation_batch_size", "16", "--per_device_training_batch_size", "16"]),
    # every new option at once on GRPO: clip-higher, GSPO, DAPO aggregation, k2 KL in the reward, entropy bonus
    ("grpo", ["--num_generations", "4", "--per_device_generation_batch_size", "4", "--per_device_training_batch_size",
              "8", "--cliprange_high", "0.28", "--importance_sampling_level", "sequence", "--loss_type", "dapo",
              "--kl_in_reward", "--no-kl_in_loss", "--kl_estimator", "k2", "--kl_ctl", "0.01",
              "--entropy_coeff", "0.001", "--ppo_epochs", "2"]),
])
def test_new_options_train_end_to_end(algo, flags, tiny_model_dir, tmp_path, capsys):
    argv = ["--actor_model_name_or_path", tiny_model_dir, "--algo", algo, "--reward", "tests.test_critic_free:my_rule",
            "--data_path", "synthetic:150", "--data_split", "1,1,1", "--max_prompt_seq_len", "32",
            "--max_answer_seq_len", "8", "--min_answer_seq_len", "8", "--max_steps", "16", "--eval_prompts", "0",
            "--actor_learning_rate", "1e-2", "--lr_scheduler_type", "constant", *flags]
    summary = critic_free_run(argv, tmp_path / algo)
    assert f"{algo}: built actor, reference, rules" in capsys.readouterr().err  # the KL is in the reward
    history = summary["history"]
    watched = {"entropy", "clipfrac/low", "clipfrac/high", "ratio/mean", "ratio/max", "kl/in_reward",
               "logprob_mismatch/train_mean", "logprob_mismatch/train_max"}
    assert all(watched <= set(h) for h in history), set(history[0])
    # the first training forward runs on the experience's weights: log-probs agree up to float noise
    assert max(h["logprob_mismatch/train_max"] for h in history) < 1e-4
    rewards = [h["reward/mean"] for h in history]
    assert all(math.isfinite(r) for r in rewards)
    if algo == "reinforce_pp":
        # 16 steps, the last 4 against the first 4: over seeds 1-5 and 1234, with either sampler of the decode
        # loop, the rise was 1.75-4.1 (10 steps, last 3 against first 2, rose 0.2-1.2: a coin flip at +1.0)
        assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 1.0, rewards
