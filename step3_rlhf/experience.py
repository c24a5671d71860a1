"""Experience making: generate responses, then score them with every model the algorithm needs.

Layout of one batch (written once, here): prompts are LEFT-padded to P tokens, responses follow at
positions P..P+R-1 and are RIGHT-padded; `action_mask` [B, R] is 1 up to and including each response's
first EOS and 0 after it. Position ids always come from the attention mask, so left padding never changes
a log-prob. Everything here runs under no_grad; the trainer recomputes what it trains on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from utils.losses import entropy_from_logits, gather_last, gather_logprobs
from utils.models import position_ids_from_mask, unwrap
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
    # the first update's forward (see RLTrainer.make_experience); None otherwise. Never copied by rows().
    policy_graph: tuple | None = field(default=None, repr=False)

    def rows(self, idx):
        """A sub-batch of rows (for micro-batching); prompt/response width stays the same."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Experience(self.sequences[idx], self.attention_mask[idx], self.action_mask[idx], self.prompt_len,
                          self.logprobs[idx], pick(self.ref_logprobs), pick(self.values), self.scores[idx],
                          pick(self.advantages), pick(self.returns))


def eos_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def action_mask_from(responses: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after (also when pad == eos)."""
    is_eos = torch.isin(responses, torch.tensor(eos, device=responses.device))
    after_first_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after_first_eos).float()


@torch.no_grad()
def generate(actor, prompt_ids, prompt_mask, cfg, tokenizer, synced_gpus=False, use_hybrid=False, fast=None,
             return_logprobs=False, group_size=1):
    """Sample responses; returns (sequences [B, P+R], action_mask [B, R]) (+ logprobs [B, R] if asked).

    Three generators, picked here:
    - `use_hybrid`: DeepSpeed's hybrid engine (its inference kernels);
    - our decode loop (generation.sample: a KV cache and no per-token generate() overhead) for a plain
      decoder-only model on one process - `fast` None (auto) or True;
    - otherwise the model's own `generate` with a KV cache (ZeRO-3 / several processes: synced_gpus, and
      DeepSpeed gathers each layer's parameters as it runs).
    `return_logprobs` also returns the sampled tokens' log-probs under logits / temperature, as the decode
    loop saw them (our loop only; None from the others). `group_size`: rows come in groups of copies of one
    prompt (GRPO), so our loop runs each prompt once and shares its KV cache."""
    from step3_rlhf.generation import fast_decode_ok, sample
    model = unwrap(actor)
    eos = eos_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    logps = None
    backend = getattr(cfg, "generation_backend", "auto")
    use_fast = fast if fast is not None else backend != "hf"
    if use_fast and fast_decode_ok(model, synced_gpus, use_hybrid):
        out = sample(model, prompt_ids, prompt_mask, max_new_tokens=cfg.max_answer_seq_len,
                     min_new_tokens=cfg.min_answer_seq_len, eos_ids=eos, pad_id=tokenizer.pad_token_id,
                     temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, group_size=group_size,
                     return_logprobs=return_logprobs)
        responses, logps = out if return_logprobs else (out, None)
        seq = torch.cat([prompt_ids, responses], 1)
    else:
        gen = actor.generate if use_hybrid else model.generate
        kwargs = dict(max_new_tokens=cfg.max_answer_seq_len, min_new_tokens=cfg.min_answer_seq_len or None,
                      do_sample=cfg.temperature > 0, temperature=cfg.temperature if cfg.temperature > 0 else None,
                      top_p=cfg.top_p if cfg.temperature > 0 else None, top_k=cfg.top_k or None,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, use_cache=True, synced_gpus=synced_gpus)
        seq = gen(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
    model.train(was_training)
    responses = seq[:, prompt_ids.shape[1]:]
    if responses.shape[1] == 0:  # nothing generated at all (max_answer_seq_len 0): one masked pad column
        responses = torch.full((seq.shape[0], 1), tokenizer.pad_token_id, dtype=seq.dtype, device=seq.device)
        seq, mask = torch.cat([prompt_ids, responses], 1), torch.zeros_like(responses, dtype=torch.float)
        return (seq, mask, torch.zeros_like(mask)) if return_logprobs else (seq, mask)
    mask = action_mask_from(responses, eos)
    return (seq, mask, logps) if return_logprobs else (seq, mask)


def response_logits(model, sequences, attention_mask, n_response, temperature=1.0):
    """Logits [B, R, V] that predict the R response tokens; the LM head runs on those positions only."""
    out = model(input_ids=sequences, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), logits_to_keep=n_response + 1, use_cache=False)
    logits = out.logits[:, :-1]
    return logits / temperature if temperature not in (0, 1) else logits


def response_logprobs(model, sequences, attention_mask, n_response, temperature=1.0, with_entropy=False,
                      row_chunk=None, prompt_len=None, group_size=1, length_groups=1):
    """log p of the R response tokens [B, R] (float32), and their entropy with `with_entropy`.
    `row_chunk`: without autograd, run at most that many rows at a time (same numbers, less memory).
    `prompt_len` + `group_size`: rows come in groups of copies of one prompt (GRPO); each prompt is then run
    once per group (generation.shared_prefix_logits) where the model allows it. `length_groups`: run the rows
    in up to that many groups by length, each without its all-padding columns (utils.padding)."""
    from step3_rlhf.generation import shared_group, shared_prefix_logits

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
            return logp, entropy_from_logits(logits.detach(), chunk_size=LOGIT_CHUNK)
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
        from step3_rlhf.generation import shared_group, shared_prefix_response_values
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
