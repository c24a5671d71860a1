"""Tests of utils/preference_losses.py against numbers worked out by hand (arithmetic in the comments), forward
and backward: the pairwise reward-model loss, sequence log-probs, DPO / cDPO / IPO and the implicit rewards."""
import math

import pytest
import torch

from utils.preference_losses import (divergence_pairwise_loss, dpo_loss, implicit_rewards, pairwise_accuracy,
                                     pairwise_reward_loss, sequence_logprobs)

LN2, LN3 = math.log(2.0), math.log(3.0)
SIG = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731


def close(a, b, atol=1e-6):
    return abs(float(torch.as_tensor(a).detach()) - float(b)) <= atol


# ----------------------------------------------------------------------------- reward model
def test_divergence_loss_by_hand():
    """DeepSpeed-Chat's loss: positions from the first difference to the end of the longer reply."""
    L = lambda x: math.log(1 + math.exp(-x))  # noqa: E731  -log sigmoid(x)
    # pair 0: prompt [5, 6], chosen reply [7, 8, 2] (length 5), rejected reply [9, 2] (length 4, 1 pad).
    # They differ first at column 2; the longer ends at 5 -> columns 2, 3, 4. The rejected row's value is held
    # at its last token (column 3, value 0.5) on column 4: diffs 1.0 - 0.0, 2.0 - 0.5, 3.0 - 0.5.
    # pair 1: identical rows of length 3 (prompt [5], reply [7, 2]): only the last column, 1.5 - 1.5 = 0.
    ids_c = torch.tensor([[5, 6, 7, 8, 2], [5, 7, 2, 0, 0]])
    ids_r = torch.tensor([[5, 6, 9, 2, 0], [5, 7, 2, 0, 0]])
    mask_c = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    mask_r = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    v_c = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0], [9.0, 9.0, 1.5, 7.0, 7.0]], requires_grad=True)
    v_r = torch.tensor([[9.0, 9.0, 0.0, 0.5, -8.0], [9.0, 9.0, 1.5, -7.0, -7.0]], requires_grad=True)
    loss = divergence_pairwise_loss(v_c, v_r, ids_c, ids_r, mask_c, mask_r)
    pair0 = (L(1.0) + L(1.5) + L(2.5)) / 3
    pair1 = LN2
    assert close(loss, (pair0 + pair1) / 2)
    loss.backward()
    # d/dx -log sigmoid(x) = -(1 - sigmoid(x)); pair 0 is averaged over 3 columns, the batch over 2 pairs
    assert close(v_c.grad[0, 2], -(1 - SIG(1.0)) / 6)
    assert close(v_c.grad[0, 0], 0.0) and close(v_r.grad[0, 4], 0.0)  # the shared prompt and padding: no gradient
    # the held value (rejected column 3) gets the gradient of columns 3 and 4
    assert close(v_r.grad[0, 3], ((1 - SIG(1.5)) + (1 - SIG(2.5))) / 6)
    assert close(v_c.grad[1, 2], -0.5 / 2) and close(v_c.grad[1, 1], 0.0)


def test_pairwise_loss_and_accuracy():
    c, r = torch.tensor([1.0]), torch.tensor([0.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617
    assert close(pairwise_reward_loss(c, r), math.log(1 + math.exp(-1)))
    # centering adds 0.1 * (1 + 0)^2
    assert close(pairwise_reward_loss(c, r, center_coef=0.1), math.log(1 + math.exp(-1)) + 0.1)
    # pairs: 1 > 0 right, tie wrong, 2 < 3 wrong -> 1/3; a tie counting half -> (1 + 0.5) / 3
    chosen, rejected = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, 0.5, 3.0])
    assert close(pairwise_accuracy(chosen, rejected), 1 / 3)
    assert close(pairwise_accuracy(chosen, rejected, tie=0.5), 0.5)


# ----------------------------------------------------------------------------- sequence log-probs
def toy_logits():
    """[1, 3, 2]: position 0 uniform (p(1) = 1/2), position 1 logits (ln 3, 0) (p(1) = 1/4), position 2 garbage
    (it would predict a token after the end: never scored)."""
    return torch.tensor([[[0.0, 0.0], [LN3, 0.0], [1e4, -1e4]]], requires_grad=True)


def test_sequence_logprobs_sum_mean_and_mask():
    ids = torch.tensor([[0, 1, 1]])
    logits = toy_logits()
    # tokens 1 and 2 are the response: log 1/2 + log 1/4 = -ln 8
    total = sequence_logprobs(logits, ids, torch.tensor([[0, 1, 1]]))
    assert total.shape == (1,) and close(total[0], -3 * LN2)
    assert close(sequence_logprobs(logits, ids, torch.tensor([[0, 1, 1]]), average=True)[0], -1.5 * LN2)
    # only the last token: -ln 4; position 0 has no prediction, so marking it changes nothing
    assert close(sequence_logprobs(logits, ids, torch.tensor([[0, 0, 1]]))[0], -2 * LN2)
    assert close(sequence_logprobs(logits, ids, torch.tensor([[1, 1, 1]]))[0], -3 * LN2)
    # nothing marked: 0, and the mean is 0 too (not nan)
    assert close(sequence_logprobs(logits, ids, torch.tensor([[0, 0, 0]]), average=True)[0], 0.0)


