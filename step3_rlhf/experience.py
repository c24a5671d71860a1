"""Experience making: score the rollout's responses (step3_rlhf/rollout) with every model the algorithm needs.

The batch layout is the rollout's (rollout/base.py): prompts LEFT-padded to P tokens, responses RIGHT-padded
after them, `action_mask` [B, R] 1 up to and including each response's first EOS. Position ids always come
from the attention mask, so left padding never changes a log-prob. Everything here runs under no_grad; the
trainer recomputes what it trains on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from utils.losses import entropy_from_logits, gather_last, gather_logprobs
from utils.models import position_ids_from_mask
from utils.padding import run_row_groups

# response positions whose [B, chunk, V] logits are upcast to float32 at once (log-probs, entropy): 16 x 8 rows x
# a 49k vocabulary is a 25 MB float32 block instead of the 100 MB of all 64 positions of workload W
LOGIT_CHUNK = 16


@dataclass
class Experience:
    sequences: torch.Tensor          # [B, P+R]
    attention_mask: torch.Tensor     # [B, P+R]
    action_mask: torch.Tensor        # [B, R] float
    prompt_len: int                  # P
    logprobs: torch.Tensor           # [B, R] actor log-probs at generation time (the "old" policy)
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None      # [B, R] critic V(s_t), PPO only
    scores: torch.Tensor             # [B] total reward per sequence
    advantages: torch.Tensor | None = None   # [B, R] (PPO) or [B] (critic-free)
    returns: torch.Tensor | None = None
    responses: list = field(default_factory=list)
    prompts: list = field(default_factory=list)
    components: dict = field(default_factory=dict)
    # (logp, entropy) of the experience-time actor forward with its autograd graph kept, when that forward IS
    # the first update's forward (see ExperienceMaker.make_experience); None otherwise. Never copied by rows().
    policy_graph: tuple | None = field(default=None, repr=False)
    # [B, R] log-probs the rollout backend saw when sampling (the fast backend's; None from hf/hybrid), for the
    # rollout/experience mismatch stat; [B] bool: no EOS within --max_answer_seq_len (experience_stats.py)
    rollout_logprobs: torch.Tensor | None = None
    truncated: torch.Tensor | None = None

    def rows(self, idx):
        """A sub-batch of rows (for micro-batching); prompt/response width stays the same."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Experience(self.sequences[idx], self.attention_mask[idx], self.action_mask[idx], self.prompt_len,
                          self.logprobs[idx], pick(self.ref_logprobs), pick(self.values), self.scores[idx],
                          pick(self.advantages), pick(self.returns))


def response_logits(model, sequences, attention_mask, n_response, temperature=1.0):
    """Logits [B, R, V] that predict the R response tokens; the LM head runs on those positions only."""
    out = model(input_ids=sequences, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), logits_to_keep=n_response + 1, use_cache=False)
    logits = out.logits[:, :-1]
    return logits / temperature if temperature not in (0, 1) else logits


def response_logprobs(model, sequences, attention_mask, n_response, temperature=1.0, with_entropy=False,
                      row_chunk=None, prompt_len=None, group_size=1, length_groups=1, entropy_grad=False):
    """log p of the R response tokens [B, R] (float32), and their entropy with `with_entropy`.
    `row_chunk`: without autograd, run at most that many rows at a time (same numbers, less memory).
    `prompt_len` + `group_size`: rows come in groups of copies of one prompt (GRPO); each prompt is then run
    once per group (shared_prefix.shared_prefix_logits) where the model allows it. `length_groups`: run the rows
    in up to that many groups by length, each without its all-padding columns (utils.padding). `entropy_grad`: the
    entropy keeps its autograd graph (an entropy bonus; a [B, chunk, V] float32 softmax per chunk kept)."""
    from step3_rlhf.shared_prefix import shared_group, shared_prefix_logits

    def one(cut, mask, seq):
        P = prompt_len - cut if prompt_len else prompt_len
        g = shared_group(model, seq, mask, P, group_size)
        if g > 1:
            logits = shared_prefix_logits(model, seq, mask, P, n_response, g)
            logits = logits / temperature if temperature not in (0, 1) else logits
        else:
            logits = response_logits(model, seq, mask, n_response, temperature)
        logp = gather_logprobs(logits, seq[:, -n_response:], chunk_size=LOGIT_CHUNK)
        if with_entropy:
            return logp, entropy_from_logits(logits if entropy_grad else logits.detach(), chunk_size=LOGIT_CHUNK)
        return logp
    return run_row_groups(one, attention_mask, sequences, align=group_size, max_groups=length_groups,
                          row_chunk=row_chunk)


def response_values(critic, sequences, attention_mask, n_response, row_chunk=None, length_groups=1):
    """V(s_t) for each response token t: the critic's value at the position before it."""
    return run_row_groups(lambda cut, mask, seq: critic(seq, mask)[:, -n_response - 1:-1], attention_mask,
                          sequences, max_groups=length_groups, row_chunk=row_chunk)


class RewardFunction:
    """Sum of a reward model's score (at the last real token) and weighted rule rewards."""
    bridge = None  # a utils.tokenizer_bridge.RewardBridge when the reward model has another tokenizer than the actor

    def __init__(self, reward_engine=None, model_weight=1.0, rules=None):
        self.reward_engine, self.model_weight, self.rules = reward_engine, model_weight, rules

    @torch.no_grad()
    def __call__(self, sequences, attention_mask, prompts, responses, metas, row_chunk=None, prompt_len=None,
                 group_size=1, length_groups=1):
        """(total [B], components). `row_chunk`, `prompt_len`, `group_size`, `length_groups`: as in
        response_logprobs; the score is the value at the last real token, which is a response token (the first
        one always is)."""
        from step3_rlhf.shared_prefix import shared_group, shared_prefix_response_values
        total = torch.zeros(sequences.shape[0], device=sequences.device)
        components = {}
        if self.reward_engine is not None:
            def one(cut, mask, seq):
                P = prompt_len - cut if prompt_len else prompt_len
                g = shared_group(self.reward_engine, seq, mask, P, group_size)
                if g > 1 and seq.shape[1] > P:
                    values = shared_prefix_response_values(self.reward_engine, seq, mask, P, g)
                    return gather_last(values, mask[:, P:])
                return gather_last(self.reward_engine(seq, mask), mask)
            score = self.bridge.score(self.reward_engine, prompts, responses, sequences.device, row_chunk) \
                if self.bridge is not None else \
                run_row_groups(one, attention_mask, sequences, align=group_size, max_groups=length_groups,
                               row_chunk=row_chunk).float()
            components["reward/model"] = score
            total += self.model_weight * score
        if self.rules is not None:
            rule_total, parts = self.rules.evaluate(prompts, responses, metas)
            total += torch.tensor(rule_total, dtype=torch.float, device=total.device)
            for name, vals in parts.items():
                components[f"reward/{name}"] = torch.tensor(vals, dtype=torch.float)
        return total, components
