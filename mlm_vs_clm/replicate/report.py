"""REPORT.md of `make replicate`: tables, plots and a verdict per finding of PAPER.md.

Scores. For a checkpoint and a task, the learning rate is the one the fine-tuning table
picks (finetune/report.summarize: fewest runs without a score, then the best mean validation
score); a seed's score is then the mean over tasks of its test score at the chosen rates, and
a seed without a score at one of them failed: it has no score (it is not averaged over fewer
tasks). A checkpoint's score is the mean over its scored seeds, and its seed spread their
standard deviation (ddof 1); the tables say when some seeds failed ("2 of 3 seeds"). When
every seed has a score, the score is the mean of the table's per-task means.

Verdicts. A comparison A vs B that the study expects to favour A has margin = score(A) -
score(B) and spread = sqrt(sd(A)^2 + sd(B)^2) (the spread of a difference of two single-seed
results). `agrees` if margin > spread, `disagrees` if margin < -spread, else `cannot tell`.
Stability (finding 2, second half) compares the spread over every learning rate and seed,
task by task after removing each task's mean, with Levene's test: `agrees` if CLM's spread is
the lower one at p < 0.05, `disagrees` if MLM's is, else `cannot tell`.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform

import numpy as np

from mlm_vs_clm.finetune import report as ft_report

LABELS = {"mlm40": "MLM-40", "clm": "CLM", "clm25_mlm40": "CLM 25 % -> MLM-40", "clm50_mlm40": "CLM 50 % -> MLM-40",
          "clm75_mlm40": "CLM 75 % -> MLM-40"}


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def seed_scores(runs: list, checkpoint: str) -> dict:
    """seed -> mean over tasks of the test score at each task's best learning rate; NaN for a
    seed without a score at one of those rates (module docstring)."""
    mine = [r for r in runs if r["checkpoint"] == checkpoint]
    best = {row["task"]: row["best_lr"] for row in ft_report.summarize(mine)}
    per_seed = {r["seed"]: {} for r in mine}
    for r in mine:
        if r["lr"] == best[r["task"]] and r["test"] is not None:
            per_seed[r["seed"]][r["task"]] = r["test"]
    return {s: float(np.mean([got[t] for t in best])) if len(got) == len(best) else float("nan")
            for s, got in per_seed.items()}


def _seeds_note(runs: list, checkpoint: str) -> str:
    """' (k of n seeds)' when some seeds have no score, else ''."""
    values = list(seed_scores(runs, checkpoint).values())
    scored = sum(np.isfinite(v) for v in values)
    return "" if scored == len(values) else f" ({scored} of {len(values)} seeds)"


def task_scores(runs: list, checkpoint: str) -> dict:
    """task -> (mean, sd) over seeds of the test score at the best learning rate."""
    out = {}
    for row in ft_report.summarize([r for r in runs if r["checkpoint"] == checkpoint]):
        out[row["task"]] = (row["test_mean"], row["test_std"])
    return out


def score(runs: list, checkpoint: str) -> tuple[float, float]:
    return _mean_sd(seed_scores(runs, checkpoint).values())


def verdict(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float, str]:
    margin = a[0] - b[0]
    spread = float(np.hypot(a[1], b[1]))
    if not np.isfinite(margin):
        return margin, spread, "cannot tell (no scores)"
    if margin > spread:
        return margin, spread, "agrees"
    if margin < -spread:
        return margin, spread, "disagrees"
    return margin, spread, "cannot tell"


def centered_scores(runs: list, checkpoint: str) -> np.ndarray:
    """Every (task, lr, seed) test score minus its task's mean: the spread across LRs and seeds."""
    out = []
    mine = [r for r in runs if r["checkpoint"] == checkpoint and r["test"] is not None]
    for task in dict.fromkeys(r["task"] for r in mine):
        v = np.asarray([r["test"] for r in mine if r["task"] == task], float)
        out.extend(v - v.mean())
    return np.asarray(out)


