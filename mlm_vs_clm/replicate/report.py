"""REPORT.md of `make replicate`: tables, plots and, per finding of PAPER.md, a test, its
p-value, the verdict and the FLOP ratio of the comparison.

Scores. For a checkpoint and a task, the learning rate is the one the fine-tuning table
picks (finetune/report.summarize: fewest runs without a score, then the best mean validation
score); a fine-tuning seed's score is then the mean over tasks of its test score at the chosen
rates, and a seed without a score at one of them failed: it has no score (it is not averaged
over fewer tasks). A pretraining run's score is the mean over its scored fine-tuning seeds. A
schedule's score is the mean over its pretraining seeds, its spread their standard deviation
(ddof 1, mlm_vs_clm/stats.py); the tables say when some seeds failed ("2 of 3 seeds").

Verdicts (mlm_vs_clm/stats.py). Each finding is a comparison A vs B that the study expects to
favour A, tested two-sided:
- 1, 2a, 3, 4: the paired t-test over pretraining seeds (the same seed: the same data order and
  the same initialisation of the network before the schedules part), on score(A) - score(B);
- 2b, stability: Levene's test on the spread over every learning rate and seed (task-centred
  scores), and Fisher's exact test on the counts of diverged fine-tuning runs;
- 3 compares the biphasic split with the best *validation* score (chosen before any test score is
  looked at) with pure MLM-40.
The six p-values are Holm-corrected together; `agrees` when the corrected p < 0.05 and the
effect has the expected sign, `disagrees` when it is below with the other sign, else `cannot
tell` (and always with a single pretraining seed: no test). Every comparison is at equal steps
and tokens; its FLOP ratio A / B (flops.py's analytic training FLOPs, from the pretraining
sweep's results.csv) is printed beside it, since a CLM step costs more than a sparse-head MLM step.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend state

from mlm_vs_clm import stats
from mlm_vs_clm.checkpoint import resolve_step_dir
from mlm_vs_clm.finetune import report as ft_report

LABELS = {"mlm40": "MLM-40", "clm": "CLM", "clm25_mlm40": "CLM 25 % -> MLM-40", "clm50_mlm40": "CLM 50 % -> MLM-40",
          "clm75_mlm40": "CLM 75 % -> MLM-40"}
SPLITS = ("clm25_mlm40", "clm50_mlm40", "clm75_mlm40")
fmt = stats.fmt


def _listed(checkpoints) -> list:
    return [checkpoints] if isinstance(checkpoints, str) else list(checkpoints)


def seed_scores(runs: list, checkpoint: str, key: str = "test") -> dict:
    """fine-tuning seed -> mean over tasks of the `key` score (test, or best_validation) at each
    task's best learning rate; NaN for a seed without a score at one of those rates."""
    mine = [r for r in runs if r["checkpoint"] == checkpoint]
    best = {row["task"]: row["best_lr"] for row in ft_report.summarize(mine)}
    per_seed = {r["seed"]: {} for r in mine}
    for r in mine:
        if r["lr"] == best[r["task"]] and r[key] is not None:
            per_seed[r["seed"]][r["task"]] = r[key]
    return {s: float(np.mean([got[t] for t in best])) if len(got) == len(best) else float("nan")
            for s, got in per_seed.items()}


def _seeds_note(runs: list, checkpoints) -> str:
    """' (k of n seeds)' when some seeds have no score, else ''."""
    values = [v for c in _listed(checkpoints) for v in seed_scores(runs, c).values()]
    scored = sum(np.isfinite(v) for v in values)
    return "" if scored == len(values) else f" ({scored} of {len(values)} seeds)"


def task_scores(runs: list, checkpoints) -> dict:
    """task -> (mean, sd) over pretraining runs of each run's test score at its best learning rate."""
    by_task = {}
    for c in _listed(checkpoints):
        for row in ft_report.summarize([r for r in runs if r["checkpoint"] == c]):
            by_task.setdefault(row["task"], []).append(row["test_mean"])
    return {t: stats.mean_sd(v) for t, v in by_task.items()}