def test_sequence_logprobs_gradient_is_onehot_minus_softmax_on_scored_positions():
    ids = torch.tensor([[0, 1, 1]])
    logits = toy_logits()
    sequence_logprobs(logits, ids, torch.tensor([[0, 1, 1]])).sum().backward()
    # d log p(1) / d logits = onehot(1) - p: position 0 (1/2, 1/2) -> (-1/2, 1/2); position 1 (3/4, 1/4) ->
    # (-3/4, 3/4); position 2 is not scored -> 0 (its garbage logits give no nan either)
    expected = torch.tensor([[[-0.5, 0.5], [-0.75, 0.75], [0.0, 0.0]]])
    assert torch.allclose(logits.grad, expected, atol=1e-6)


# ----------------------------------------------------------------------------- DPO and its variants
def policy(*values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def ref(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_sigmoid_forward_backward_and_rewards():
    # pair 0: h = (-1 - -2) - (-3 - -2) = 2, beta h = 1 -> log(1 + e^-1) = 0.3132617
    # pair 1: everything equal -> h = 0 -> log 2 (a tie)
    pc, pr = policy(-1.0, -1.0), policy(-3.0, -1.0)
    loss, stats = dpo_loss(pc, pr, ref(-2.0, -1.0), ref(-2.0, -1.0), beta=0.5)
    assert close(loss, (math.log(1 + math.exp(-1)) + LN2) / 2)
    loss.backward()
    # d/d pc of -log sigmoid(beta h) = -beta sigmoid(-beta h); halved by the mean over 2 pairs
    assert close(pc.grad[0], -0.5 * SIG(-1.0) / 2) and close(pc.grad[1], -0.5 * 0.5 / 2)
    assert close(pr.grad[0], 0.5 * SIG(-1.0) / 2) and close(pr.grad[1], 0.5 * 0.5 / 2)
    # implicit rewards: chosen (0.5 * 1, 0) -> mean 0.25; rejected (0.5 * -1, 0) -> -0.25; margins 0.5;
    # accuracies: a win and a tie -> (1 + 0.5) / 2
    assert close(stats["rewards/chosen"], 0.25) and close(stats["rewards/rejected"], -0.25)
    assert close(stats["rewards/margins"], 0.5) and close(stats["rewards/accuracies"], 0.75)
    assert all(not v.requires_grad for v in stats.values())


def test_cdpo_label_smoothing_forward_backward():
    pc, pr = policy(-1.0), policy(-3.0)
    args = (ref(-2.0), ref(-2.0))
    # beta h = 1: 0.9 log(1 + e^-1) + 0.1 log(1 + e^1) = 0.28193553 + 0.13132617 = 0.4132617
    loss, _ = dpo_loss(pc, pr, *args, beta=0.5, loss_type="cdpo", label_smoothing=0.1)
    assert close(loss, 0.4132617, atol=1e-6)
    loss.backward()
    # d/d pc = beta (-0.9 sigmoid(-1) + 0.1 sigmoid(1)) = 0.5 (-0.24204728 + 0.07310586) = -0.08447071
    assert close(pc.grad[0], -0.08447071) and close(pr.grad[0], 0.08447071)
    # DeepSpeed-Chat's sigmoid loss carries the same smoothing: "sigmoid" with label_smoothing is cDPO
    same, _ = dpo_loss(pc, pr, *args, beta=0.5, loss_type="sigmoid", label_smoothing=0.1)
    assert close(same, loss)
    # with smoothing a tie is still pushed apart: d/d pc at h = 0 is beta (-0.9 + 0.1) / 2 = -0.2
    pc0 = policy(-1.0)
    dpo_loss(pc0, policy(-1.0), ref(-1.0), ref(-1.0), beta=0.5, loss_type="cdpo", label_smoothing=0.1)[0].backward()
    assert close(pc0.grad[0], -0.2)


def test_ipo_regresses_the_margin_to_one_over_two_beta():
    # beta 0.5: target h = 1 / (2 beta) = 1; h = 2 -> (2 - 1)^2 = 1, d/d pc = 2 (h - 1) = 2, d/d pr = -2
    pc, pr = policy(-1.0), policy(-3.0)
    loss, stats = dpo_loss(pc, pr, ref(-2.0), ref(-2.0), beta=0.5, loss_type="ipo")
    assert close(loss, 1.0)
    loss.backward()
    assert close(pc.grad[0], 2.0) and close(pr.grad[0], -2.0)
    assert close(stats["rewards/margins"], 1.0)  # beta h, whatever the loss
    # at the target the loss and its gradient vanish (sigmoid DPO would keep pushing)
    pc = policy(-1.0)
    loss, _ = dpo_loss(pc, policy(-2.0), ref(-2.0), ref(-2.0), beta=0.5, loss_type="ipo")
    loss.backward()
    assert close(loss, 0.0) and close(pc.grad[0], 0.0)


def test_reference_gets_no_gradient_and_bad_options_are_refused():
    pc, pr, rc, rr = (policy(v) for v in (-1.0, -3.0, -2.0, -2.0))
    loss, _ = dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=0.1)
    loss.backward()
    assert rc.grad is None and pc.grad is not None
    assert close(implicit_rewards(torch.tensor(-1.0), torch.tensor(-3.0), 0.1), 0.2)
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="IPO has no label smoothing"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo", label_smoothing=0.1)
