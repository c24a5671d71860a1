"""Before/after evaluation of the policy on held-out prompts: reward, KL to the reference, sample answers."""
from __future__ import annotations

import torch

from utils.data.templates import last_user_message
from utils.rng import fork_rng


@torch.no_grad()
def evaluate_policy(trainer, items, batch_size, seed):
    """Mean reward and per-sequence KL of the current actor on `items` (sampled with a fixed seed; the
    training RNG stream is left untouched so a resumed run stays identical)."""
    if not items:
        return None
    scores, kls, rows = [], [], []
    with fork_rng():  # the CPU's and the current GPU's RNGs (fork_rng(devices=[]) kept the CPU's only)
        torch.manual_seed(seed)
        for start in range(0, len(items), batch_size):
            exp = trainer.make_experience(trainer.collate(items[start:start + batch_size]), sample=False)
            scores.append(exp.scores.float().cpu())
            if exp.ref_logprobs is not None:
                kls.append(((exp.logprobs - exp.ref_logprobs) * exp.action_mask).sum(1).cpu())
            rows += [{"prompt": p, "response": r, "score": float(s)}
                     for p, r, s in zip(exp.prompts, exp.responses, exp.scores.tolist())]
    trainer.log.pop_timers()
    out = {"reward_mean": torch.cat(scores).mean().item(), "n": len(rows), "samples": rows}
    if kls:
        out["kl_mean"] = torch.cat(kls).mean().item()
    return out


def before_after_table(before, after, n_examples=3, width=60):
    """A plain-text table: mean reward and KL before/after, then answers side by side."""
    def cut(text):
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 3] + "..."

    lines = [f"{'':24}{'step-1 actor':>16}{'final actor':>16}",
             f"{'mean reward':24}{before['reward_mean']:>16.4f}{after['reward_mean']:>16.4f}"]
    if "kl_mean" in after:
        lines.append(f"{'mean KL to reference':24}{before.get('kl_mean', 0.0):>16.4f}{after['kl_mean']:>16.4f}")
    lines.append(f"({after['n']} held-out prompts neither model trained on)")
    for b, a in list(zip(before["samples"], after["samples"]))[:n_examples]:
        lines += ["", f"prompt : {cut(last_user_message(b['prompt']))}",
                  f"before : {cut(b['response'])}  [reward {b['score']:.3f}]",
                  f"after  : {cut(a['response'])}  [reward {a['score']:.3f}]"]
    return "\n".join(lines)
