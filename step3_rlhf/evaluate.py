"""Before/after evaluation of the policy on held-out prompts: reward, KL to the reference, sample answers
(printed by utils/report_tables.py)."""
from __future__ import annotations

import torch

from utils.data.synthetic_check import check, is_synthetic
from utils.rng import fork_rng


@torch.no_grad()
def evaluate_policy(maker, items, batch_size, seed):
    """Mean reward and per-sequence KL of the current actor on `items` (sampled at --eval_temperature with a
    fixed seed; the training RNG stream is left untouched so a resumed run stays identical), and per rule its
    mean score and share of full marks."""
    if not items:
        return None
    scores, kls, rows, parts = [], [], [], {}
    with fork_rng(), maker.rollout.temperature(maker.cfg.eval_temperature):  # fork: CPU + current GPU RNGs
        torch.manual_seed(seed)
        for start in range(0, len(items), batch_size):
            exp = maker.make(items[start:start + batch_size], sample=False)
            scores.append(exp.scores.float().cpu())
            for name, values in exp.components.items():
                parts.setdefault(name, []).append(values.float().cpu())
            if exp.ref_logprobs is not None:
                kls.append(((exp.logprobs - exp.ref_logprobs) * exp.action_mask).sum(1).cpu())
            rows += [{"prompt": p, "response": r, "score": float(s)}
                     for p, r, s in zip(exp.prompts, exp.responses, exp.scores.tolist())]
    for row in rows:  # a synthetic prompt has an exact answer: right or wrong by rule, whatever the reward says
        if is_synthetic(row["prompt"]):
            row["correct"] = check(row["prompt"], row["response"])
    maker.log.pop_timers()
    out = {"reward_mean": torch.cat(scores).mean().item(), "n": len(rows), "samples": rows}
    graded = [row["correct"] for row in rows if "correct" in row]
    if graded:
        out["correct"], out["graded"] = sum(graded), len(graded)
    if kls:
        out["kl_mean"] = torch.cat(kls).mean().item()
    for name, chunks in parts.items():  # "reward/countdown" -> "countdown"
        values = torch.cat(chunks)
        out.setdefault("components", {})[name.split("/", 1)[1]] = values.mean().item()
        if name != "reward/model":  # rules score 1.0 for full marks (a correct answer, a well-formed one)
            out.setdefault("full_marks", {})[name.split("/", 1)[1]] = (values >= 1.0 - 1e-6).float().mean().item()
    return out


def eval_scalars(result) -> dict:
    """The TensorBoard/history scalars of one evaluate_policy result: eval/reward, eval/kl, eval/<rule> (mean
    score) and eval/<rule>_full (share with full marks: for Countdown, the accuracy)."""
    out = {"eval/reward": result["reward_mean"]}
    if "kl_mean" in result:
        out["eval/kl"] = result["kl_mean"]
    out.update({f"eval/{k}": v for k, v in result.get("components", {}).items()})
    out.update({f"eval/{k}_full": v for k, v in result.get("full_marks", {}).items()})
    return out


# ---------------------------------------------------------------- detectors (#15 point 5)
# what the end-of-run summary compares, first steps against last: (label, history key)
WATCHED = (("reward", "reward/mean"), ("KL", "kl/mean"), ("length", "response/length"),
           ("truncation", "response/truncated_frac"), ("repetition", "response/repetition_frac"),
           ("empty", "response/empty_frac"))


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def hacking_trend(rewards, kls, window, kl_growth) -> bool:
    """The reward-hacking signature on a run's curves: over the last 2 x `window` steps the mean training
    reward of the last window is above the window before's, while the mean KL to the reference grew by more
    than `kl_growth` nats per step between them. False with fewer steps or without a KL (no reference)."""
    if len(rewards) < 2 * window or not kls or len(kls) < 2 * window or None in kls[-2 * window:]:
        return False
    before, last = slice(-2 * window, -window), slice(-window, None)
    rising = _mean(rewards[last]) > _mean(rewards[before])
    return bool(rising and (_mean(kls[last]) - _mean(kls[before])) / window > kl_growth)


