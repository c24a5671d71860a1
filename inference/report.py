"""Training report: TensorBoard scalars of any stage -> PNG plots + a short Markdown summary.

    python -m inference.report --logdir OUTPUT_OR_TB_DIR [--out DIR] [--smooth 0.6]

Every directory below --logdir that holds ``events.out.tfevents.*`` files is one run (named by its path relative to
--logdir, e.g. ``step1``, ``step3``); each run gets one PNG per figure group (``step3_reward.png``) and a section in
``report.md``. Pure helpers (tag grouping, smoothing, summaries, headlines) are kept apart from the plotting code so
they can be unit-tested; the plotting helpers return the data they actually drew (read back from the figure lines).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

from utils.options import opt, parse_config
from utils.report_tables import heldout_section

EVENT_FILE_MARK = "tfevents"
TIME_TAGS = ("time/generation", "time/experience", "time/training")
LOSS_PREFIXES = ("train/loss", "eval/loss", "loss/")
# Figure groups in display order; title and y-axis label of each.
GROUPS = {
    "loss": ("losses", "loss"),
    "eval": ("evaluation", "value"),
    "reward": ("reward", "reward"),
    "rewards": ("DPO implicit rewards", "beta x log-ratio"),  # step2_dpo's rewards/chosen, /rejected, /margins
    "kl": ("KL divergence", "KL"),
    "response": ("response length", "tokens"),
    "clipfrac": ("clip fraction", "fraction"),
    "entropy": ("entropy", "entropy"),
    "time": ("time per step (stacked)", "seconds"),
    "lr": ("learning rate", "lr"),
    "other": ("other scalars", "value"),
}
PANEL_PER_TAG = ("eval", "other")
UNSMOOTHED_PREFIXES = ("eval/", "train/lr")  # tags with unrelated scales get one subplot each


class ReportError(Exception):
    """A user-facing problem (missing dir, no event files); the CLI prints it on one line and exits with 2."""


@dataclass
class Series:
    """One scalar tag of one run, sorted by step (one value per step: the last one logged)."""
    steps: list[int]
    values: list[float]


@dataclass
class ReportResult:
    markdown_path: str
    png_paths: dict[str, str]            # "<run>/<group>" -> PNG path
    final: dict                          # run -> tag -> last logged value
    plotted: dict = field(default_factory=dict)  # run -> group -> line id -> {"x": [...], "y": [...]}


# ----------------------------------------------------------------------------------------------- pure helpers

def classify_tag(tag: str) -> str:
    """Figure group of one scalar tag (the names the stages write, DPO included); unknown tags -> "other"."""
    if tag.startswith(LOSS_PREFIXES):
        return "loss"
    if tag.startswith("train/lr"):
        return "lr"
    if tag in TIME_TAGS:
        return "time"
    if tag.startswith("rewards/"):  # DPO's per-step implicit rewards, apart from step 3's reward/ (a score)
        return "rewards"
    for prefix in ("eval", "reward", "kl", "response", "clipfrac", "entropy"):
        if tag == prefix or tag.startswith(prefix + "/"):
            return prefix
    return "other"


def group_tags(tags) -> dict[str, list[str]]:
    """Group tags into figure groups (in GROUPS order, tags sorted; time tags in generation/experience/training order)."""
    grouped: dict[str, list[str]] = {}
    for tag in sorted(tags):
        grouped.setdefault(classify_tag(tag), []).append(tag)
    if "time" in grouped:
        grouped["time"] = [t for t in TIME_TAGS if t in grouped["time"]]
    return {g: grouped[g] for g in GROUPS if g in grouped}


def ema_smooth(values, weight: float) -> list[float]:
    """Exponential moving average s_i = weight * s_{i-1} + (1 - weight) * v_i, started at s_0 = v_0.

    Starting from the first value (not from 0) means there is no zero bias, so no debiasing term is needed:
    [0, 1, 1] with weight 0.5 -> [0, 0.5, 0.75]. Non-finite values are passed through and do not update the state
    (a single NaN would otherwise poison the rest of the curve). weight 0 returns the values unchanged.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, state = [], None
    for v in values:
        v = float(v)
        if not math.isfinite(v):
            out.append(v)
            continue
        state = v if state is None else weight * state + (1.0 - weight) * v
        out.append(state)
    return out


