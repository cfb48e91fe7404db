"""`sweep analyze`: fits, plots and DIR/summary.md from a sweep's DIR/results.csv (+ finetune.csv).

- A budget is (size, steps); schedules compared at a budget share both; seeds are replicates.
- Score: `ft_mean` (fine-tuning test score, higher is better) when results.csv has any, else
  `val_mlm_loss` (lower is better); summary.md says which. A schedule's score at a budget is
  the mean over seeds; its seed spread the standard deviation (ddof 1). The winner's margin
  to the runner-up exceeds the seed spread when margin > sqrt(sd_winner^2 + sd_runner_up^2)
  (the spread of a difference of two single-seed results); with one seed it is unknown.
- Per schedule, the law L = E + A/N^alpha + B/D^beta (scaling_law.py) is fitted to the
  validation loss (`loss`, default val_mlm_loss) of its runs, N = params, D = tokens, and its
  compute-optimal frontier (C = 6 N D) tabulated at the sweep's own 6 N D values and powers of
  ten around them, each value with its 95 % interval (delta method) and rows outside the fitted
  compute or model sizes marked extrapolated. Runs not `done`, or without that loss, are listed
  and not used.
Outputs: DIR/fits.json, DIR/summary.md, DIR/loss_vs_compute.png, DIR/score_vs_compute.png,
DIR/score_vs_clm_fraction.png, DIR/finetune_spread.png (plots without data are skipped with a note).
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from mlm_vs_clm.sweep import scaling_law

REQUIRED = ("run", "size", "schedule", "clm_fraction", "mask_ratio", "seed", "params", "steps", "tokens", "flops",
            "val_mlm_loss", "val_clm_loss", "saved_flops", "status")
NUMBERS = ("clm_fraction", "mask_ratio", "seed", "params", "steps", "tokens", "flops")  # must be present
OPTIONAL_NUMBERS = ("wall_s", "val_mlm_loss", "val_clm_loss", "saved_flops")  # "" = missing
FT_REQUIRED = ("run", "task", "lr", "seed", "test", "diverged")


# ---------------------------------------------------------------- reading


def _number(path, line, row, col, text, required):
    if text.strip() == "":
        if required:
            raise ValueError(f"{path}: column {col!r} is empty on line {line} (run {row.get('run')!r})")
        return None
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{path}: column {col!r} on line {line} (run {row.get('run')!r}): "
                         f"{text!r} is not a number") from None
    return v if np.isfinite(v) else None


def _read_csv(path, required):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}")
        return header, [(i + 2, r) for i, r in enumerate(reader)]


def read_results(path: str) -> tuple[list[dict], list[str]]:
    """Rows of results.csv with numbers parsed (None = missing) and the ft_* columns."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not found (run the sweep, or `sweep collect`, first)")
    header, raw = _read_csv(path, REQUIRED)
    ft_cols = [c for c in header if c.startswith("ft_")]
    rows = []
    for line, r in raw:
        row = dict(r)
        for col in NUMBERS + OPTIONAL_NUMBERS + tuple(ft_cols):
            if col in r:
                row[col] = _number(path, line, r, col, r[col] or "", col in NUMBERS)
        row["seed"], row["steps"] = int(row["seed"]), int(row["steps"])
        rows.append(row)
    return rows, ft_cols


