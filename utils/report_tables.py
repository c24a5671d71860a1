"""Plain-text tables of a run's results, shared by the stage that measures them and `inference.summary`."""
from __future__ import annotations

from utils.data.templates import last_user_message


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