def run_scores(runs: list, checkpoints: dict, key: str = "test") -> dict:
    """pretraining seed -> that run's score (mean over its scored fine-tuning seeds)."""
    return {seed: stats.summarize(seed_scores(runs, c, key).values()).mean for seed, c in checkpoints.items()}


def score(runs: list, checkpoints) -> tuple[float, float]:
    """(mean, sd) over pretraining runs; `checkpoints` a dict seed -> checkpoint, or one checkpoint
    (then over its fine-tuning seeds)."""
    if isinstance(checkpoints, str):
        return stats.mean_sd(seed_scores(runs, checkpoints).values())
    return stats.mean_sd(run_scores(runs, checkpoints).values())


def centered_scores(runs: list, checkpoints) -> np.ndarray:
    """Every (task, lr, seed) test score minus its (run, task) mean: the spread across LRs and seeds."""
    out = []
    for c in _listed(checkpoints):
        mine = [r for r in runs if r["checkpoint"] == c and r["test"] is not None]
        for task in dict.fromkeys(r["task"] for r in mine):
            v = np.asarray([r["test"] for r in mine if r["task"] == task], float)
            out.extend(v - v.mean())
    return np.asarray(out)


def diverged(runs: list, checkpoints) -> tuple[int, int]:
    mine = [r for r in runs if r["checkpoint"] in set(_listed(checkpoints))]
    return sum(bool(r["diverged"]) for r in mine), len(mine)


def _pretrain_rows(pretrain_csv: str) -> dict:
    """(schedule, seed) -> the pretraining sweep's results.csv row (val losses, flops)."""
    if not os.path.isfile(pretrain_csv):
        return {}
    with open(pretrain_csv) as f:
        return {(r["schedule"], int(r["seed"])): r for r in csv.DictReader(f)}


def _num(row: dict, key: str) -> float:
    try:
        return float(row.get(key) or "nan")
    except (TypeError, ValueError):
        return float("nan")


def _flops(rows: dict, schedule: str) -> float:
    return float(np.nanmean([_num(r, "flops") for (s, _), r in rows.items() if s == schedule] or [np.nan]))


def _plots(report_dir, final_runs, middle_runs, runs, steps, middle_ckpts, split_rows):
    files = {}
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for name in ("mlm40", "clm"):
        xs, ms, ss = [], [], []
        for i, frac in enumerate((0.25, 0.5, 0.75)):
            m, s = score(middle_runs, {seed: c[i] for seed, c in middle_ckpts[name].items()})
            xs.append(frac), ms.append(m), ss.append(s)
        m, s = score(final_runs, runs[name])
        xs.append(1.0), ms.append(m), ss.append(s)
        ax.errorbar(np.asarray(xs) * steps, ms, yerr=np.nan_to_num(ss), marker="o", capsize=3, label=LABELS[name])
    ax.set_xlabel("pretraining step"), ax.set_ylabel("news score (mean of tasks)")
    ax.set_title("Data efficiency"), ax.legend()
    fig.tight_layout()
    files["data_efficiency"] = "data_efficiency.png"
    fig.savefig(os.path.join(report_dir, files["data_efficiency"]), dpi=120)

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.errorbar([100 * r[0] for r in split_rows], [r[1] for r in split_rows],
                yerr=np.nan_to_num([r[2] for r in split_rows]), marker="o", capsize=3)
    ax.set_xlabel("% of steps trained with CLM (then MLM-40)"), ax.set_ylabel("news score (mean of tasks)")
    ax.set_title("Split ratio at equal steps")
    fig.tight_layout()
    files["split_ratio"] = "split_ratio.png"
    fig.savefig(os.path.join(report_dir, files["split_ratio"]), dpi=120)

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    names = list(LABELS)
    ax.boxplot([centered_scores(final_runs, runs[n].values()) for n in names], showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), [LABELS[n].replace(" -> ", "\n") for n in names], fontsize=7)
    ax.set_ylabel("test score - run and task mean"), ax.set_title("Fine-tuning spread over learning rates and seeds")
    fig.tight_layout()
    files["stability"] = "stability.png"
    fig.savefig(os.path.join(report_dir, files["stability"]), dpi=120)
    return files


