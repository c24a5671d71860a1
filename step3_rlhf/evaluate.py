"""Before/after evaluation of the policy on held-out prompts: reward, KL to the reference, sample answers
(printed by utils/report_tables.py)."""
from __future__ import annotations

import torch

from utils.rng import fork_rng


@torch.no_grad()
def evaluate_policy(maker, items, batch_size, seed):
    """Mean reward and per-sequence KL of the current actor on `items` (sampled with a fixed seed; the
    training RNG stream is left untouched so a resumed run stays identical)."""
    if not items:
        return None
    scores, kls, rows = [], [], []
    with fork_rng():  # the CPU's and the current GPU's RNGs (fork_rng(devices=[]) kept the CPU's only)
        torch.manual_seed(seed)
        for start in range(0, len(items), batch_size):
            exp = maker.make(items[start:start + batch_size], sample=False)
            scores.append(exp.scores.float().cpu())
            if exp.ref_logprobs is not None:
                kls.append(((exp.logprobs - exp.ref_logprobs) * exp.action_mask).sum(1).cpu())
            rows += [{"prompt": p, "response": r, "score": float(s)}
                     for p, r, s in zip(exp.prompts, exp.responses, exp.scores.tolist())]
    maker.log.pop_timers()
    out = {"reward_mean": torch.cat(scores).mean().item(), "n": len(rows), "samples": rows}
    if kls:
        out["kl_mean"] = torch.cat(kls).mean().item()
    return out
