"""A sweep's tables: DIR/results.csv (one row per pretraining run) and DIR/finetune.csv (one
row per fine-tuning run), from the plan and each run's done.json and fine-tuning results.

results.csv columns: run, size, schedule, clm_fraction, mask_ratio, seed, params (blocks and
final norm: no input embedding, no output head), steps, tokens (batch x length x steps),
flops (analytic model training FLOPs, flops.py), wall_s (this run's own training and
fine-tuning time; a branch's CLM prefix is its trunk's), val_mlm_loss, val_clm_loss,
branch_from, saved_flops (the trunk prefix a branch did not recompute, less its share of an
added trunk's cost: the column sums to the net saving), status (done /
missing), then ft_<task> (test score at the best learning rate, mean over seeds) and ft_mean.
Trunks added only to be branched from are not rows. Written atomically.
"""

from __future__ import annotations

import csv
import json
import os

from mlm_vs_clm.finetune import report

COLUMNS = ("run", "size", "schedule", "clm_fraction", "mask_ratio", "seed", "params", "steps", "tokens", "flops",
           "wall_s", "val_mlm_loss", "val_clm_loss", "branch_from", "saved_flops", "status")
FT_COLUMNS = ("run", "task", "lr", "seed", "test", "best_validation", "diverged")


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _finetune(rdir: str) -> list[dict]:
    return report.load_runs(os.path.join(rdir, "finetune"))


def write_tables(workdir: str, plan: dict) -> str:
    rows, ft_rows, tasks = [], [], []
    for r in plan["runs"]:
        if not r["in_grid"]:
            continue
        rdir = os.path.join(workdir, "runs", r["id"])
        done_path = os.path.join(rdir, "done.json")
        done = {}
        if os.path.isfile(done_path):
            with open(done_path) as f:
                done = json.load(f)
        row = {"run": r["id"], "size": r["size"], "schedule": r["schedule"], "clm_fraction": r["clm_fraction"],
               "mask_ratio": r["mask_ratio"], "seed": r["seed"], "params": r["params"], "steps": r["steps"],
               "tokens": r["tokens"], "flops": r["flops"], "wall_s": done.get("wall_s"),
               "val_mlm_loss": done.get("val_mlm_loss"), "val_clm_loss": done.get("val_clm_loss"),
               "branch_from": r["branch_from"], "saved_flops": r["saved_flops"],
               "status": "done" if done else "missing"}
        runs = _finetune(rdir) if done else []
        scores = []
        for s in report.summarize(runs):
            row[f"ft_{s['task']}"] = s["test_mean"]
            scores.append(s["test_mean"])
            if s["task"] not in tasks:
                tasks.append(s["task"])
        finite = [x for x in scores if x == x]
        row["ft_mean"] = sum(finite) / len(finite) if finite else None
        rows.append(row)
        for ft in runs:
            ft_rows.append({"run": r["id"], "task": ft["task"], "lr": ft["lr"], "seed": ft["seed"],
                            "test": ft["test"], "best_validation": ft["best_validation"],
                            "diverged": int(bool(ft["diverged"]))})
    columns = list(COLUMNS) + ([f"ft_{t}" for t in tasks] + ["ft_mean"] if tasks else [])
    path = os.path.join(workdir, "results.csv")
    _write_csv(path, columns, rows)
    ft_path = os.path.join(workdir, "finetune.csv")
    if ft_rows:
        _write_csv(ft_path, FT_COLUMNS, ft_rows)
    elif os.path.exists(ft_path):
        os.remove(ft_path)
    return path


def _write_csv(path: str, columns, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow([_fmt(row.get(c)) for c in columns])
    os.replace(tmp, path)


def budgets(rows) -> list[tuple[str, int]]:
    """(size, steps) pairs, smallest model and fewest steps first."""
    key = {(r["size"], r["steps"]): (r["params"], r["steps"], r["size"]) for r in rows}
    return sorted(key, key=key.get)