def findings(final_runs, middle_runs, runs, cpt, middle_ckpts, pre_rows, steps, cpt_steps) -> list[dict]:
    """The six tests of the findings, Holm-corrected together (module docstring)."""
    val = {n: stats.summarize(run_scores(final_runs, runs[n], "best_validation").values()).mean for n in SPLITS}
    best_split = max(SPLITS, key=lambda n: val[n] if np.isfinite(val[n]) else -np.inf)
    early = {n: {seed: c[0] for seed, c in middle_ckpts[n].items()} for n in ("mlm40", "clm")}
    fl = {n: _flops(pre_rows, n) for n in LABELS}
    cpt_fl = fl["mlm40"] * cpt_steps / steps  # MLM-40 for cpt_steps, the same for both starts
    out = [
        dict(finding="1. MLM gives the best representations", comparison="MLM-40 - CLM, final",
             test=stats.compare(run_scores(final_runs, runs["mlm40"]), run_scores(final_runs, runs["clm"])),
             flops=fl["mlm40"] / fl["clm"]),
        dict(finding="2a. CLM is more data-efficient early",
             comparison=f"CLM - MLM-40 at {int(round(0.25 * steps))} steps",
             test=stats.compare(run_scores(middle_runs, early["clm"]), run_scores(middle_runs, early["mlm40"])),
             flops=fl["clm"] / fl["mlm40"]),
        dict(finding="2b. CLM is more stable to fine-tune",
             comparison="spread over LRs x seeds: sd(MLM-40) - sd(CLM)",
             test=stats.levene(centered_scores(final_runs, runs["mlm40"].values()),
                               centered_scores(final_runs, runs["clm"].values())),
             flops=fl["clm"] / fl["mlm40"]),
        dict(finding="2b. CLM is more stable to fine-tune",
             comparison="diverged runs: rate(MLM-40) - rate(CLM)",
             test=stats.fisher(*diverged(final_runs, runs["mlm40"].values()),
                               *diverged(final_runs, runs["clm"].values())),
             flops=fl["clm"] / fl["mlm40"]),
        dict(finding="3. CLM-then-MLM beats MLM at equal steps and tokens",
             comparison=f"{LABELS[best_split]} (best on validation) - MLM-40",
             test=stats.compare(run_scores(final_runs, runs[best_split]), run_scores(final_runs, runs["mlm40"])),
             flops=fl[best_split] / fl["mlm40"], split=best_split),
        dict(finding="4. MLM CPT from CLM beats MLM CPT from MLM",
             comparison=f"from CLM - from MLM-40, {cpt_steps} steps",
             test=stats.compare(run_scores(final_runs, cpt["clm"]), run_scores(final_runs, cpt["mlm40"])),
             flops=(fl["clm"] + cpt_fl) / (fl["mlm40"] + cpt_fl)),
    ]
    for f, (q, v) in zip(out, stats.verdicts([f["test"] for f in out])):
        f.update(p_holm=q, verdict=v)
    return out