def stability_verdict(runs: list, clm: str, mlm: str) -> tuple[float, float, float, str]:
    from scipy import stats

    c, m = centered_scores(runs, clm), centered_scores(runs, mlm)
    if len(c) < 3 or len(m) < 3:
        return float("nan"), float("nan"), float("nan"), "cannot tell (too few runs)"
    p = float(stats.levene(c, m).pvalue)
    sc, sm = float(c.std(ddof=1)), float(m.std(ddof=1))
    if p < 0.05:
        return sc, sm, p, "agrees" if sc < sm else "disagrees"
    return sc, sm, p, "cannot tell"


def _val_losses(pretrain_csv: str) -> dict:
    if not os.path.isfile(pretrain_csv):
        return {}
    with open(pretrain_csv) as f:
        return {r["schedule"]: r for r in csv.DictReader(f)}


def _f(x, digits=2) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _plots(report_dir, final_runs, middle_runs, runs, steps, middle_ckpts, clm_fraction_rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in ("mlm40", "clm"):
        xs, ms, ss = [], [], []
        for frac, path in zip((0.25, 0.5, 0.75), middle_ckpts[name]):
            m, s = score(middle_runs, path)
            xs.append(frac), ms.append(m), ss.append(s)
        m, s = score(final_runs, runs[name])
        xs.append(1.0), ms.append(m), ss.append(s)
        ax.errorbar(np.asarray(xs) * steps, ms, yerr=ss, marker="o", capsize=3, label=LABELS[name])
    ax.set_xlabel("pretraining step"), ax.set_ylabel("news score (mean of tasks)")
    ax.set_title("Data efficiency"), ax.legend()
    fig.tight_layout()
    files["data_efficiency"] = "data_efficiency.png"
    fig.savefig(os.path.join(report_dir, files["data_efficiency"]), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r[0] for r in clm_fraction_rows]
    ax.errorbar([100 * x for x in xs], [r[1] for r in clm_fraction_rows], yerr=[r[2] for r in clm_fraction_rows],
                marker="o", capsize=3)
    ax.set_xlabel("% of steps trained with CLM (then MLM-40)"), ax.set_ylabel("news score (mean of tasks)")
    ax.set_title("Split ratio at equal steps")
    fig.tight_layout()
    files["split_ratio"] = "split_ratio.png"
    fig.savefig(os.path.join(report_dir, files["split_ratio"]), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(LABELS)
    data = [centered_scores(final_runs, runs[n]) for n in names]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), [LABELS[n].replace(" -> ", "\n") for n in names], fontsize=7)
    ax.set_ylabel("test score - task mean"), ax.set_title("Fine-tuning spread over learning rates and seeds")
    fig.tight_layout()
    files["stability"] = "stability.png"
    fig.savefig(os.path.join(report_dir, files["stability"]), dpi=120)
    plt.close(fig)
    return files


