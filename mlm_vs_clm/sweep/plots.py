"""The sweep's figures: scores and losses against compute and against the CLM fraction, and
the fine-tuning spread per schedule (`sweep analyze` writes them beside summary.md)."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps, ticker
from matplotlib.figure import Figure  # no pyplot: no global backend state

from mlm_vs_clm import stats
from mlm_vs_clm.sweep.results import budgets


def _figure(ncols: int = 1):
    fig = Figure(figsize=(5.5 * ncols, 4))
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _colors(schedules):
    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(schedules)}


MARKERS = "osD^v<>ph*"


def plot_vs_compute(rows, col, ylabel, path, fits=None):
    """`col` against FLOPs: color = schedule, marker = size, a line over steps per (schedule, size);
    with fits, the fitted law for each size (dashed) over a wider token range."""
    scheds, sizes = list(dict.fromkeys(r["schedule"] for r in rows)), list(dict.fromkeys(r["size"] for r in rows))
    color = _colors(scheds)
    fig, (ax,) = _figure()
    for sched in scheds:
        for j, size in enumerate(sizes):
            mine = [r for r in rows if (r["schedule"], r["size"]) == (sched, size) and r[col] is not None]
            if not mine:
                continue
            ax.scatter([r["flops"] for r in mine], [r[col] for r in mine], color=color[sched], marker=MARKERS[j % 10],
                       s=18, label=sched if j == 0 else None)
            by_steps = sorted({r["steps"] for r in mine})
            means = [np.mean([r[col] for r in mine if r["steps"] == s]) for s in by_steps]
            flops = [np.mean([r["flops"] for r in mine if r["steps"] == s]) for s in by_steps]
            ax.plot(flops, means, color=color[sched], lw=0.8, alpha=0.6)
            fit = (fits or {}).get(sched, {}).get("fit")
            if fit is not None:
                per_token = np.mean([r["flops"] / r["tokens"] for r in mine])
                D = np.geomspace(min(r["tokens"] for r in mine) / 2, max(r["tokens"] for r in mine) * 2, 50)
                ax.plot(per_token * D, fit.predict(mine[0]["params"], D), color=color[sched], ls="--", lw=1)
    for j, size in enumerate(sizes):
        ax.scatter([], [], color="gray", marker=MARKERS[j % 10], s=18, label=f"size {size}")
    if fits and any(f["fit"] is not None for f in fits.values()):
        ax.plot([], [], color="gray", ls="--", lw=1, label="fitted law")
    _log_x(ax)
    ax.set_xlabel("training FLOPs (analytic)"), ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} vs compute")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _log_x(ax):
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    if np.log10(hi / lo) < 1.5:  # less than two powers of ten on the axis: label 2x and 5x too
        ax.xaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_minor_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(3, 3)))
    else:
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def plot_vs_clm_fraction(rows, col, ylabel, path):
    """`col` (mean over seeds, sd as error bar) against the CLM fraction, one line per budget and
    mask ratio (pure CLM, mask 0, joins every line of its budget)."""
    fig, (ax,) = _figure()
    for size, steps in budgets(rows):
        here = [r for r in rows if (r["size"], r["steps"]) == (size, steps) and r[col] is not None]
        masks = sorted({r["mask_ratio"] for r in here if r["clm_fraction"] < 1}) or [None]
        for mask in masks:
            pts = [r for r in here if mask is None or r["clm_fraction"] >= 1 or r["mask_ratio"] == mask]
            xs = sorted({r["clm_fraction"] for r in pts})
            summ = [stats.summarize(r[col] for r in pts if r["clm_fraction"] == x) for x in xs]
            label = f"{size}, {steps} steps" + (f", mask {100 * mask:.0f} %" if len(masks) > 1 else "")
            ax.errorbar([100 * x for x in xs], [m.mean for m in summ], yerr=[np.nan_to_num(m.sd) for m in summ],
                        marker="o", capsize=3, label=label)
    ax.set_xlabel("% of steps trained with CLM (the rest MLM)"), ax.set_ylabel(ylabel)
    ax.set_title("Split ratio at each budget")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_finetune_spread(ft_rows, schedule_of, path):
    """Every fine-tuning run's test score (all learning rates and seeds), per schedule, one panel per task."""
    tasks = list(dict.fromkeys(r["task"] for r in ft_rows))
    scheds = list(dict.fromkeys(schedule_of[r["run"]] for r in ft_rows))
    fig, axes = _figure(len(tasks))
    rng = np.random.default_rng(0)
    for ax, task in zip(axes, tasks):
        data = [[r["test"] for r in ft_rows
                 if r["task"] == task and schedule_of[r["run"]] == s and r["test"] is not None]
                for s in scheds]
        ax.boxplot([d or [np.nan] for d in data], showfliers=False)
        for i, d in enumerate(data):
            ax.scatter(i + 1 + rng.uniform(-0.15, 0.15, len(d)), d, s=8, alpha=0.6, color="k")
        ax.set_xticks(range(1, len(scheds) + 1), scheds, rotation=30, fontsize=7)
        ax.set_ylabel("test score (%)"), ax.set_title(f"{task}: every budget, learning rate and seed")
    return _save(fig, path)


# ---------------------------------------------------------------- summary
