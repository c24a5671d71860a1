"""Loss math on preference pairs, as pure torch functions: the pairwise reward model (step 2) and DPO and its
variants (step2_dpo), tested against values computed by hand (tests/test_preference_losses.py).

DPO (Rafailov et al. 2023) trains the policy pi on pairs (prompt x, chosen y_w, rejected y_l) against a frozen
reference pi_ref. With the sequence log-probs log pi(y|x) (summed over the response tokens only) it defines
    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
and the implicit reward of a reply, r(y) = beta * (log pi(y|x) - log pi_ref(y|x)), so beta * h = r(y_w) - r(y_l).
  sigmoid (DPO):  -log sigmoid(beta * h)
  cdpo (conservative DPO, label smoothing eps: a label is flipped with probability eps):
                  -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)
  ipo (Azar et al. 2023): (h - 1 / (2 beta))^2, on log-probs averaged over the response tokens (as the paper
                  and TRL do), which regresses the margin to a fixed target instead of pushing it to infinity.
"""
import torch
import torch.nn.functional as F

from utils.losses import gather_logprobs, last_token_index, masked_sum

DPO_LOSS_TYPES = ("sigmoid", "ipo", "cdpo")


# ----------------------------------------------------------------------------- the pairwise reward model
def pairwise_reward_loss(chosen_scores, rejected_scores, center_coef=0.0):
    """Bradley-Terry loss mean(-log sigmoid(c - r)) + center_coef * mean((c + r)^2).

    The centering term only penalises c + r, so the preference margin is untouched while scores
    are kept near 0 (reward models are otherwise free to drift by any constant).
    """
    return -F.logsigmoid(chosen_scores - rejected_scores).mean() + center_penalty(chosen_scores, rejected_scores,
                                                                                   center_coef)


def center_penalty(chosen_scores, rejected_scores, center_coef):
    """center_coef * mean((c + r)^2): keeps the scores near 0 without touching their margin (0 when the coef is)."""
    return center_coef * ((chosen_scores + rejected_scores) ** 2).mean() if center_coef else 0.0


def divergence_pairwise_loss(chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_mask,
                             rejected_mask):
    """DeepSpeed-Chat's reward-model loss: -log sigmoid(v_c(t) - v_r(t)) averaged over every position t from
    where the two sequences first differ to the end of the longer one, then over the pairs.

    values/ids/mask [B, T], right-padded, a pair's chosen and rejected rows aligned at column 0 (they share the
    prompt); a row's end is its last masked position (utils.losses.last_token_index). Past its last token a
    sequence's value is held at its last one (its score): DeepSpeed-Chat reads the model's values on padding
    tokens there, which depend on what the model does with padding. Identical rows compare their last position
    only. Every reply position learns to predict the preference (a value
    function's target), not only the one token the score is read from."""
    B, T = chosen_values.shape
    pos = torch.arange(T, device=chosen_values.device).expand(B, T)
    last_c, last_r = last_token_index(chosen_mask), last_token_index(rejected_mask)
    end = torch.maximum(last_c, last_r) + 1
    differs = (chosen_ids != rejected_ids) | (chosen_mask != rejected_mask)
    first = torch.where(differs.any(-1), differs.int().argmax(-1), end - 1).clamp(max=end - 1)
    span = (pos >= first.unsqueeze(-1)) & (pos < end.unsqueeze(-1))
    held_c = chosen_values.gather(-1, torch.minimum(pos, last_c.unsqueeze(-1)))
    held_r = rejected_values.gather(-1, torch.minimum(pos, last_r.unsqueeze(-1)))
    per_pos = -F.logsigmoid(held_c.float() - held_r.float())
    return (masked_sum(per_pos, span, dim=-1) / span.sum(-1).clamp(min=1)).mean()


def pairwise_accuracy(chosen_scores, rejected_scores, tie=0.0):
    """Fraction of pairs with chosen strictly above rejected, plus `tie` x the fraction of ties (0: a tie
    counts as wrong, DeepSpeed-Chat's; 0.5: a tie counts half, as pair_credit)."""
    acc = (chosen_scores > rejected_scores).float().mean()
    return acc + tie * (chosen_scores == rejected_scores).float().mean() if tie else acc


def pair_credit(chosen: float, rejected: float) -> float:
    """One pair's share of the accuracy: 1 when chosen scores higher, 0.5 for a tie, 0 otherwise. A tie is
    not a wrong answer (a zero-initialised head ties every pair), so it counts half."""
    return 1.0 if chosen > rejected else (0.5 if chosen == rejected else 0.0)


def pairwise_outcomes(chosen, rejected) -> dict:
    """accuracy (a tie counts half), accuracy_strict (a tie counts wrong: DeepSpeed-Chat's), tie_fraction."""
    n = max(len(chosen), 1)
    ties = sum(float(c) == float(r) for c, r in zip(chosen, rejected))
    return {"accuracy": sum(pair_credit(float(c), float(r)) for c, r in zip(chosen, rejected)) / n,
            "accuracy_strict": sum(float(c) > float(r) for c, r in zip(chosen, rejected)) / n,
            "tie_fraction": ties / n}


# ----------------------------------------------------------------------------- DPO
def sequence_logprobs(logits, input_ids, loss_mask, average=False, chunk_size=None):
    """[B] float32: sum (average=True: mean) over the marked tokens of log p(token | the tokens before it).

    logits [B, T, V] of input_ids [B, T]; logits[:, t] predicts input_ids[:, t + 1] (the causal shift is done
    here). loss_mask [B, T] marks the tokens to score (the response, not the prompt or padding), on input_ids'
    positions; position 0 has no prediction and is never scored. A row with no marked token gives 0."""
    logp = gather_logprobs(logits[:, :-1], input_ids[:, 1:], chunk_size)
    mask = loss_mask[:, 1:]
    total = masked_sum(logp, mask, dim=-1)
    return total / mask.sum(-1).clamp(min=1).to(total.dtype) if average else total


def implicit_rewards(policy_logps, reference_logps, beta):
    """DPO's reward of a reply: beta * (log pi(y|x) - log pi_ref(y|x)), [B]."""
    return beta * (policy_logps - reference_logps)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid",
             label_smoothing=0.0):
    """Mean DPO / cDPO / IPO loss over B pairs from the four [B] sequence log-probs, and stats (detached 0-dim
    tensors): rewards/chosen, rewards/rejected, rewards/margins (means of the implicit rewards and of their
    difference) and rewards/accuracies (chosen's reward above rejected's; a tie counts half).

    loss_type "sigmoid" with label_smoothing > 0 is cDPO (DeepSpeed-Chat's step2_dpo has the smoothing in its
    sigmoid loss); "cdpo" names it. The gradient flows to the policy log-probs only: the reference's are
    constants (pass them detached or computed under no_grad)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("IPO has no label smoothing (label_smoothing applies to sigmoid/cdpo)")
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    with torch.no_grad():
        chosen = implicit_rewards(policy_chosen, ref_chosen, beta)
        rejected = implicit_rewards(policy_rejected, ref_rejected, beta)
        stats = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                 "rewards/margins": (chosen - rejected).mean(),
                 "rewards/accuracies": pairwise_accuracy(chosen, rejected, tie=0.5)}
    return losses.mean(), stats
