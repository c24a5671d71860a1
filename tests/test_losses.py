"""Tests of utils/losses.py and utils/policy_losses.py against numbers worked out by hand (arithmetic in the
comments)."""
import math

import pytest
import torch

from utils.losses import (
    entropy_from_logits, gather_last, gather_logprobs, last_token_index, masked_mean,
    masked_sum, masked_whiten, sft_loss,
)
from utils.policy_losses import (
    aggregate_loss, gae_advantages_and_returns, group_advantages, grpo_loss, kl_k3, kl_penalized_rewards,
    ppo_policy_loss, reinforce_loss, rloo_advantages, value_loss,
)


def close(a, b, atol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=atol)


# ----------------------------------------------------------------------------- masked reductions
def test_masked_mean_sum_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert close(masked_sum(x, m), 1 + 2 + 3)
    assert close(masked_mean(x, m), (1 + 2 + 3) / 3)
    assert close(masked_mean(x, m, dim=1), [(1 + 2) / 2, 3 / 1])
    assert close(masked_mean(x, torch.zeros_like(m)), 0.0)  # empty mask: 0, not nan
    # masked elements 1, 2, 3: mean 2, population var ((1)^2 + 0 + 1^2) / 3 = 2/3
    w = masked_whiten(x, m, eps=0.0)
    s = math.sqrt(2 / 3)
    assert close(w, [[-1 / s, 0.0, 0.0], [1 / s, 0.0, 0.0]], atol=1e-5)
    w2 = masked_whiten(x, m, shift_mean=False, eps=0.0)
    assert close(w2, [[-1 / s + 2, 2.0, 0.0], [1 / s + 2, 0.0, 0.0]], atol=1e-5)


# ----------------------------------------------------------------------------- log-probs / entropy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_gather_logprobs_matches_log_softmax(dtype, chunk_size):
    g = torch.Generator().manual_seed(0)
    logits_f32 = torch.randn(2, 7, 50, generator=g) * 3
    logits = logits_f32.to(dtype)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out = gather_logprobs(logits, labels, chunk_size=chunk_size)
    assert out.dtype == torch.float32 and out.shape == (2, 7)
    assert torch.allclose(out, ref, atol=1e-5)
    # bf16 rounds logits of size ~10 by up to ~0.03, so vs. the unrounded logits allow 0.1
    ref_f32 = torch.log_softmax(logits_f32, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(out, ref_f32, atol=1e-5 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gather_logprobs_backward_matches_log_softmax_autograd(dtype, tol, chunk_size):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 5, 40, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 40, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g)
    (gather_logprobs(logits, labels, chunk_size=chunk_size) * weights).sum().backward()
    ours, logits.grad = logits.grad, None
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (ref * weights).sum().backward()
    assert ours.dtype == dtype and torch.allclose(ours.float(), logits.grad.float(), atol=tol)


def test_gather_logprobs_gradient_and_known_value():
    # V = 3, logits (0, 0, ln 2): p = (1, 1, 2) / 4 -> log p(label 2) = ln 0.5, log p(label 0) = ln 0.25
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [0.0, 0.0, math.log(2)]]], requires_grad=True)
    out = gather_logprobs(logits, torch.tensor([[2, 0]]), chunk_size=1)
    assert close(out, [[math.log(0.5), math.log(0.25)]])
    out.sum().backward()
    # d log p_y / d l = onehot(y) - p
    assert close(logits.grad, [[[-0.25, -0.25, 0.5], [0.75, -0.25, -0.5]]])


def test_entropy_from_logits():
    # position 0: uniform over V = 8 -> H = ln 8
    # position 1: two equal logits, the other six at -1e4 (p = e^-1e4 = 0) -> p = (1/2, 1/2) -> H = ln 2
    logits = torch.zeros(1, 2, 8)
    logits[0, 1] = torch.tensor([0.0, 0.0] + [-1e4] * 6)
    h = entropy_from_logits(logits.bfloat16(), chunk_size=1)
    assert h.dtype == torch.float32
    assert close(h, [[math.log(8), math.log(2)]], atol=1e-5)


