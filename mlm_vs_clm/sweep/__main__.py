"""Scaling sweeps: `python -m mlm_vs_clm.sweep --config=configs/sweeps/NAME.py --workdir=DIR --backend=...`

Runs a grid of pretraining runs (sizes x step budgets x objective schedules x seeds, or a union
of such blocks: sweep/plan.py), optionally fine-tunes every final checkpoint, collects
DIR/results.csv (and DIR/finetune.csv) and fits and plots the results (sweep/analysis.py).
Backends:
  local  runs everything here, `--parallel=N` runs at a time (branches wait for their trunk)
  slurm  writes DIR/slurm/stage{1,2}.sbatch (arrays over launch/slurm.sbatch) and submits them,
         each branch run after its own trunk's stage-1 task (`--dependency=afterok:JOB_TASK`)
  print  prints one shell command per run, trunks first, for any other scheduler
Rerunning skips finished runs (DIR/runs/ID/done.json) and resumes unfinished ones.

Other verbs: `sweep analyze --workdir=DIR [--loss=...] [--fixed_E=E]` (collect + fit + plots + summary.md);
`sweep run-one --workdir=DIR --run=ID` (what each backend runs for one run); the slurm stage
scripts' steps `sweep prepare`, `sweep add-wall --wall_s=S` (after each invocation of training)
and `sweep finish`, each with `--workdir=DIR --run=ID`.

`run`, `analyze` and `collect` hold DIR/.lock (one sweep per folder: a second one stops with a
line naming the holder); each run's own folder is held by its train and finetune processes.
SIGTERM or SIGINT stops the sweep: its running children get SIGTERM and save their
checkpoints, nothing new starts, and the sweep exits 0 (rerun to resume). Children also end
when the sweep is killed outright (mlm_vs_clm/sweep/runner.py).
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from mlm_vs_clm import runlock
from mlm_vs_clm.config import ConfigError, flags_parser
from mlm_vs_clm.sweep.children import SweepStopped, stop_children, stopping
from mlm_vs_clm.sweep.plan import run_dir
from mlm_vs_clm.sweep.runner import (
    PLAN_FILE,
    add_wall,
    analyze,
    branch_saving,
    collect,
    finish,
    load_plan,
    plan_run,
    prepare,
    print_backend,
    run_local,
    run_one,
    write_plan,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Sweep config, e.g. configs/sweeps/micro.py.")
flags.DEFINE_string("workdir", None, "Sweep directory: runs/, results.csv, plots, summary.md.")
flags.DEFINE_enum("backend", "local", ["local", "slurm", "print"], "Where the runs run.")
flags.DEFINE_integer("parallel", 1, "local backend: runs at a time.")
flags.DEFINE_string("run", None, "run-one, prepare, add-wall, finish: the run id.")
flags.DEFINE_float("wall_s", 0.0, "add-wall: seconds one invocation of training took (the slurm stage scripts "
                   "pass it after each); finish: seconds of training not recorded yet, added to them.")
flags.DEFINE_enum("loss", "auto", ["auto", "val_mlm_loss", "val_clm_loss"], "analyze: the loss each schedule's "
                  "scaling law is fitted on (auto: the validation loss of the objective it ends with).")
flags.DEFINE_float("fixed_E", None, "analyze: also fit each law with its irreducible loss E fixed to this value "
                   "(from a larger sweep or a known floor), beside the free fit; for small grids.")
flags.DEFINE_string("sbatch_args", "", "slurm backend: extra sbatch options, e.g. '--nodes=2 --time=24:00:00'.")


def main(argv) -> int:
    verb = argv[1] if len(argv) > 1 else "run"
    if verb not in ("run", "analyze", "run-one", "collect", "prepare", "add-wall", "finish"):
        print(f"sweep: unknown verb {verb!r} (run, analyze, collect, run-one, prepare, add-wall, finish)",
              file=sys.stderr)
        return 2
    if not FLAGS.workdir:
        print("sweep: --workdir is required", file=sys.stderr)
        return 2
    workdir = os.path.abspath(FLAGS.workdir)
    if verb in ("run", "run-one"):  # children save their checkpoints and the sweep stops
        signal.signal(signal.SIGTERM, stop_children)
        signal.signal(signal.SIGINT, stop_children)
    if verb not in ("run", "analyze", "collect") or (verb != "run" and not os.path.isdir(workdir)):
        return _verb(verb, workdir)  # each run's folder is held by its own train and finetune
    problem = runlock.workdir_problem(workdir)
    if problem:
        print(f"sweep: {problem}", file=sys.stderr)
        return 2
    created = runlock.make_workdir(workdir) if verb == "run" else []
    try:
        lock = runlock.RunLock(workdir, what="sweep folder")
    except runlock.RunLockError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 1
    status = 1
    try:
        status = _verb(verb, workdir)
    finally:
        if status != 0:
            lock.undo(created)
        lock.release()
    return status


def _verb(verb: str, workdir: str) -> int:
    try:
        if verb == "analyze":
            analyze(workdir, FLAGS.loss, FLAGS.fixed_E)
            return 0
        if verb == "collect":
            print(f"sweep: wrote {collect(workdir)}")
            return 0
        if verb in ("run-one", "prepare", "add-wall", "finish"):
            if not FLAGS.run:
                raise ConfigError(f"{verb}: --run=ID is required")
            if verb == "run-one":
                try:
                    run_one(workdir, FLAGS.run)
                except SweepStopped:
                    print(f"sweep: stopped {FLAGS.run} by a signal; its checkpoint is saved (rerun to resume)")
                    return 0
            else:
                saved = load_plan(workdir)
                run = plan_run(saved, workdir, FLAGS.run)
                if verb == "prepare":
                    prepare(workdir, run)
                elif verb == "add-wall":
                    add_wall(run_dir(workdir, run["id"]), FLAGS.wall_s)
                else:
                    finish(workdir, run, saved["sweep"], FLAGS.wall_s)
            return 0
        if FLAGS.config is None:
            raise ConfigError("--config is required (e.g. --config=configs/sweeps/micro.py)")
        runs = write_plan(workdir, FLAGS.config)
    except (ConfigError, RuntimeError, ValueError) as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except OSError as e:  # a full disk or an unwritable workdir while recording a run
        print(f"sweep: {verb}: {e.strerror or e} ({e.filename or workdir})", file=sys.stderr)
        return 1
    n_branch = sum(bool(r["branch_from"]) for r in runs)
    saved, total = branch_saving(runs)
    print(f"sweep: {len(runs)} runs ({n_branch} branch from a CLM trunk, saving {saved:.3g} of {total:.3g} "
          f"FLOPs, {100 * saved / max(total, 1):.0f} %); plan in {os.path.join(workdir, PLAN_FILE)}", flush=True)
    if FLAGS.backend == "print":
        print_backend(workdir, runs)
        return 0
    if FLAGS.backend == "slurm":
        from mlm_vs_clm.sweep.slurm import slurm_backend

        try:
            slurm_backend(workdir, runs, FLAGS.sbatch_args)
        except RuntimeError as e:
            print(f"sweep: {e}", file=sys.stderr)
            return 1
        return 0
    failed = run_local(workdir, runs, FLAGS.parallel)
    if stopping():
        print("sweep: stopped by a signal: the runs in progress saved their checkpoints; rerun the same command "
              "to resume", flush=True)
        return 0
    analyze(workdir, FLAGS.loss, FLAGS.fixed_E)
    return 1 if failed else 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=flags_parser("sweep: "))