def summarize(series: Series) -> dict:
    """first / final / min / max / points / step range of one series (min and max ignore non-finite values)."""
    finite = [v for v in series.values if math.isfinite(v)]
    return {
        "first": series.values[0], "final": series.values[-1],
        "min": min(finite) if finite else float("nan"), "max": max(finite) if finite else float("nan"),
        "points": len(series.values), "first_step": series.steps[0], "last_step": series.steps[-1],
    }


def fmt(v: float) -> str:
    """Short number for Markdown: 4 significant digits."""
    return f"{v:.4g}"


def aligned(series: dict[str, Series], tags) -> tuple[list[int], list[list[float]]]:
    """Steps present in every one of `tags` and the values of each tag at those steps."""
    common = set(series[tags[0]].steps)
    for t in tags[1:]:
        common &= set(series[t].steps)
    steps = sorted(common)
    lookup = [dict(zip(series[t].steps, series[t].values)) for t in tags]
    return steps, [[d[s] for s in steps] for d in lookup]


def headlines(series: dict[str, Series]) -> list[str]:
    """The few lines a user looks for first: reward/loss trend, pairwise accuracy, KL, where the time goes."""
    lines = []

    def trend(tag, label, unit=""):
        if tag in series:
            s = summarize(series[tag])
            span = s["last_step"] - s["first_step"] + 1
            lines.append(f"{label} {fmt(s['first'])} -> {fmt(s['final'])}{unit} over {span} steps")

    trend("reward/mean", "reward")
    trend("train/loss", "train loss")
    trend("eval/loss", "eval loss")
    trend("eval/perplexity", "eval perplexity")
    trend("loss/policy", "policy loss")
    trend("loss/value", "value loss")
    trend("kl/mean", "KL")
    trend("rewards/margins", "DPO implicit-reward margin")
    trend("response/length", "response length", " tokens")
    if "eval/accuracy" in series:
        pairwise = any(t in series for t in ("eval/chosen_score", "eval/rejected_score", "eval/margin"))
        lines.append(f"{'pairwise accuracy' if pairwise else 'accuracy'} {fmt(series['eval/accuracy'].values[-1])}")
    dpo = "eval/rewards/chosen" in series and "eval/rewards/rejected" in series
    if "eval/margin" in series:
        lines.append(f"chosen - rejected {'implicit-reward' if dpo else 'score'} margin "
                     f"{fmt(series['eval/margin'].values[-1])}")
    if dpo:
        lines.append(f"implicit rewards: chosen {fmt(series['eval/rewards/chosen'].values[-1])}, rejected "
                     f"{fmt(series['eval/rewards/rejected'].values[-1])}")
    present = [t for t in TIME_TAGS if t in series]
    if present:
        totals = [sum(series[t].values) for t in present]
        grand = sum(totals)
        if grand > 0:
            split = ", ".join(f"{t.split('/')[1]} {100 * x / grand:.0f}%" for t, x in zip(present, totals))
            steps, _ = aligned(series, present)
            per_step = f", {fmt(grand / len(steps))} s/step" if steps and len(present) == len(TIME_TAGS) else ""
            lines.append(f"time split: {split}{per_step}")
    return lines