# ----------------------------------------------------------------------------- last token
def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [1, 2, 3]
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(left).tolist() == [3, 3, 3]
    values = torch.tensor([[10.0, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
    assert gather_last(values, right).tolist() == [11.0, 22.0, 33.0]
    assert gather_last(values, left).tolist() == [13.0, 23.0, 33.0]


def test_last_token_index_pad_equals_eos():
    # pad id == eos id == 2. Row "5 6 </s> <pad> <pad>" -> ids 5 6 2 2 2; the first 2 is a real EOS.
    # A token-id heuristic ("first pad - 1") would say 1; the mask says 2.
    ids = torch.tensor([[5, 6, 2, 2, 2], [2, 2, 7, 8, 2]])  # row 2: left-padded, ends with its EOS
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    idx = last_token_index(mask)
    assert idx.tolist() == [2, 4]
    assert ids.gather(1, idx[:, None]).squeeze(1).tolist() == [2, 2]


# ----------------------------------------------------------------------------- SFT
def test_sft_loss_uniform_and_masked():
    V = 5
    logits = torch.zeros(2, 4, V)
    labels = torch.tensor([[-100, 3, 4, -100], [-100, -100, 1, 2]])
    # shifted targets: row0 (3, 4, -), row1 (-, 1, 2) -> 4 tokens, each with p = 1/5 -> loss = ln 5
    loss, n = sft_loss(logits, labels)
    assert int(n) == 4 and close(loss, math.log(V))
    # the last position has no target: changing its logits changes nothing
    logits[:, -1] = torch.randn(2, V)
    # logits[0, 0] predicts labels[0, 1] = 3; give token 3 logit ln 4: p = 4 / (4 + 4) = 0.5 -> nll ln 2
    logits[0, 0, 3] = math.log(4)
    loss, n = sft_loss(logits, labels)
    assert int(n) == 4 and close(loss, (math.log(2) + 3 * math.log(5)) / 4)
    # nothing to predict -> 0, not nan
    loss, n = sft_loss(logits, torch.full((2, 4), -100))
    assert int(n) == 0 and close(loss, 0.0)


# ----------------------------------------------------------------------------- KL-shaped rewards
def test_kl_penalized_rewards_known_sequence():
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0, -9.0], [-2.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])  # row0: EOS at position 2
    scores = torch.tensor([10.0, -7.0, 3.0])
    out = kl_penalized_rewards(lp, ref, scores, mask, kl_ctl=0.1, clip_reward_value=5.0)
    # row0: lp - ref = (0.5, 0, -1, masked) -> -0.1 * that = (-0.05, 0, 0.1); score 10 clipped to 5 at pos 2
    # row1: lp - ref = (1, 0) -> (-0.1, 0); score -7 clipped to -5 at pos 1
    # row2: empty response -> nothing anywhere
    expected = torch.tensor([[-0.05, 0.0, 0.1 + 5.0, 0.0], [-0.1, -5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert close(out, expected)


# ----------------------------------------------------------------------------- GAE
REW = [0.1, 0.0, -0.2, 1.0]
VAL = [0.5, 0.4, 0.3, 0.2]


def test_gae_gamma_one():
    # gamma = 1, lam = 0.95, bootstrap after the last token = 0
    # deltas: d3 = 1.0 + 0 - 0.2 = 0.8; d2 = -0.2 + 0.2 - 0.3 = -0.3
    #         d1 = 0 + 0.3 - 0.4 = -0.1; d0 = 0.1 + 0.4 - 0.5 = 0
    a3 = 0.8
    a2 = -0.3 + 0.95 * a3  # 0.46
    a1 = -0.1 + 0.95 * a2  # 0.337
    a0 = 0.0 + 0.95 * a1  # 0.32015
    adv, ret = gae_advantages_and_returns(torch.tensor([REW]), torch.tensor([VAL]), torch.ones(1, 4), 1.0, 0.95)
    assert close(adv, [[0.32015, 0.337, 0.46, 0.8]]) and close(adv, [[a0, a1, a2, a3]])
    assert close(ret, [[0.32015 + 0.5, 0.337 + 0.4, 0.46 + 0.3, 0.8 + 0.2]])


def test_gae_gamma_point_nine_with_padding():
    # gamma = 0.9, lam = 0.95 -> gamma * lam = 0.855
    # d3 = 1.0 - 0.2 = 0.8; d2 = -0.2 + 0.9 * 0.2 - 0.3 = -0.32; d1 = 0.9 * 0.3 - 0.4 = -0.13
    # d0 = 0.1 + 0.9 * 0.4 - 0.5 = -0.04
    a3 = 0.8
    a2 = -0.32 + 0.855 * a3  # 0.364
    a1 = -0.13 + 0.855 * a2  # 0.18122
    a0 = -0.04 + 0.855 * a1  # 0.1149431
    # 6 positions, last two past EOS with garbage rewards/values: they must not bootstrap
    rewards = torch.tensor([REW + [7.0, -3.0]])
    values = torch.tensor([VAL + [9.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    adv, ret = gae_advantages_and_returns(rewards, values, mask, 0.9, 0.95)
    assert close(adv, [[0.1149431, 0.18122, 0.364, 0.8, 0.0, 0.0]]) and close(adv[0, :4], [a0, a1, a2, a3])
    assert close(ret, [[a0 + 0.5, a1 + 0.4, a2 + 0.3, a3 + 0.2, 0.0, 0.0]])


# ----------------------------------------------------------------------------- PPO policy / value
def test_ppo_clip_cases_and_gradients():
    eps = 0.2
    old = torch.zeros(1, 4)
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +1, -1, -1, +1
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    loss, stats = ppo_policy_loss(lp, old, adv, torch.ones(1, 4), eps)
    # t0: max(-1.5, -1.2) = -1.2 (clipped)   t1: max(0.5, 0.8) = 0.8 (clipped)
    # t2: max(1.5, 1.2) = 1.5 (unclipped)    t3: max(-0.5, -0.8) = -0.5 (unclipped)
    assert close(loss, (-1.2 + 0.8 + 1.5 - 0.5) / 4)
    assert close(stats["clipfrac"], 2 / 4)
    assert close(stats["ratio_mean"], (1.5 + 0.5 + 1.5 + 0.5) / 4)
    loss.backward()
    # d(-A * ratio)/d lp = -A * ratio, / 4 tokens; clipped tokens have zero gradient
    assert close(lp.grad, [[0.0, 0.0, 1.5 / 4, -0.5 / 4]])


def test_ppo_identical_logprobs():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    adv = torch.tensor([[0.5, -1.0, 2.0], [3.0, 1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = ppo_policy_loss(lp, lp.clone(), adv, mask, 0.2)
    # ratio exactly 1 -> loss = -mean(A over masked) = -(0.5 - 1 + 2 + 3 + 1) / 5 = -1.1
    assert close(loss, -1.1) and float(stats["ratio_mean"]) == 1.0
    assert float(stats["approx_kl"]) == 0.0 and float(stats["clipfrac"]) == 0.0


def test_ppo_approx_kl_value():
    # one token, new logp = ln 2, old = 0 -> ratio 2: k3(old vs new) = ratio - 1 - ln ratio = 1 - ln 2
    one = torch.ones(1, 1)
    _, stats = ppo_policy_loss(torch.tensor([[math.log(2)]]), torch.zeros(1, 1), one, one, 0.2)
    assert close(stats["approx_kl"], 1 - math.log(2))


def test_value_loss_clip():
    values = torch.tensor([[1.0, 2.0, 50.0]])
    old = torch.tensor([[0.5, 2.0, -50.0]])
    returns = torch.tensor([[2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, clipfrac = value_loss(values, old, returns, mask, 0.2)
    # t0: (1 - 2)^2 = 1; clip(1, 0.3, 0.7) = 0.7 -> (0.7 - 2)^2 = 1.69 -> max 1.69 (clipped)
    # t1: (2 - 3)^2 = 1; clip(2, 1.8, 2.2) = 2 -> 1 -> max 1 (not clipped); t2 masked
    assert close(loss, 0.5 * (1.69 + 1.0) / 2)  # 0.6725
    assert close(clipfrac, 0.5)


def test_kl_k3():
    x = torch.tensor([-1.0, -0.3, -5.0])
    assert (kl_k3(x, x) == 0).all()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(100, generator=g), torch.randn(100, generator=g)
    assert (kl_k3(a, b) >= 0).all() and (kl_k3(a, b)[a != b] > 0).all()
    # logp = -1, ref = -2: d = -1 -> e^-1 - (-1) - 1 = e^-1 = 0.3678794
    assert close(kl_k3(torch.tensor(-1.0), torch.tensor(-2.0)), math.exp(-1))


# ----------------------------------------------------------------------------- group advantages
def test_group_advantages():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4)
    # group 1: mean 0.5, unbiased std = sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.57735 -> +-0.5 / (0.57735 + 1e-4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # 0.865875
    assert close(adv, [a, -a, -a, a, 0.0, 0.0, 0.0, 0.0], atol=1e-5)
    assert close(group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, scale_by_std=False), [0.5, -0.5, -0.5, 0.5])


def test_rloo_advantages():
    # r_i - mean(others): 1 - (2 + 3)/2 = -1.5; 2 - (1 + 3)/2 = 0; 3 - (1 + 2)/2 = 1.5
    assert close(rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 3), [1 - 2.5, 2 - 2.0, 3 - 1.5])
    assert close(rloo_advantages(torch.tensor([1.0, 2.0, 5.0, 5.0]), 2), [-1.0, 1.0, 0.0, 0.0])


# ----------------------------------------------------------------------------- GRPO / REINFORCE
def _grpo_batch():
    # two sequences of unequal length: 3 tokens and 1 token
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    old = torch.zeros(2, 3)
    lp = torch.log(torch.tensor([[1.5, 1.0, 1.0], [1.0, 1.0, 1.0]]))  # ratio 1.5 on token (0, 0)
    adv = torch.tensor([1.0, -2.0])
    return lp, old, adv, mask


def test_grpo_loss_beta_zero_equals_ppo_formula():
    lp, old, adv, mask = _grpo_batch()
    # per-token: (0,0) max(-1.5, -1.2) = -1.2; (0,1), (0,2) = -1; (1,0) = -(-2) * 1 = 2
    loss, stats = grpo_loss(lp, old, None, adv, mask, 0.2, 0.0, loss_agg="token-mean")
    assert close(loss, (-1.2 - 1 - 1 + 2) / 4)  # -0.3
    ppo, _ = ppo_policy_loss(lp, old, adv[:, None].expand(2, 3), mask, 0.2)
    assert close(loss, ppo) and close(stats["clipfrac"], 1 / 4)


def test_grpo_loss_aggregations_differ():
    lp, old, adv, mask = _grpo_batch()
    per_agg = {agg: float(grpo_loss(lp, old, None, adv, mask, 0.2, 0.0, agg, max_len=4)[0])
               for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")}
    # token-mean: (-1.2 - 1 - 1 + 2) / 4 = -0.3
    # seq-mean-token-mean: seq0 = -3.2 / 3, seq1 = 2 -> (-3.2/3 + 2) / 2 = 0.4666667
    # seq-mean-token-sum-norm (max_len 4): (-3.2 / 4 + 2 / 4) / 2 = -0.15
    assert close(per_agg["token-mean"], -0.3)
    assert close(per_agg["seq-mean-token-mean"], (-3.2 / 3 + 2) / 2)
    assert close(per_agg["seq-mean-token-sum-norm"], -0.15)
    # an empty row is ignored by seq-mean-token-mean, counted (as 0) by the sum-norm variant
    lp2, old2 = torch.cat([lp, lp[:1]]), torch.cat([old, old[:1]])
    mask2, adv2 = torch.cat([mask, torch.zeros(1, 3, dtype=mask.dtype)]), torch.cat([adv, adv[:1]])
    assert close(grpo_loss(lp2, old2, None, adv2, mask2, 0.2, 0.0, "seq-mean-token-mean")[0], (-3.2 / 3 + 2) / 2)
    assert close(grpo_loss(lp2, old2, None, adv2, mask2, 0.2, 0.0, "seq-mean-token-sum-norm", 4)[0],
                 (-3.2 / 4 + 2 / 4 + 0) / 3)  # -0.1
    with pytest.raises(ValueError):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "mean")


def test_grpo_loss_adds_beta_k3():
    lp, old, adv, mask = _grpo_batch()
    ref = lp.clone()
    ref[0, 1] = lp[0, 1] - 1.0  # d = ref - lp = -1 -> k3 = e^-1 on that token only
    loss, stats = grpo_loss(lp, old, ref, adv, mask, 0.2, 0.5, loss_agg="token-mean")
    # token-mean: (-1.2 - 1 - 1 + 2 + 0.5 * e^-1) / 4
    assert close(loss, (-1.2 - 1 - 1 + 2 + 0.5 * math.exp(-1)) / 4)
    assert close(stats["kl"], math.exp(-1) / 4)
    with pytest.raises(ValueError):
        grpo_loss(lp, old, None, adv, mask, 0.2, 0.5)


def test_reinforce_loss():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -4.0]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, _ = reinforce_loss(lp, adv, mask)
    # -A * lp: row0 (2, 4, masked), row1 (-0.5, -4, -4) -> (2 + 4 - 0.5 - 4 - 4) / 5 = -0.5
    assert close(loss, -0.5)
    loss.backward()
    assert close(lp.grad, [[-2 / 5, -2 / 5, 0.0], [1 / 5, 1 / 5, 1 / 5]])
    ref = lp.detach() - torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # k3 = e^-1 on token (0, 0)
    loss_kl, stats = reinforce_loss(lp, adv, mask, ref_logprobs=ref, beta=0.1)
    assert close(loss_kl, -0.5 + 0.1 * math.exp(-1) / 5) and close(stats["kl"], math.exp(-1) / 5)


# ----------------------------------------------------------------------------- masking after EOS
def test_masked_positions_change_no_loss():
    g = torch.Generator().manual_seed(3)
    B, T = 3, 5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    t = {k: torch.randn(B, T, generator=g) for k in ("lp", "old", "ref", "adv", "val", "oldv", "ret", "rew")}
    scores, seq_adv = torch.randn(B, generator=g), torch.randn(B, generator=g)

    def all_losses(d):
        out = [ppo_policy_loss(d["lp"], d["old"], d["adv"], mask, 0.2)[0],
               value_loss(d["val"], d["oldv"], d["ret"], mask, 0.2)[0],
               kl_penalized_rewards(d["lp"], d["ref"], scores, mask, 0.1, 5.0),
               *gae_advantages_and_returns(d["rew"], d["val"], mask, 0.9, 0.95),
               reinforce_loss(d["lp"], seq_adv, mask, ref_logprobs=d["ref"], beta=0.1)[0],
               masked_whiten(d["adv"], mask)]
        for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            out.append(grpo_loss(d["lp"], d["old"], d["ref"], seq_adv, mask, 0.2, 0.1, agg, max_len=T)[0])
            out.append(ppo_policy_loss(d["lp"], d["old"], d["adv"], mask, 0.2, agg, max_len=T)[0])
        return out

    base = all_losses(t)
    garbage = {k: torch.where(mask.bool(), v, torch.full_like(v, 30.0) * (1 + torch.rand(B, T, generator=g)))
               for k, v in t.items()}
    for a, b in zip(base, all_losses(garbage)):
        assert torch.allclose(a, b, atol=1e-6)


def test_huge_gaps_at_masked_positions_give_finite_hand_gradients():
    # Row of 2 tokens, the second masked (after EOS) and holding a log-prob gap of 1e4: exp(1e4) = inf there
    # would make the backward 0 * inf = nan although the forward masks it out.
    mask = torch.tensor([[1.0, 0.0]])
    # PPO: old log-prob -1e4 at the masked token (ratio exp(+1e4)); real token ratio exp(0.1) = 1.105171, inside
    # the clip range, so loss = -A r and d loss / d logp = -A r = -2 * 1.105171 = -2.210342 (token-mean, 1 token).
    lp = torch.tensor([[-1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -1e4]])
    loss, stats = ppo_policy_loss(lp, old, torch.tensor([[2.0, 2.0]]), mask, 0.2)
    loss.backward()
    assert close(loss, -2 * math.exp(0.1)) and close(stats["ratio_mean"], math.exp(0.1))
    assert torch.isfinite(lp.grad).all() and close(lp.grad, [[-2 * math.exp(0.1), 0.0]])
    # GRPO / REINFORCE k3 term: logp = -1e4 at the masked token (d = ref - logp = 1e4, expm1 = inf there).
    # Real token: d = ln 2, so d k3 / d logp = -(e^d - 1) = -1; ratio 1 (old = logp), A = 1:
    # d loss / d logp = -A + beta * (-1) = -1 - 0.1 = -1.1 for both losses.
    for name in ("grpo", "reinforce"):
        lp = torch.tensor([[-1.0, -1e4]], requires_grad=True)
        ref = torch.tensor([[-1.0 + math.log(2.0), 0.0]])
        adv = torch.tensor([1.0])
        if name == "grpo":
            loss, stats = grpo_loss(lp, None, ref, adv, mask, 0.2, 0.1, "token-mean")
        else:
            loss, stats = reinforce_loss(lp, adv, mask, "token-mean", ref_logprobs=ref, beta=0.1)
        loss.backward()
        assert torch.isfinite(lp.grad).all(), name
        assert close(lp.grad, [[-1.1, 0.0]]), name
        assert close(stats["kl"], 1 - math.log(2.0)), name  # k3 = 2 - ln 2 - 1 on the one real token


def test_kl_k3_with_a_mask_is_zero_where_masked():
    logp, ref = torch.tensor([[-1.0, -1e4]]), torch.tensor([[-2.0, 0.0]])
    kl = kl_k3(logp, ref, torch.tensor([[1.0, 0.0]]))
    assert close(kl, [[math.exp(-1), 0.0]])  # e^-1 - (-1) - 1 = e^-1 on the real token
    assert torch.isinf(kl_k3(logp, ref)[0, 1])  # without the mask the masked gap overflows