def warn_on_hacking_trend(history, stats, cfg, log, step) -> float:
    """1.0 while the windowed trend (hacking_trend on the history and this step's `stats`) holds, else 0.0;
    prints a one-line warning at the step it starts holding (the flag is in the history, so a resumed run
    warns where the uninterrupted one did)."""
    rows = history + [stats]
    on = hacking_trend([h["reward/mean"] for h in rows], [h.get("kl/mean") for h in rows], cfg.detector_window,
                       cfg.detector_kl_growth)
    if on and not (history and history[-1].get("detect/hacking_trend")):
        log.info(f"WARNING step {step}: {_trend_words(rows, cfg.detector_window)} - the reward-hacking "
                 "signature; look at the samples (the end-of-run summary compares the held-out reward)")
    return float(on)


def _trend_words(rows, w):
    r0, r1 = _mean([h["reward/mean"] for h in rows[-2 * w:-w]]), _mean([h["reward/mean"] for h in rows[-w:]])
    k0, k1 = _mean([h["kl/mean"] for h in rows[-2 * w:-w]]), _mean([h["kl/mean"] for h in rows[-w:]])
    return f"training reward {r0:.3g} -> {r1:.3g} while KL to the reference grew {k0:.3g} -> {k1:.3g} in {w} steps"


def run_summary(history, before, after, window, kl_growth) -> dict:
    """The detectors' end-of-run block for summary.json: each WATCHED figure averaged over the first and the
    last `window` steps (fewer on a short run), the held-out reward before/after, and warnings - the steps where
    the windowed trend started, and the full signature: training reward up, KL grown faster than `kl_growth`
    nats per step, held-out reward (evaluate_policy, before vs after) down."""
    n = len(history)
    w = max(1, min(window, n // 2)) if n else 0
    first, last = history[:w], history[n - w:]
    metrics = {}
    for label, key in WATCHED:
        a, b = _mean([h.get(key) for h in first]), _mean([h.get(key) for h in last])
        if a is not None and b is not None:
            metrics[label] = {"first": a, "last": b}
    out = {"window": w, "metrics": metrics, "warnings": []}
    if before and after:
        out["heldout_reward"] = {"before": before["reward_mean"], "after": after["reward_mean"]}
    flags = [h.get("detect/hacking_trend", 0.0) for h in history]
    out["warnings"] += [f"step {i + 1}: {_trend_words(history[:i + 1], window)}" for i, f in enumerate(flags)
                        if f and not (i and flags[i - 1])]
    reward, kl, held = metrics.get("reward"), metrics.get("KL"), out.get("heldout_reward")
    if reward and kl and held and n > w and reward["last"] > reward["first"] \
            and (kl["last"] - kl["first"]) / (n - w) > kl_growth and held["after"] < held["before"]:
        out["warnings"].append(f"reward hacking: training reward {reward['first']:.3g} -> {reward['last']:.3g}, KL "
                               f"{kl['first']:.3g} -> {kl['last']:.3g}, held-out reward {held['before']:.3g} -> "
                               f"{held['after']:.3g}")
    return out


def summary_lines(block) -> list[str]:
    """The detectors' block as the few lines printed at the end of a step-3 run."""
    w = block["window"]
    parts = [f"{label} {m['first']:.3g} -> {m['last']:.3g}" for label, m in block["metrics"].items()]
    lines = [f"detectors, first {w} vs last {w} step(s): " + " | ".join(parts) if parts else "detectors: no steps"]
    if "heldout_reward" in block:
        h = block["heldout_reward"]
        lines.append(f"held-out reward {h['before']:.3g} -> {h['after']:.3g}")
    return lines + [f"WARNING {msg}" for msg in block["warnings"]]