def safe_name(name: str) -> str:
    """A run name usable in a file name: path separators and odd characters become '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


# ----------------------------------------------------------------------------------------------- reading logs

def find_run_dirs(logdir: str) -> list[str]:
    """Directories at or below `logdir` that contain at least one TensorBoard event file, sorted."""
    runs = []
    for root, dirs, files in os.walk(logdir):
        dirs.sort()
        if any(EVENT_FILE_MARK in f for f in files):
            runs.append(root)
    return sorted(runs)


def load_scalars(run_dir: str) -> dict[str, Series]:
    """All scalar points of the event files directly in `run_dir` (size_guidance 0 = keep every point).

    Legacy `simple_value` scalars (what torch's SummaryWriter.add_scalar writes) and rank-0 tensor summaries (TF2
    style) are both read. If a step was logged twice (a resumed run), the last value wins.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea
    acc = ea.EventAccumulator(run_dir, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    points: dict[str, dict[int, float]] = {}
    for tag in acc.Tags().get("scalars", []):
        for ev in acc.Scalars(tag):
            points.setdefault(tag, {})[int(ev.step)] = float(ev.value)
    if acc.Tags().get("tensors"):
        from tensorboard.util import tensor_util
        for tag in acc.Tags()["tensors"]:
            for ev in acc.Tensors(tag):
                arr = tensor_util.make_ndarray(ev.tensor_proto)
                if arr.size == 1 and arr.dtype.kind in "fiu":
                    points.setdefault(tag, {})[int(ev.step)] = float(arr.reshape(-1)[0])
    return {tag: Series(sorted(p), [p[s] for s in sorted(p)]) for tag, p in points.items() if p}


# ----------------------------------------------------------------------------------------------- plotting

def _line(ax, x, y, gid, **kw):
    (line,) = ax.plot(x, y, **kw)
    line.set_gid(gid)  # the key under which drawn_data() reports this line
    return line


def _plot_lines(ax, series: dict[str, Series], tags, smooth: float) -> None:
    """One line per tag; with smoothing the raw points are drawn faint and the EMA solid in the same colour.

    eval/* (already averages over a whole eval set, and sparse) and the lr schedule are never smoothed.
    """
    for tag in tags:
        s = series[tag]
        marker = "o" if len(s.steps) < 3 else None
        if smooth > 0 and not tag.startswith(UNSMOOTHED_PREFIXES):
            raw = _line(ax, s.steps, s.values, tag, alpha=0.25, marker=marker)
            _line(ax, s.steps, ema_smooth(s.values, smooth), f"{tag} (smoothed)", color=raw.get_color(),
                  label=tag, marker=marker)
        else:
            _line(ax, s.steps, s.values, tag, label=tag, marker=marker)


def _plot_reward(ax, series: dict[str, Series], tags, smooth: float) -> None:
    """reward/mean with a +-reward/std band (around the raw mean), plus the other reward/* components as lines."""
    banded = "reward/mean" in tags and "reward/std" in tags
    _plot_lines(ax, series, [t for t in tags if not (banded and t == "reward/std")], smooth)
    if banded:
        steps, (mean, std) = aligned(series, ["reward/mean", "reward/std"])
        lower = [m - s for m, s in zip(mean, std)]
        upper = [m + s for m, s in zip(mean, std)]
        band = ax.fill_between(steps, lower, upper, alpha=0.2, label="reward/mean ± reward/std")
        edge = band.get_facecolor()[0][:3]
        _line(ax, steps, lower, "reward/mean-std", color=edge, linewidth=0.5, alpha=0.5)
        _line(ax, steps, upper, "reward/mean+std", color=edge, linewidth=0.5, alpha=0.5)


def _plot_time(ax, series: dict[str, Series], tags) -> None:
    """Stacked area of the time split per step: the top edge is generation + experience + training seconds."""
    steps, columns = aligned(series, list(tags))
    bottom = [0.0] * len(steps)
    for tag, values in zip(tags, columns):
        top = [b + v for b, v in zip(bottom, values)]
        ax.fill_between(steps, bottom, top, alpha=0.6, label=tag)
        _line(ax, steps, top, f"{tag} (top edge)", color="black", linewidth=0.6, marker="o" if len(steps) < 3 else None)
        bottom = top


def drawn_data(fig) -> dict[str, dict[str, list[float]]]:
    """Read back every identified line from the figure: gid -> {"x": [...], "y": [...]} (what was really drawn)."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                out[line.get_gid()] = {"x": [float(v) for v in line.get_xdata()],
                                       "y": [float(v) for v in line.get_ydata()]}
    return out


def plot_group(run: str, group: str, series: dict[str, Series], tags, png_path: str, smooth: float = 0.0) -> dict:
    """Draw one figure group of one run into `png_path` (Agg canvas, no pyplot state); returns drawn_data()."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    title, ylabel = GROUPS[group]
    panels = [[t] for t in tags] if group in PANEL_PER_TAG else [list(tags)]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    width, height = (6, 3) if group == "lr" else (4.5 * ncols if ncols > 1 else 8, 3.5 * nrows + 1)
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        if group == "time":
            _plot_time(ax, series, panel)
        elif group == "reward":
            _plot_reward(ax, series, panel, smooth)
        else:
            _plot_lines(ax, series, panel, smooth)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(panel[0] if group in PANEL_PER_TAG else ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    smoothed = smooth > 0 and any(not t.startswith(UNSMOOTHED_PREFIXES) for t in tags) and group != "time"
    fig.suptitle(f"{run}: {title}" + (f" (EMA {smooth})" if smoothed else ""))
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    return drawn_data(fig)


# ----------------------------------------------------------------------------------------------- report

def _run_section(run: str, series: dict[str, Series], pngs: dict[str, str], md_dir: str) -> list[str]:
    lines = [f"## {run}", ""]
    if not series:
        return lines + ["No scalar data in this run.", ""]
    lines += [f"- {h}" for h in headlines(series)] + [""]
    lines += ["| tag | first | final | min | max | points |", "|---|---:|---:|---:|---:|---:|"]
    for tag in sorted(series):
        s = summarize(series[tag])
        lines.append(f"| {tag} | {fmt(s['first'])} | {fmt(s['final'])} | {fmt(s['min'])} | {fmt(s['max'])} "
                     f"| {s['points']} |")
    lines.append("")
    for group, path in pngs.items():
        rel = os.path.relpath(path, md_dir).replace(os.sep, "/")
        lines += [f"![{run} {group}]({rel})", ""]
    return lines


def write_report(logdir: str, out_dir: str | None = None, smooth: float = 0.0) -> ReportResult:
    """Read every run below `logdir`, write `<out_dir>/<run>_<group>.png` and `<out_dir>/report.md`.

    out_dir defaults to `<logdir>/report`. Raises ReportError when `logdir` is missing or holds no event files.
    """
    if not os.path.isdir(logdir):
        raise ReportError(f"--logdir {logdir!r} does not exist or is not a directory")
    run_dirs = find_run_dirs(logdir)
    if not run_dirs:
        raise ReportError(f"no TensorBoard event files (events.out.tfevents.*) found below {logdir!r}")
    if not 0.0 <= smooth < 1.0:
        raise ReportError(f"--smooth must be in [0, 1), got {smooth}")
    out_dir = out_dir or os.path.join(logdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, "report.md")

    result = ReportResult(markdown_path=md_path, png_paths={}, final={})
    md = ["# Training report", "", f"Source: `{os.path.abspath(logdir)}`" +
          (f" (EMA smoothing {smooth} in plots; table values are raw)" if smooth > 0 else ""), ""]
    used_names: set[str] = set()
    for run_dir in run_dirs:
        rel = os.path.relpath(run_dir, logdir)
        run = os.path.basename(os.path.abspath(logdir)) if rel == "." else rel.replace(os.sep, "/")
        stem = safe_name(run)
        while stem in used_names:  # e.g. "a/b" and "a_b" would collide
            stem += "_"
        used_names.add(stem)
        series = load_scalars(run_dir)
        result.final[run] = {tag: s.values[-1] for tag, s in series.items()}
        pngs, result.plotted[run] = {}, {}
        for group, tags in group_tags(series).items():
            png = os.path.join(out_dir, f"{stem}_{group}.png")
            result.plotted[run][group] = plot_group(run, group, series, tags, png, smooth)
            pngs[group] = png
            result.png_paths[f"{run}/{group}"] = png
        md += _run_section(run, series, pngs, out_dir)
    md += heldout_section(logdir)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(md).rstrip() + "\n")
    return result


@dataclass
class ReportConfig:
    logdir: str = opt("", "a run's output dir or TensorBoard dir (searched recursively)", required=True)
    out: Optional[str] = opt(None, "where PNGs and report.md go (default: LOGDIR/report)")
    smooth: float = opt(0.0, "EMA weight in [0, 1) for plotted lines", min=0, max_exclusive=1)


def main(argv=None) -> int:
    args = parse_config(ReportConfig, argv, description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        result = write_report(args.logdir, args.out, args.smooth)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.markdown_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