def write(report_dir: str, *, runs: dict, cpt: dict, final_dir: str, middle_dir: str, scale: dict,
          scale_name: str, pretrain_csv: str, elapsed_s: float) -> str:
    from mlm_vs_clm.checkpoint import resolve_step_dir

    os.makedirs(report_dir, exist_ok=True)
    final_runs = ft_report.load_runs(final_dir)
    middle_runs = ft_report.load_runs(middle_dir)
    steps = scale["steps"]
    middle_ckpts = {n: [os.path.abspath(os.path.join(runs[n], "checkpoints", str(int(round(f * steps)))))
                        for f in (0.25, 0.5, 0.75)] for n in ("mlm40", "clm")}
    # The fine-tuning grids name a checkpoint by its step directory (a run directory's newest step).
    cpt_dirs = cpt
    runs = {n: resolve_step_dir(p) for n, p in runs.items()}
    cpt = {n: resolve_step_dir(p) for n, p in cpt_dirs.items()}
    scores = {n: score(final_runs, runs[n]) for n in LABELS}
    cpt_scores = {n: score(final_runs, cpt[n]) for n in ("clm", "mlm40")}
    early = {n: score(middle_runs, middle_ckpts[n][0]) for n in ("mlm40", "clm")}
    best_split = max(("clm25_mlm40", "clm50_mlm40", "clm75_mlm40"), key=lambda n: scores[n][0]
                     if np.isfinite(scores[n][0]) else -1e9)

    v1 = verdict(scores["mlm40"], scores["clm"])
    v2a = verdict(early["clm"], early["mlm40"])
    sc, sm, p, v2b = stability_verdict(final_runs, runs["clm"], runs["mlm40"])
    v3 = verdict(scores[best_split], scores["mlm40"])
    v4 = verdict(cpt_scores["clm"], cpt_scores["mlm40"])
    losses = _val_losses(pretrain_csv)
    tasks = list(scale["tasks"])

    split_rows = [(0.0, *scores["mlm40"])] + [(f / 100, *scores[f"clm{f}_mlm40"]) for f in (25, 50, 75)] + [
        (1.0, *scores["clm"])]
    files = _plots(report_dir, final_runs, middle_runs, runs, steps, middle_ckpts, split_rows)

    L = []
    L.append("# Replication of the study's findings at small scale\n")
    L.append(f"Generated by `make replicate` (`python -m mlm_vs_clm.replicate --scale={scale_name}`) on "
             f"{datetime.date.today().isoformat()}, {platform.machine()} with {os.cpu_count()} CPU cores, in "
             f"{elapsed_s / 60:.0f} minutes. Scores are news-suite test scores in percent (mean of "
             f"{', '.join(tasks)}), {len(scale['seeds'])} seeds; see `mlm_vs_clm/replicate/report.py` for how "
             "scores, spreads and verdicts are computed. This is the `tiny` preset (about 0.6M parameters) trained for minutes: "
             "it tests whether the effects show at this scale, not whether they hold.\n")
    L.append("## Verdicts\n")
    L.append("| finding (PAPER.md) | comparison | margin | spread | this run |")
    L.append("|---|---|---|---|---|")
    L.append(f"| 1. MLM gives the best representations | MLM-40 - CLM, final | {_f(v1[0])} | {_f(v1[1])} | **{v1[2]}** |")
    L.append(f"| 2a. CLM is more data-efficient early | CLM - MLM-40 at {int(0.25 * steps)} steps | {_f(v2a[0])} | "
             f"{_f(v2a[1])} | **{v2a[2]}** |")
    L.append(f"| 2b. CLM is more stable to fine-tune | spread over LRs x seeds: CLM {_f(sc)} vs MLM-40 {_f(sm)} "
             f"(Levene p = {_f(p, 3)}) | {_f(sm - sc)} | - | **{v2b}** |")
    L.append(f"| 3. CLM-then-MLM beats MLM at equal steps and tokens | {LABELS[best_split]} (best split) - "
             f"MLM-40 | {_f(v3[0])} | {_f(v3[1])} | **{v3[2]}** |")
    L.append(f"| 4. MLM CPT from CLM beats MLM CPT from MLM | from CLM - from MLM-40, {scale['cpt_steps']} steps | "
             f"{_f(v4[0])} | {_f(v4[1])} | **{v4[2]}** |")
    L.append("\nFinding 3 picks the best of three splits, which favours the biphasic side; each split's "
             "score is in the table below.\n")

    L.append("## 1 and 3. Final checkpoints at equal steps and tokens\n")
    L.append("| pretraining | " + " | ".join(tasks) + " | mean ± seed sd | val MLM loss | val CLM loss |")
    L.append("|---|" + "---|" * len(tasks) + "---|---|---|")
    for n in LABELS:
        ts = task_scores(final_runs, runs[n])
        cells = [f"{_f(ts.get(t, (np.nan,))[0])} ± {_f(ts.get(t, (0, np.nan))[1])}" for t in tasks]
        row = losses.get(n, {})
        L.append(f"| {LABELS[n]} | " + " | ".join(cells) + f" | {_f(scores[n][0])} ± {_f(scores[n][1])}"
                 f"{_seeds_note(final_runs, runs[n])} | {_f(float(row.get('val_mlm_loss') or 'nan'), 3)} | "
                 f"{_f(float(row.get('val_clm_loss') or 'nan'), 3)} |")
    L.append(f"\n![split ratio]({files['split_ratio']})\n")

    L.append("## 2. Data efficiency and stability\n")
    L.append("| step | " + " | ".join(LABELS[n] for n in ("mlm40", "clm")) + " |")
    L.append("|---|---|---|")
    for i, frac in enumerate((0.25, 0.5, 0.75)):
        cells = [f"{_f(score(middle_runs, middle_ckpts[n][i])[0])} ± {_f(score(middle_runs, middle_ckpts[n][i])[1])}"
                 for n in ("mlm40", "clm")]
        L.append(f"| {int(round(frac * steps))} | " + " | ".join(cells) + " |")
    L.append(f"| {steps} | {_f(scores['mlm40'][0])} ± {_f(scores['mlm40'][1])} | {_f(scores['clm'][0])} ± "
             f"{_f(scores['clm'][1])} |")
    L.append(f"\nIntermediate checkpoints are fine-tuned at one learning rate; finals at the best of "
             f"{', '.join(f'{x:g}' for x in scale['learning_rates'])}.\n")
    L.append(f"![data efficiency]({files['data_efficiency']})\n")
    L.append("Spread of fine-tuning over every learning rate and seed (std of task-centred test scores; "
             "diverged runs counted):\n")
    L.append("| pretraining | spread | diverged runs |")
    L.append("|---|---|---|")
    for n in LABELS:
        c = centered_scores(final_runs, runs[n])
        div = sum(bool(r["diverged"]) for r in final_runs if r["checkpoint"] == runs[n])
        total = sum(r["checkpoint"] == runs[n] for r in final_runs)
        L.append(f"| {LABELS[n]} | {_f(float(c.std(ddof=1)) if len(c) > 1 else float('nan'))} | {div} of {total} |")
    L.append(f"\n![stability]({files['stability']})\n")

    L.append("## 4. Continued pretraining\n")
    L.append(f"MLM-40 for {scale['cpt_steps']} more steps (fresh optimizer, warmup-stable-decay) from each final "
             "checkpoint:\n")
    L.append("| start | news score | val MLM loss after CPT |")
    L.append("|---|---|---|")
    for n in ("clm", "mlm40"):
        val = _done_loss(cpt_dirs[n])
        L.append(f"| {LABELS[n]} run | {_f(cpt_scores[n][0])} ± {_f(cpt_scores[n][1])}"
                 f"{_seeds_note(final_runs, cpt[n])} | {_f(val, 3)} |")

    L.append("\n## Setup\n")
    L.append(f"- Pretraining: preset `tiny` (2 layers, d=64, vocab 4,096), {steps} steps of 16 x 128 tokens "
             "unless overridden, WSD learning-rate schedule, the demo corpus (BBC News) for every run in the "
             "same order; CLM-then-MLM runs branch from the CLM run at the switch (`mlm_vs_clm.sweep`).")
    L.append(f"- Overrides: {', '.join(scale['overrides'])}.")
    L.append(f"- Fine-tuning: `configs/finetune.py:news_quick` with {', '.join(scale['ft_overrides'])}, tasks "
             f"{', '.join(tasks)}, seeds {', '.join(map(str, scale['seeds']))}.")
    L.append("- Raw results: the runs' folders (`results.json` of each fine-tuning grid, `results.csv` of "
             "the pretraining sweep).")
    path = os.path.join(report_dir, "REPORT.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(L) + "\n")
    os.replace(path + ".tmp", path)
    return path


def _done_loss(rdir: str) -> float:
    import json

    try:
        with open(os.path.join(rdir, "done.json")) as f:
            return float(json.load(f).get("val_mlm_loss") or "nan")
    except (OSError, ValueError):
        return float("nan")
