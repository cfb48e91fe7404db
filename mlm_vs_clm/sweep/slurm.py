"""The sweep's SLURM backend: two job arrays over launch/slurm.sbatch.

DIR/slurm/stage1.sbatch runs the trunks and every run trained from scratch; stage2.sbatch
the branch runs, submitted once per trunk with `--array=<its branches>` and
`--dependency=afterok:<stage 1>_<the trunk's task>`, so a failed trunk holds back only its own
branches (they stay pending with DependencyNeverSatisfied; `scancel` them and resubmit). Each array task looks up
its run id, copies its branch checkpoint (`sweep prepare`), trains through
launch/slurm.sbatch (multi-node start-up, SIGTERM -> checkpoint -> requeue), records the
invocation's training time whatever its end (`sweep add-wall`: a requeued task's invocations add
up, as run_one's do), then fine-tunes and records the run (`sweep finish`). A finished run's
task exits at once, so resubmitting the sweep (or a requeued task) only does what is left.
Resources: `--sbatch_args`, e.g. `--nodes=4 --gpus-per-node=8 --time=48:00:00 --partition=...`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from mlm_vs_clm.config import REPO_ROOT
from mlm_vs_clm.sweep.plan import is_done

_SCRIPT = """#!/usr/bin/env bash
# Stage {stage} of the sweep in {workdir}: {count} runs, one array task each.
#SBATCH --job-name=sweep-stage{stage}
#SBATCH --array=0-{last}
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --open-mode=append
#SBATCH --output={slurm_dir}/stage{stage}-%A_%a.out
set -euo pipefail
cd {repo}
runs=({ids})
run="${{runs[$SLURM_ARRAY_TASK_ID]}}"
py={python}
if [[ -f {workdir}/runs/$run/done.json ]]; then echo "$run: already done"; exit 0; fi
"$py" -m mlm_vs_clm.sweep prepare --workdir={workdir} --run="$run"
mapfile -t train_args < {slurm_dir}/args/"$run".txt
start=$(date +%s)
stop=0
child=""
trap 'stop=1; [[ -n "$child" ]] && kill -TERM "$child" 2>/dev/null || true' TERM
bash {repo}/launch/slurm.sbatch "${{train_args[@]}}" &
child=$!
status=0
wait "$child" || status=$?
preempted=$stop  # a SIGTERM during the training (one after it lets the task finish)
if [[ $preempted -eq 1 ]]; then wait "$child" || status=$?; fi
# Every invocation's training time counts (preempted and failed ones too): wall_s is their sum.
"$py" -m mlm_vs_clm.sweep add-wall --workdir={workdir} --run="$run" --wall_s=$(( $(date +%s) - start )) \
  || echo "$run: this invocation's training time was not recorded" >&2
if [[ $preempted -eq 1 ]]; then echo "$run: preempted, requeued"; exit 0; fi
if [[ $status -ne 0 ]]; then echo "$run: training failed with status $status" >&2; exit "$status"; fi
"$py" -m mlm_vs_clm.sweep finish --workdir={workdir} --run="$run"
"""


def write_scripts(workdir: str, runs: list[dict], python: str) -> list[tuple[int, str, list[str]]]:
    """(stage, script path, run ids in array order) for the stages that have unfinished runs."""
    slurm_dir = os.path.join(workdir, "slurm")
    os.makedirs(os.path.join(slurm_dir, "args"), exist_ok=True)
    out = []
    for stage in (1, 2):
        ids = [r["id"] for r in runs if bool(r["branch_from"]) == (stage == 2) and not is_done(workdir, r["id"])]
        for r in runs:
            if r["id"] in ids:
                with open(os.path.join(slurm_dir, "args", r["id"] + ".txt"), "w") as f:
                    f.write("\n".join(list(r["train_args"]) + ["--config.train.progress=False"]) + "\n")
        if not ids:
            continue
        path = os.path.join(slurm_dir, f"stage{stage}.sbatch")
        with open(path, "w") as f:
            f.write(_SCRIPT.format(stage=stage, workdir=shlex.quote(workdir), count=len(ids), last=len(ids) - 1,
                                   slurm_dir=shlex.quote(slurm_dir), repo=shlex.quote(REPO_ROOT),
                                   ids=" ".join(shlex.quote(i) for i in ids), python=shlex.quote(python)))
        os.chmod(path, 0o755)
        out.append((stage, path, ids))
    return out


def stage2_submissions(runs: list[dict], stage1_ids: list[str], stage2_ids: list[str],
                       stage1_job: str | None) -> list[tuple[str, str]]:
    """(--array indices, --dependency or '') per trunk: a trunk's branches wait only for its own
    stage-1 array task (afterok:JOB_TASK), so one failed trunk blocks only its own branches;
    branches of an already finished trunk start at once."""
    trunk_of = {r["id"]: r["branch_from"] for r in runs}
    groups: dict[str, list[int]] = {}
    for i, rid in enumerate(stage2_ids):
        groups.setdefault(trunk_of[rid] if trunk_of[rid] in stage1_ids else "", []).append(i)
    return [(",".join(map(str, idx)), f"afterok:{stage1_job}_{stage1_ids.index(trunk)}" if trunk else "")
            for trunk, idx in groups.items()]


def _sbatch(cmd: list[str], stage: int) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"slurm backend: sbatch failed for stage {stage}: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def slurm_backend(workdir: str, runs: list[dict], sbatch_args: str = "") -> list[str]:
    """Writes the stage scripts and submits them (stage 2 once per trunk); returns the job ids."""
    scripts = write_scripts(workdir, runs, sys.executable)
    if not scripts:
        print("sweep: every run is done; nothing to submit")
        return []
    if shutil.which("sbatch") is None:
        raise RuntimeError("slurm backend: `sbatch` is not on PATH (run on a SLURM login node, or use "
                           f"--backend=print); scripts are in {os.path.join(workdir, 'slurm')}")
    base = ["sbatch", "--parsable", *shlex.split(sbatch_args)]
    job_ids, stage1_job, stage1_ids = [], None, []
    for stage, path, ids in scripts:
        if stage == 1:
            stage1_job, stage1_ids = _sbatch(base + [path], stage), ids
            job_ids.append(stage1_job)
            print(f"sweep: submitted stage 1 ({len(ids)} runs) as job {stage1_job}: {path}")
            continue
        for array, dependency in stage2_submissions(runs, stage1_ids, ids, stage1_job):
            dep = [f"--dependency={dependency}"] if dependency else []
            job = _sbatch(base + [f"--array={array}", *dep, path], stage)
            job_ids.append(job)
            print(f"sweep: submitted stage 2 ({array.count(',') + 1} runs, {dependency or 'no dependency'}) "
                  f"as job {job}: {path}")
    print(f"sweep: when they finish: python -m mlm_vs_clm.sweep analyze --workdir={workdir}")
    return job_ids