def write(report_dir: str, *, runs: dict, cpt: dict, final_dir: str, middle_dir: str, scale: dict,
          scale_name: str, pretrain_csv: str, elapsed_s: float) -> str:
    """`runs` and `cpt`: (schedule, pretraining seed) -> run folder."""
    os.makedirs(report_dir, exist_ok=True)
    final_runs = ft_report.load_runs(final_dir)
    middle_runs = ft_report.load_runs(middle_dir)
    steps, seeds = scale["steps"], tuple(scale["pretrain_seeds"])
    middle_ckpts = {n: {s: [os.path.abspath(os.path.join(runs[(n, s)], "checkpoints", str(int(round(f * steps)))))
                            for f in (0.25, 0.5, 0.75)] for s in seeds} for n in ("mlm40", "clm")}
    # The fine-tuning grids name a checkpoint by its step directory (a run directory's newest step).
    cpt_dirs = cpt
    by_sched = {n: {s: resolve_step_dir(runs[(n, s)]) for s in seeds} for n in LABELS}
    cpt = {n: {s: resolve_step_dir(cpt_dirs[(n, s)]) for s in seeds} for n in ("clm", "mlm40")}
    pre_rows = _pretrain_rows(pretrain_csv)
    scores = {n: score(final_runs, by_sched[n]) for n in LABELS}
    tasks = list(scale["tasks"])
    found = findings(final_runs, middle_runs, by_sched, cpt, middle_ckpts, pre_rows, steps, scale["cpt_steps"])

    split_rows = [(0.0, *scores["mlm40"])] + [(f / 100, *scores[f"clm{f}_mlm40"]) for f in (25, 50, 75)] + [
        (1.0, *scores["clm"])]
    files = _plots(report_dir, final_runs, middle_runs, by_sched, steps, middle_ckpts, split_rows)
    n_ft = len(scale["seeds"])

    L = []
    L.append("# Replication of the study's findings at small scale\n")
    L.append(f"Generated by `make replicate` (`python -m mlm_vs_clm.replicate --scale={scale_name}`) on "
             f"{datetime.date.today().isoformat()}, {platform.machine()} with {os.cpu_count()} CPU cores, in "
             f"{elapsed_s / 60:.0f} minutes. Scores are news-suite test scores in percent (mean of "
             f"{', '.join(tasks)}); **{len(seeds)} pretraining seeds per schedule** (the same data order; the "
             f"initialisation and the masks change), each fine-tuned with {n_ft} fine-tuning seed"
             f"{'s' * (n_ft != 1)}; see `mlm_vs_clm/replicate/report.py` for how scores, tests and verdicts are "
             "computed. This is the `tiny` preset (about 0.6M parameters) trained for minutes: it tests whether "
             "the effects show at this scale, not whether they hold.\n")
    L.append("## Verdicts\n")
    L.append(f"Two-sided tests; p-values Holm-corrected over the {len(found)} tests at alpha = {stats.ALPHA}. "
             "Effects are A - B for a comparison the study expects to favour A. Every comparison is at equal "
             "steps and tokens; the FLOP ratio A / B is the analytic training compute (flops.py), pretraining "
             "included for CPT.\n")
    L.append("| finding (PAPER.md) | comparison | test | n | effect | p | Holm p | FLOP ratio | this run |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for f in found:
        t = f["test"]
        n = f"{t.n_a}" if t.name == "paired t" else f"{t.n_a} vs {t.n_b}"
        L.append(f"| {f['finding']} | {f['comparison']} | {t.name} | {n} | {fmt(t.diff)} | {fmt(t.p, 'p')} | "
                 f"{fmt(f['p_holm'], 'p')} | {fmt(f['flops'], '.3g')} | **{f['verdict']}** |")
    if len(seeds) < 2:
        L.append("\nOne pretraining run per schedule: no test can tell, whatever the margins.\n")
    L.append(f"\nFinding 3's split is the one with the best mean *validation* score over its pretraining runs "
             f"({LABELS[found[4]['split']]}), chosen before its test scores are compared; each split's test score is "
             "in the table below. n: paired pretraining seeds, or runs on each side.\n")

    L.append("## 1 and 3. Final checkpoints at equal steps and tokens\n")
    L.append("| pretraining | FLOPs | " + " | ".join(tasks) + " | mean ± sd over pretraining seeds | val MLM loss | "
             "val CLM loss |")
    L.append("|---|---|" + "---|" * len(tasks) + "---|---|---|")
    for n in LABELS:
        ts = task_scores(final_runs, by_sched[n].values())
        cells = [f"{fmt(ts.get(t, (np.nan, np.nan))[0])} ± {fmt(ts.get(t, (np.nan, np.nan))[1])}" for t in tasks]
        rows = [r for (s, _), r in pre_rows.items() if s == n]
        losses = [fmt(float(np.nanmean([_num(r, k) for r in rows] or [np.nan])), ".3f")
                  for k in ("val_mlm_loss", "val_clm_loss")]
        L.append(f"| {LABELS[n]} | {fmt(_flops(pre_rows, n), '.3g')} | " + " | ".join(cells)
                 + f" | {fmt(scores[n][0])} ± {fmt(scores[n][1])}{_seeds_note(final_runs, by_sched[n].values())} | "
                 + " | ".join(losses) + " |")
    L.append("\nValidation losses are on the same held-out rows and the same masks for every run (40 % masking, "
             "every selected token replaced by the mask token, whatever the run trained with); CLM runs are "
             "judged on downstream scores, not on the MLM loss of a task they never trained on.\n")
    L.append(f"![split ratio]({files['split_ratio']})\n")

    L.append("## 2. Data efficiency and stability\n")
    L.append("| step | " + " | ".join(LABELS[n] for n in ("mlm40", "clm")) + " |")
    L.append("|---|---|---|")
    for i, frac in enumerate((0.25, 0.5, 0.75)):
        cells = []
        for n in ("mlm40", "clm"):
            m, sd = score(middle_runs, {s: c[i] for s, c in middle_ckpts[n].items()})
            cells.append(f"{fmt(m)} ± {fmt(sd)}")
        L.append(f"| {int(round(frac * steps))} | " + " | ".join(cells) + " |")
    L.append(f"| {steps} | {fmt(scores['mlm40'][0])} ± {fmt(scores['mlm40'][1])} | {fmt(scores['clm'][0])} ± "
             f"{fmt(scores['clm'][1])} |")
    L.append(f"\nIntermediate checkpoints are fine-tuned at one learning rate; finals at the best of "
             f"{', '.join(f'{x:g}' for x in scale['learning_rates'])}.\n")
    L.append(f"![data efficiency]({files['data_efficiency']})\n")
    L.append("Spread of fine-tuning over every learning rate and seed (sd, ddof 1, of test scores centred on "
             "each run and task; diverged runs counted):\n")
    L.append("| pretraining | spread | diverged runs |")
    L.append("|---|---|---|")
    for n in LABELS:
        k, total = diverged(final_runs, by_sched[n].values())
        L.append(f"| {LABELS[n]} | {fmt(stats.sd(centered_scores(final_runs, by_sched[n].values())))} | "
                 f"{k} of {total} |")
    L.append(f"\n![stability]({files['stability']})\n")

    L.append("## 4. Continued pretraining\n")
    L.append(f"MLM-40 for {scale['cpt_steps']} more steps (fresh optimizer, warmup-stable-decay) from each final "
             "checkpoint, one per pretraining seed:\n")
    L.append("| start | news score | val MLM loss after CPT |")
    L.append("|---|---|---|")
    for n in ("clm", "mlm40"):
        m, sd = score(final_runs, cpt[n])
        val = float(np.nanmean([_done_loss(cpt_dirs[(n, s)]) for s in seeds]))
        L.append(f"| {LABELS[n]} runs | {fmt(m)} ± {fmt(sd)}{_seeds_note(final_runs, cpt[n].values())} | "
                 f"{fmt(val, '.3f')} |")

    L.append("\n## Setup\n")
    L.append(f"- Pretraining: preset `tiny` (2 layers, d=64, vocab 4,096), {steps} steps of 16 x 128 tokens "
             "unless overridden, WSD learning-rate schedule, the demo corpus (BBC News) for every run in the "
             f"same order (data.seed=0), pretraining seeds {', '.join(map(str, seeds))}; CLM-then-MLM runs branch "
             "from the CLM run of their seed at the switch (`mlm_vs_clm.sweep`).")
    L.append(f"- Overrides: {', '.join(scale['overrides'])}.")
    L.append(f"- Fine-tuning: `configs/finetune.py:news_quick` with {', '.join(scale['ft_overrides'])}, tasks "
             f"{', '.join(tasks)}, fine-tuning seeds {', '.join(map(str, scale['seeds']))}.")
    L.append("- Raw results: the runs' folders (`results.json` of each fine-tuning grid, `results.csv` of "
             "the pretraining sweep).")
    path = os.path.join(report_dir, "REPORT.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(L) + "\n")
    os.replace(path + ".tmp", path)
    return path


def _done_loss(rdir: str) -> float:
    try:
        with open(os.path.join(rdir, "done.json")) as f:
            return float(json.load(f).get("val_mlm_loss") or "nan")
    except (OSError, ValueError):
        return float("nan")
