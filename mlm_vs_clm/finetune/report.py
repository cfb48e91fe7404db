"""Results of a fine-tuning grid: DIR/results.json (every run), DIR/results.md (the table),
DIR/scores.png (score distributions per checkpoint).

The table, per task and checkpoint: the best learning rate, the test score at that learning
rate as mean +- sd over seeds (ddof 1, mlm_vs_clm/stats.py: "-" with one seed), and the
spread across learning rates (min-max of the per-LR mean test scores, and the sd over all runs),
so stability is reported next to the best score.

The best learning rate: a run without a score (its loss went non-finite before any
validation) counts against its rate, so rates are ranked first by their share of runs without
a score (a rate whose seeds all have scores beats any rate with a failed seed), then by the
mean validation score of their scored seeds, then the smaller rate. A rate where 4 of 5 seeds
failed cannot win on its one survivor. When every rate has a failed seed, the test cell says
how many seeds the mean covers ("(1 of 5 seeds)"). Diverged runs are counted; their scores
stay in the spread (a run stuck at chance is part of the instability) unless they have none.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
from matplotlib.figure import Figure

from mlm_vs_clm import stats

fmt = stats.fmt

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT = "scores.png"


def run_key(task: str, checkpoint: str, lr: float, seed: int) -> str:
    return f"{task}|{checkpoint}|{lr:g}|{seed}"


def _load(workdir: str) -> dict:
    path = os.path.join(workdir, RESULTS_JSON)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        try:
            results = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"results: {path} is not a results file ({e}); move it away to start afresh") from e
    if not isinstance(results, dict) or "runs" not in results:
        raise ValueError(f"results: {path} is not a results file (no 'runs'); move it away to start afresh")
    return results


def load_runs(workdir: str) -> list:
    return _load(workdir).get("runs", [])


def load_config(workdir: str) -> dict:
    """The fine-tuning config stored with the runs ({} when none was: an older results.json)."""
    return _load(workdir).get("config") or {}


def save_runs(workdir: str, runs: list, config_json: dict | None = None) -> None:
    """Atomic write: a crash mid-write never loses finished runs."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RESULTS_JSON)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"runs": runs, "config": config_json or {}}, f, indent=1)
    os.replace(tmp, path)


def summarize(runs: list) -> list:
    """One row per (task, checkpoint) in first-seen order; see the module docstring."""
    groups = collections.OrderedDict()
    for r in runs:
        groups.setdefault((r["task"], r["checkpoint"]), []).append(r)
    rows = []
    for (task, ckpt), group in groups.items():
        by_lr = collections.defaultdict(list)
        for r in group:
            by_lr[r["lr"]].append(r)

        def scored(rs, key):
            return [r[key] for r in rs if r[key] is not None]

        def mean_of(rs, key):
            vals = scored(rs, key)
            return float(np.mean(vals)) if vals else float("nan")

        rank = {  # smaller is better: share of runs without a score, -mean validation, lr (module docstring)
            lr: (1 - len(scored(rs, "best_validation")) / len(rs), -mean_of(rs, "best_validation"), lr)
            for lr, rs in by_lr.items()
            if scored(rs, "best_validation")
        }
        best_lr = min(rank, key=rank.get) if rank else None
        best_tests = scored(by_lr.get(best_lr, []), "test")
        lr_tests = [mean_of(rs, "test") for rs in by_lr.values()]
        lr_tests = [t for t in lr_tests if np.isfinite(t)]
        all_tests = [r["test"] for r in group if r["test"] is not None]
        rows.append(
            {
                "task": task,
                "checkpoint": ckpt,
                "metric": group[0].get("metric", ""),
                "best_lr": best_lr,
                "test_mean": float(np.mean(best_tests)) if best_tests else float("nan"),
                "test_std": stats.sd(best_tests),
                "validation_mean": mean_of(by_lr[best_lr], "best_validation") if best_lr is not None else float("nan"),
                "best_lr_runs": len(by_lr.get(best_lr, [])),  # seeds run at the best rate
                "best_lr_scored": len(best_tests),  # of which with a test score
                "lr_min": min(lr_tests) if lr_tests else float("nan"),
                "lr_max": max(lr_tests) if lr_tests else float("nan"),
                "all_std": stats.sd(all_tests),
                "runs": len(group),
                "diverged": sum(bool(r["diverged"]) for r in group),
            }
        )
    return rows


def markdown(runs: list) -> str:
    lines = [
        "| task | metric | checkpoint | best LR | test (mean ± std over seeds) | validation | "
        "spread across LRs (min–max of LR means) | std, all runs | runs | diverged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summarize(runs):
        lines.append(
            f"| {row['task']} | {row['metric']} | {checkpoint_label(row['checkpoint'])} | "
            f"{'-' if row['best_lr'] is None else format(row['best_lr'], 'g')} | "
            f"{fmt(row['test_mean'])} ± {fmt(row['test_std'])}{_coverage(row)} | {fmt(row['validation_mean'])} | "
            f"{fmt(row['lr_min'])}–{fmt(row['lr_max'])} | {fmt(row['all_std'])} | {row['runs']} | {row['diverged']} |"
        )
    return "\n".join(lines) + "\n"


def _coverage(row) -> str:
    """' (k of n seeds)' when seeds at the best rate have no test score, else ''."""
    if row["best_lr_scored"] == row["best_lr_runs"]:
        return ""
    return f" ({row['best_lr_scored']} of {row['best_lr_runs']} seeds)"


def checkpoint_label(path: str) -> str:
    parts = [p for p in os.path.normpath(path).split(os.sep) if p]
    if len(parts) >= 3 and parts[-2] == "checkpoints":  # RUN/checkpoints/STEP -> RUN@STEP
        return f"{parts[-3]}@{parts[-1]}"
    return parts[-1] if parts else path


def plot(runs: list, path: str) -> None:
    """One panel per task: test scores of every run, one box (plus points) per checkpoint."""
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    ckpts = list(dict.fromkeys(r["checkpoint"] for r in runs))
    fig = Figure(figsize=(3.2 * max(len(tasks), 1), 3.4))  # no pyplot: no global backend state
    axes = fig.subplots(1, max(len(tasks), 1), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        data = [[r["test"] for r in runs if r["task"] == task and r["checkpoint"] == c and r["test"] is not None]
                for c in ckpts]
        ax.boxplot([d if d else [np.nan] for d in data], showfliers=False)
        for i, d in enumerate(data):
            jitter = np.linspace(-0.12, 0.12, len(d)) if len(d) > 1 else np.zeros(len(d))
            ax.plot(np.full(len(d), i + 1.0) + jitter, d, "o", alpha=0.6, markersize=3)
        metric = next((r.get("metric", "") for r in runs if r["task"] == task), "")
        ax.set_title(task, fontsize=9)
        ax.set_ylabel(f"test {metric}", fontsize=8)
        ax.set_xticks(range(1, len(ckpts) + 1))
        ax.set_xticklabels([checkpoint_label(c) for c in ckpts], rotation=30, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_reports(workdir: str, runs: list) -> str:
    """results.md and the plot from the runs; returns the markdown table."""
    table = markdown(runs)
    with open(os.path.join(workdir, RESULTS_MD), "w") as f:
        f.write("# Fine-tuning results\n\n" + table)
    if runs:
        plot(runs, os.path.join(workdir, PLOT))
    return table
