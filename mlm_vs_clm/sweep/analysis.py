"""`sweep analyze`: fits, plots and DIR/summary.md from a sweep's DIR/results.csv (+ finetune.csv).

- A budget is (size, steps); schedules compared at a budget share both; seeds are replicates
  (pretraining seeds: the same seed means the same initialisation and data order).
- Score: `ft_mean` (fine-tuning test score, higher is better) when results.csv has any. Without
  fine-tuning scores, the schedules that end in MLM are ranked on `val_mlm_loss` (lower is
  better) and pure CLM runs are left unranked: their validation MLM loss measures a task they
  never trained on, and their CLM loss is not comparable with it. summary.md says which.
- Statistics are mlm_vs_clm/stats.py's: a schedule's score at a budget is the mean over seeds,
  its spread the sd (ddof 1). The winner vs the runner-up is tested with the paired t-test over
  the seeds both ran (else Welch's), two-sided, Holm-corrected over the budgets at alpha 0.05;
  one seed gives no test (`cannot tell`). Each winner line carries the FLOP ratio of the two
  schedules (flops.py's analytic training FLOPs: equal steps are not equal compute).
- Per schedule, the law L = E + A/N^alpha + B/D^beta (scaling_law.py) is fitted to a validation
  loss of its runs (`loss`: `auto`, the default, fits each schedule on the loss of the objective
  it ends with, val_clm_loss for pure CLM and val_mlm_loss otherwise; or one loss for all),
  N = params, D = tokens, and its compute-optimal frontier (C = 6 N D) tabulated at the sweep's
  own 6 N D values and powers of ten around them, each value with its 95 % interval (delta
  method) and rows outside the fitted compute or model sizes marked extrapolated. A fit with
  4 or fewer residual degrees of freedom is flagged: its intervals are unreliable (docs/sweeps.md),
  and the fit with E fixed (to the free fit's E) and the exponent ratio a/(a+b) are given beside it.
  Runs not `done`, or without the loss they need, are listed and not used.
Outputs: DIR/fits.json, DIR/summary.md, DIR/loss_vs_compute.png, DIR/score_vs_compute.png,
DIR/score_vs_clm_fraction.png, DIR/finetune_spread.png (plots without data are skipped with a note).
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from mlm_vs_clm import stats
from mlm_vs_clm.sweep import plots, scaling_law
from mlm_vs_clm.sweep.results import budgets

LOSSES = ("auto", "val_mlm_loss", "val_clm_loss")

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


def schedule_loss(row, loss: str = "auto") -> str:
    """The validation loss a run is fitted on: `auto` = the loss of the objective it ends with."""
    if loss != "auto":
        return loss
    return "val_clm_loss" if row["clm_fraction"] >= 1 else "val_mlm_loss"


def winners(rows, metric: str, higher_is_better: bool) -> list[dict]:
    """Per budget: the best schedule by the mean over seeds of `metric`, the runner-up, the
    margin, the test of the difference (paired by seed where it can), its Holm-corrected p over
    the budgets and the verdict, and the FLOP ratio winner / runner-up (module docstring).
    Rows whose `metric` is None are not ranked."""
    out = []
    for size, steps in budgets(rows):
        here = [r for r in rows if (r["size"], r["steps"]) == (size, steps) and r.get(metric) is not None]
        by_sched = {}
        for r in here:
            by_sched.setdefault(r["schedule"], {})[r["seed"]] = r[metric]
        summary = {s: stats.summarize(v.values()) for s, v in by_sched.items()}
        ranked = sorted(summary, key=lambda s: -summary[s].mean if higher_is_better else summary[s].mean)
        if not ranked:
            continue
        flops = {s: float(np.mean([r["flops"] for r in here if r["schedule"] == s])) for s in ranked}
        w = {"size": size, "steps": steps, "winner": ranked[0], "score": summary[ranked[0]].mean,
             "sd": summary[ranked[0]].sd, "seeds": summary[ranked[0]].n, "runner_up": None, "runner_up_score": None,
             "runner_up_sd": None, "margin": None, "test": None, "p": None, "p_holm": None, "verdict": None,
             "flops_ratio": None}
        if len(ranked) > 1:
            first, second = ranked[:2]
            t = stats.compare(by_sched[first], by_sched[second])
            w.update(runner_up=second, runner_up_score=summary[second].mean, runner_up_sd=summary[second].sd,
                     margin=abs(summary[first].mean - summary[second].mean), test=t.name,
                     p=t.p if np.isfinite(t.p) else None, note=t.note,
                     flops_ratio=flops[first] / flops[second] if flops[second] else None)
        out.append(w)
    adjusted = stats.holm([w["p"] for w in out])
    for w, q in zip(out, adjusted):
        if w["runner_up"] is not None:
            w["p_holm"] = q if np.isfinite(q) else None
            # the winner is ahead by construction: the test decides whether that is more than chance
            w["verdict"] = ("ahead" if w["p_holm"] is not None and w["p_holm"] < stats.ALPHA else
                            stats.verdict(float("nan"), float("nan"), note=w.get("note", "")))
    return out


def fit_schedules(rows, loss: str = "auto", fixed_E: float | None = None) -> dict:
    """schedule -> {"fit": LawFit | None, "reason": str | None, "frontier": dict | None, "loss": str,
    "fixed_E_fit": LawFit | None}; every frontier on the same compute grid (the 6 N D of every run,
    and powers of ten around them). Each schedule is fitted on `schedule_loss` of its runs; with
    `fixed_E`, a fit with E fixed to it is added beside the free one."""
    out = {}
    C = scaling_law.frontier_compute_grid([6.0 * r["params"] * r["tokens"] for r in rows]) if rows else None
    for sched in dict.fromkeys(r["schedule"] for r in rows):
        col = schedule_loss(next(r for r in rows if r["schedule"] == sched), loss)
        mine = [r for r in rows if r["schedule"] == sched and r[col] is not None]
        N, D, L = (np.array([r[c] for r in mine], float) for c in ("params", "tokens", col))
        entry = {"fit": None, "reason": None, "frontier": None, "loss": col, "fixed_E_fit": None}
        out[sched] = entry
        if fixed_E is not None:
            try:
                entry["fixed_E_fit"] = scaling_law.fit_law(N, D, L, fixed_E=fixed_E)
            except (scaling_law.NoFit, ValueError) as e:
                entry["fixed_E_reason"] = str(e)
        try:
            fit = scaling_law.fit_law(N, D, L)
        except scaling_law.NoFit as e:
            entry["reason"] = str(e)
            continue
        entry.update(fit=fit, frontier=scaling_law.frontier(fit, C))
    return out


# ---------------------------------------------------------------- plots


def _g(x, digits=4):
    return stats.fmt(x, f".{digits}g")


def _table(header, lines):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(l) + " |" for l in lines]


def _winner_line(w, metric):
    if w["runner_up"] is None:
        return f"{w['size']}, {w['steps']} steps: {w['winner']} ({metric} {_g(w['score'])}; the only schedule)"
    flops = f"FLOP ratio {stats.fmt(w['flops_ratio'], '.3g')}"
    if w["margin"] == 0:
        return (f"{w['size']}, {w['steps']} steps: tie between {w['winner']} and {w['runner_up']} "
                f"({metric} {_g(w['score'])}; {flops})")
    if w["p"] is None:
        verdict = w["verdict"]
    else:
        verdict = (f"{w['test']} p = {stats.fmt(w['p'], 'p')}, Holm p = {stats.fmt(w['p_holm'], 'p')}: "
                   f"{'ahead' if w['verdict'] == 'ahead' else 'cannot tell'} at alpha {stats.ALPHA}")
    return (f"{w['size']}, {w['steps']} steps: {w['winner']} ({metric} {_g(w['score'])}) over {w['runner_up']} "
            f"({_g(w['runner_up_score'])}), margin {_g(w['margin'], 3)}, {verdict}; {flops} (winner / runner-up, "
            "equal steps)")


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
           + ("; the mean of the fine-tuning test scores" if metric == "ft_mean" else
              "; no fine-tuning scores, so only the schedules that end in MLM are ranked: a pure CLM run's "
              "val_mlm_loss measures a task it never trained on")
           + "); fits are of "
           + ("**each schedule's own final objective's loss** (val_clm_loss for pure CLM, val_mlm_loss otherwise)"
              if loss == "auto" else f"**{loss}**") + ".",
           "", f"Winner vs runner-up: {stats.__name__}'s paired t-test over the seeds both ran (Welch's without "
           f"pairs), two-sided, Holm-corrected over the budgets, alpha {stats.ALPHA}; one seed: no test. The FLOP "
           "ratio is winner / runner-up at equal steps (analytic, flops.py).", "", "## Winner per budget", ""]
    out += [f"- {_winner_line(w, metric)}" for w in wins] or ["- no budget has a score"]
    out += ["", "## Runs", ""]
    cols = ["size", "steps", "schedule", "seed", "tokens", "flops", "val_mlm_loss", "val_clm_loss"] + ft_cols
    out += _table(["run"] + cols, [[r["run"]] + [_g(r.get(c)) if not isinstance(r.get(c), str) else r[c] for c in cols]
                                   for r in used])
    if unused:
        out += ["", "Not used (listed, not fitted or ranked):", ""]
        out += [f"- {r['run']}: status {r['status']!r}" + ("" if r["status"] != "done" else
                f", no {schedule_loss(r, loss)}") for r in unused]
    out += ["", "## Scaling-law fits: L = E + A / N^alpha + B / D^beta", "",
            "N = parameters without the input embedding, D = training tokens; 95 % intervals from the "
            "Jacobian covariance (see docs/sweeps.md). a = beta / (alpha + beta) is the exponent of N_opt ~ C^a. "
            f"A fit with {scaling_law.LOW_DOF} or fewer residual degrees of freedom is marked **low dof**: its "
            "intervals under-cover; read its exponent ratio, or its fit with E fixed (`--fixed_E`)."]
    lines = []
    for sched, f in fits.items():
        if f["fit"] is None:
            out.append(f"- {sched} ({f['loss']}): no fit: {f['reason']}")
        for fit, label in ((f["fit"], ""), (f.get("fixed_E_fit"), " (E fixed)")):
            if fit is None:
                continue
            a, (a_lo, a_hi) = scaling_law.exponent_ratio(fit)
            lines.append([sched + label, f["loss"]]
                         + [f"{_g(getattr(fit, k), 3)} [{_g(fit.ci95[k][0], 3)}, {_g(fit.ci95[k][1], 3)}]"
                            for k in scaling_law.PARAMS]
                         + [f"{_g(a, 3)} [{_g(a_lo, 3)}, {_g(a_hi, 3)}]", _g(fit.rmse, 3), str(fit.n_points),
                            str(fit.dof) + (" **low dof**" if fit.warning else ""), ", ".join(fit.at_bound) or "-"])
    if lines:
        out += [""] + _table(["schedule", "loss", "E", "A", "alpha", "B", "beta", "a", "RMSE", "points", "dof",
                              "at bound"], lines)
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
            lines.append([sched, str(len(mine)), str(sum(r["diverged"] for r in mine)), _g(stats.sd(centered), 3)])
        out += _table(["schedule", "fine-tuning runs", "diverged", "sd over learning rates and seeds"], lines)
    saved = sum(r["saved_flops"] or 0.0 for r in res)
    total = sum(r["flops"] for r in res)
    out += ["", "## Compute", "", f"Branching from CLM trunks saved {saved:.3g} of the grid's {total:.3g} "
            f"training FLOPs ({100 * saved / max(total, 1.0):.0f} %)."]
    out += ["", "## Plots", ""] + [f"- {n}" for n in notes]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


# ---------------------------------------------------------------- entry points


def analyze(workdir: str, loss: str = "auto", fixed_E: float | None = None) -> dict:
    """Reads DIR/results.csv (+ finetune.csv), writes fits.json, summary.md and the plots."""
    res, ft_cols = read_results(os.path.join(workdir, "results.csv"))
    if loss not in LOSSES:
        raise ValueError(f"analyze: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    ft_all = read_finetune(os.path.join(workdir, "finetune.csv"))
    used = [r for r in res if r["status"] == "done" and r[schedule_loss(r, loss)] is not None]
    unused = [r for r in res if r not in used]
    for r in used:
        r["fit_loss"] = r[schedule_loss(r, loss)]
    schedule_of = {r["run"]: r["schedule"] for r in used}
    ft_rows = [r for r in ft_all or [] if r["run"] in schedule_of]
    has_ft = "ft_mean" in ft_cols and any(r["ft_mean"] is not None for r in used)
    metric, higher = ("ft_mean", True) if has_ft else ("val_mlm_loss", False)
    ranked_rows = used if has_ft else [r for r in used if r["clm_fraction"] < 1]
    fits = fit_schedules(used, loss, fixed_E)
    wins = winners(ranked_rows, metric, higher)
    files, notes = [], []
    if used:
        ylabel = "fine-tuning score (%, mean of tasks)" if has_ft else "validation MLM loss (lower is better)"
        ylabel_loss = "validation loss of the final objective" if loss == "auto" else loss
        files += [plots.plot_vs_compute(used, "fit_loss", ylabel_loss, os.path.join(workdir, "loss_vs_compute.png"),
                                        fits),
                  plots.plot_vs_clm_fraction(ranked_rows, metric, ylabel,
                                             os.path.join(workdir, "score_vs_clm_fraction.png"))]
    else:
        notes.append("no plots: no finished run has a loss")
    if used and has_ft:
        files.append(plots.plot_vs_compute(used, "ft_mean", "fine-tuning score (%)",
                                     os.path.join(workdir, "score_vs_compute.png")))
    else:
        notes.append("score_vs_compute.png skipped: results.csv has no fine-tuning scores")
    if ft_rows:
        files.append(plots.plot_finetune_spread(ft_rows, schedule_of, os.path.join(workdir, "finetune_spread.png")))
    else:
        notes.append("finetune_spread.png skipped: no finetune.csv (or no rows of finished runs)")
    notes = [os.path.basename(f) for f in files] + notes
    ratio = [r["flops"] / (6.0 * r["params"] * r["tokens"]) for r in used]
    out = {"loss": loss, "metric": metric, "higher_is_better": higher, "law": "L = E + A/N^alpha + B/D^beta",
           "frontier_compute": "C = 6 N D",
           "flops_over_6ND": [min(ratio), max(ratio)] if ratio else None,
           "alpha": stats.ALPHA,
           "fits": {s: {"fit": f["fit"].to_dict() if f["fit"] else None, "reason": f["reason"], "loss": f["loss"],
                        "fixed_E_fit": f["fixed_E_fit"].to_dict() if f["fixed_E_fit"] else None,
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


def main(workdir: str, loss: str = "auto", fixed_E: float | None = None) -> dict:
    """analyze() and print where the files went and the winner per budget."""
    out = analyze(workdir, loss, fixed_E)
    print(f"sweep: wrote {', '.join(out['files'])}")
    for note in out["notes"]:
        if "skipped" in note or "no plots" in note:
            print(f"sweep: {note}")
    for sched, f in out["fits"].items():
        if f["fit"] is None:
            print(f"sweep: no {f['loss']} fit for {sched}: {f['reason']}")
        elif f["fit"]["warning"]:
            print(f"sweep: warning: the {f['loss']} fit of {sched} has {f['fit']['warning']}")
    for w in out["winners"]:
        print(f"sweep: {_winner_line(w, out['metric'])}")
    return out