def read_finetune(path: str) -> list[dict] | None:
    """Rows of finetune.csv (test: None when missing), or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    _, raw = _read_csv(path, FT_REQUIRED)
    rows = []
    for line, r in raw:
        rows.append(dict(r, lr=_number(path, line, r, "lr", r["lr"] or "", True),
                         test=_number(path, line, r, "test", r["test"] or "", False),
                         diverged=bool(_number(path, line, r, "diverged", r["diverged"] or "0", False))))
    return rows


# ---------------------------------------------------------------- statistics


def _mean_sd(values) -> tuple[float, float | None, int]:
    v = np.asarray([x for x in values if x is not None], float)
    if not len(v):
        return float("nan"), None, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None, len(v)


def budgets(rows) -> list[tuple[str, int]]:
    """(size, steps) pairs, smallest model and fewest steps first."""
    key = {(r["size"], r["steps"]): (r["params"], r["steps"], r["size"]) for r in rows}
    return sorted(key, key=key.get)


def winners(rows, metric: str, higher_is_better: bool) -> list[dict]:
    """Per budget: the best schedule by the mean over seeds of `metric`, the runner-up, the margin,
    the seed spread of the difference and whether the margin exceeds it (None: unknown)."""
    out = []
    for size, steps in budgets(rows):
        here = [r for r in rows if (r["size"], r["steps"]) == (size, steps)]
        stats = {}
        for sched in dict.fromkeys(r["schedule"] for r in here):
            m, sd, n = _mean_sd(r[metric] for r in here if r["schedule"] == sched)
            if n:
                stats[sched] = (m, sd, n)
        ranked = sorted(stats, key=lambda s: -stats[s][0] if higher_is_better else stats[s][0])
        if not ranked:
            continue
        w = {"size": size, "steps": steps, "winner": ranked[0], "score": stats[ranked[0]][0],
             "seeds": stats[ranked[0]][2], "runner_up": None, "runner_up_score": None, "margin": None,
             "spread": None, "exceeds_spread": None}
        if len(ranked) > 1:
            (m1, sd1, _), (m2, sd2, _) = stats[ranked[0]], stats[ranked[1]]
            w.update(runner_up=ranked[1], runner_up_score=m2, margin=abs(m1 - m2))
            if sd1 is not None and sd2 is not None:
                w["spread"] = float(np.hypot(sd1, sd2))
                w["exceeds_spread"] = bool(w["margin"] > w["spread"])
        out.append(w)
    return out


def fit_schedules(rows, loss: str) -> dict:
    """schedule -> {"fit": LawFit | None, "reason": str | None, "frontier": dict | None}; every frontier
    on the same compute grid (the 6 N D of every run, and powers of ten around them)."""
    out = {}
    C = scaling_law.frontier_compute_grid([6.0 * r["params"] * r["tokens"] for r in rows]) if rows else None
    for sched in dict.fromkeys(r["schedule"] for r in rows):
        mine = [r for r in rows if r["schedule"] == sched]
        N, D, L = (np.array([r[c] for r in mine], float) for c in ("params", "tokens", loss))
        try:
            fit = scaling_law.fit_law(N, D, L)
        except scaling_law.NoFit as e:
            out[sched] = {"fit": None, "reason": str(e), "frontier": None}
            continue
        out[sched] = {"fit": fit, "reason": None, "frontier": scaling_law.frontier(fit, C)}
    return out


# ---------------------------------------------------------------- plots


def _figure(ncols: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(5.5 * ncols, 4))
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _colors(schedules):
    from matplotlib import colormaps

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
    from matplotlib import ticker

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
            stats = [_mean_sd(r[col] for r in pts if r["clm_fraction"] == x) for x in xs]
            label = f"{size}, {steps} steps" + (f", mask {100 * mask:.0f} %" if len(masks) > 1 else "")
            ax.errorbar([100 * x for x in xs], [s[0] for s in stats], yerr=[s[1] or 0.0 for s in stats], marker="o",
                        capsize=3, label=label)
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
        data = [[r["test"] for r in ft_rows if r["task"] == task and schedule_of[r["run"]] == s and r["test"] is not None]
                for s in scheds]
        ax.boxplot([d or [np.nan] for d in data], showfliers=False)
        for i, d in enumerate(data):
            ax.scatter(i + 1 + rng.uniform(-0.15, 0.15, len(d)), d, s=8, alpha=0.6, color="k")
        ax.set_xticks(range(1, len(scheds) + 1), scheds, rotation=30, fontsize=7)
        ax.set_ylabel("test score (%)"), ax.set_title(f"{task}: every budget, learning rate and seed")
    return _save(fig, path)


# ---------------------------------------------------------------- summary


def _g(x, digits=4):
    if isinstance(x, int):
        return str(x)
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}g}"


def _table(header, lines):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(l) + " |" for l in lines]


def _winner_line(w, metric):
    if w["runner_up"] is None:
        return f"{w['size']}, {w['steps']} steps: {w['winner']} ({metric} {_g(w['score'])}; the only schedule)"
    if w["margin"] == 0:
        return f"{w['size']}, {w['steps']} steps: tie between {w['winner']} and {w['runner_up']} ({metric} {_g(w['score'])})"
    if w["exceeds_spread"] is None:
        verdict = "one seed: spread unknown"
    else:
        verdict = f"{'exceeds' if w['exceeds_spread'] else 'within'} the seed spread {_g(w['spread'], 3)}"
    return (f"{w['size']}, {w['steps']} steps: {w['winner']} ({metric} {_g(w['score'])}) over {w['runner_up']} "
            f"({_g(w['runner_up_score'])}), margin {_g(w['margin'], 3)}, {verdict}")


def _frontier_cell(fr, i):
    (n_lo, n_hi), (l_lo, l_hi) = fr["N_opt_ci95"][i], fr["L_ci95"][i]
    cell = (f"{_g(fr['N_opt'][i], 3)} [{_g(n_lo, 3)}, {_g(n_hi, 3)}] / {_g(fr['D_opt'][i], 3)} / "
            f"{_g(fr['L'][i], 3)} [{_g(l_lo, 3)}, {_g(l_hi, 3)}]")
    return cell + (" **extrapolated**" if fr["extrapolated"][i] else "")


def write_summary(path, res, used, unused, ft_cols, fits, wins, metric, higher, loss, notes, ft_rows, schedule_of,
                  flops_ratio):
    out = ["# Sweep summary", "",
           f"{len(used)} runs used, {len(unused)} not used. Winners are ranked by **{metric}** "
           f"({'higher' if higher else 'lower'} is better"
           + ("; the mean of the fine-tuning test scores" if metric == "ft_mean" else "; no fine-tuning scores")
           + f"); fits are of **{loss}**.", "", "## Winner per budget", ""]
    out += [f"- {_winner_line(w, metric)}" for w in wins] or ["- no budget has a score"]
    out += ["", "## Runs", ""]
    cols = ["size", "steps", "schedule", "seed", "tokens", "flops", "val_mlm_loss", "val_clm_loss"] + ft_cols
    out += _table(["run"] + cols, [[r["run"]] + [_g(r.get(c)) if not isinstance(r.get(c), str) else r[c] for c in cols]
                                   for r in used])
    if unused:
        out += ["", "Not used (listed, not fitted or ranked):", ""]
        out += [f"- {r['run']}: status {r['status']!r}" + ("" if r["status"] != "done" else f", no {loss}")
                for r in unused]
    out += ["", f"## Scaling-law fits of {loss}: L = E + A / N^alpha + B / D^beta", "",
            "N = parameters without the input embedding, D = training tokens; 95 % intervals from the "
            "Jacobian covariance (see docs/sweeps.md)."]
    lines = []
    for sched, f in fits.items():
        if f["fit"] is None:
            out.append(f"- {sched}: no fit: {f['reason']}")
            continue
        fit = f["fit"]
        lines.append([sched] + [f"{_g(getattr(fit, k), 3)} [{_g(fit.ci95[k][0], 3)}, {_g(fit.ci95[k][1], 3)}]"
                                for k in scaling_law.PARAMS]
                     + [_g(fit.rmse, 3), str(fit.n_points), ", ".join(fit.at_bound) or "-"])
    if lines:
        out += [""] + _table(["schedule", "E", "A", "alpha", "B", "beta", "RMSE", "points", "at bound"], lines)
        lo, hi = flops_ratio
        out += ["", "### Compute-optimal frontier (C = 6 N D): N_opt / D_opt / predicted loss", "",
                f"The sweep's analytic FLOPs are {lo:.3g}-{hi:.3g} x 6 N D (6 N D leaves out attention and the "
                "output head).", ""]
        fitted = [s for s, f in fits.items() if f["fit"] is not None]
        C = fits[fitted[0]]["frontier"]["C"]  # the same grid for every schedule
        out += ["Each cell: N_opt [95 % interval] / D_opt / loss [95 % interval] (delta method from the fit's "
                "covariance); **extrapolated**: C or N_opt outside the fitted runs, where the law is only a guess.", ""]
        out += _table(["C"] + fitted, [[_g(c, 3)] + [_frontier_cell(fits[s]["frontier"], i) for s in fitted]
                                       for i, c in enumerate(C)])
    if ft_rows:
        out += ["", "## Fine-tuning spread (every learning rate and seed)", ""]
        lines = []
        for sched in dict.fromkeys(schedule_of[r["run"]] for r in ft_rows):
            mine = [r for r in ft_rows if schedule_of[r["run"]] == sched]
            centered = []  # minus the mean of each (run, task): the spread over learning rates and seeds
            for key in dict.fromkeys((r["run"], r["task"]) for r in mine):
                v = [r["test"] for r in mine if (r["run"], r["task"]) == key and r["test"] is not None]
                centered += list(np.asarray(v) - np.mean(v)) if v else []
            lines.append([sched, str(len(mine)), str(sum(r["diverged"] for r in mine)),
                          _g(float(np.std(centered, ddof=1)) if len(centered) > 1 else None, 3)])
        out += _table(["schedule", "fine-tuning runs", "diverged", "sd over learning rates and seeds"], lines)
    saved = sum(r["saved_flops"] or 0.0 for r in res)
    total = sum(r["flops"] for r in res)
    out += ["", "## Compute", "", f"Branching from CLM trunks saved {saved:.3g} of the grid's {total:.3g} "
            f"training FLOPs ({100 * saved / max(total, 1.0):.0f} %)."]
    out += ["", "## Plots", ""] + [f"- {n}" for n in notes]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


# ---------------------------------------------------------------- entry points


def analyze(workdir: str, loss: str = "val_mlm_loss") -> dict:
    """Reads DIR/results.csv (+ finetune.csv), writes fits.json, summary.md and the plots."""
    res, ft_cols = read_results(os.path.join(workdir, "results.csv"))
    if loss not in ("val_mlm_loss", "val_clm_loss"):
        raise ValueError(f"analyze: loss must be val_mlm_loss or val_clm_loss, got {loss!r}")
    ft_all = read_finetune(os.path.join(workdir, "finetune.csv"))
    used = [r for r in res if r["status"] == "done" and r[loss] is not None]
    unused = [r for r in res if r not in used]
    schedule_of = {r["run"]: r["schedule"] for r in used}
    ft_rows = [r for r in ft_all or [] if r["run"] in schedule_of]
    has_ft = "ft_mean" in ft_cols and any(r["ft_mean"] is not None for r in used)
    metric, higher = ("ft_mean", True) if has_ft else ("val_mlm_loss", False)
    fits = fit_schedules(used, loss)
    wins = winners(used, metric, higher)
    files, notes = [], []
    if used:
        ylabel = "fine-tuning score (%, mean of tasks)" if has_ft else "validation MLM loss (lower is better)"
        files += [plot_vs_compute(used, loss, loss, os.path.join(workdir, "loss_vs_compute.png"), fits),
                  plot_vs_clm_fraction(used, metric, ylabel, os.path.join(workdir, "score_vs_clm_fraction.png"))]
    else:
        notes.append("no plots: no finished run has a loss")
    if used and has_ft:
        files.append(plot_vs_compute(used, "ft_mean", "fine-tuning score (%)", os.path.join(workdir, "score_vs_compute.png")))
    else:
        notes.append("score_vs_compute.png skipped: results.csv has no fine-tuning scores")
    if ft_rows:
        files.append(plot_finetune_spread(ft_rows, schedule_of, os.path.join(workdir, "finetune_spread.png")))
    else:
        notes.append("finetune_spread.png skipped: no finetune.csv (or no rows of finished runs)")
    notes = [os.path.basename(f) for f in files] + notes
    ratio = [r["flops"] / (6.0 * r["params"] * r["tokens"]) for r in used]
    out = {"loss": loss, "metric": metric, "higher_is_better": higher, "law": "L = E + A/N^alpha + B/D^beta",
           "frontier_compute": "C = 6 N D",
           "flops_over_6ND": [min(ratio), max(ratio)] if ratio else None,
           "fits": {s: {"fit": f["fit"].to_dict() if f["fit"] else None, "reason": f["reason"],
                        "frontier": {k: v.tolist() for k, v in f["frontier"].items()} if f["frontier"] else None}
                    for s, f in fits.items()},
           "winners": wins, "runs_used": len(used), "runs_not_used": [r["run"] for r in unused],
           "saved_flops": sum(r["saved_flops"] or 0.0 for r in res)}
    fits_path, summary_path = os.path.join(workdir, "fits.json"), os.path.join(workdir, "summary.md")
    with open(fits_path, "w") as f:
        json.dump(out, f, indent=1)
    write_summary(summary_path, res, used, unused, ft_cols, fits, wins, metric, higher, loss, notes, ft_rows,
                  schedule_of, out["flops_over_6ND"])
    out["files"] = [fits_path, summary_path] + files
    out["notes"] = notes
    return out


def main(workdir: str, loss: str = "val_mlm_loss") -> dict:
    """analyze() and print where the files went and the winner per budget."""
    out = analyze(workdir, loss)
    print(f"sweep: wrote {', '.join(out['files'])}")
    for note in out["notes"]:
        if "skipped" in note or "no plots" in note:
            print(f"sweep: {note}")
    for sched, f in out["fits"].items():
        if f["fit"] is None:
            print(f"sweep: no {loss} fit for {sched}: {f['reason']}")
    for w in out["winners"]:
        print(f"sweep: {_winner_line(w, out['metric'])}")
    return out
