"""The sweep's SLURM backend: two job arrays over launch/slurm.sbatch.

DIR/slurm/stage1.sbatch runs the trunks and every run trained from scratch; stage2.sbatch
the branch runs, submitted with `--dependency=afterok:<stage 1>`. Each array task looks up
its run id, copies its branch checkpoint (`sweep prepare`), trains through
launch/slurm.sbatch (multi-node start-up, SIGTERM -> checkpoint -> requeue), then fine-tunes
and records the run (`sweep finish`). A finished run's task exits at once, so resubmitting
the sweep (or a requeued task) only does what is left. Resources: `--sbatch_args`, e.g.
`--nodes=4 --gpus-per-node=8 --time=48:00:00 --partition=...`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from mlm_vs_clm.config import REPO_ROOT
from mlm_vs_clm.sweep_plan import is_done

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
if [[ $stop -eq 1 ]]; then wait "$child" || status=$?; echo "$run: preempted, requeued"; exit 0; fi
if [[ $status -ne 0 ]]; then echo "$run: training failed with status $status" >&2; exit "$status"; fi
"$py" -m mlm_vs_clm.sweep finish --workdir={workdir} --run="$run" --wall_s=$(( $(date +%s) - start ))
"""


def write_scripts(workdir: str, runs: list[dict], python: str) -> list[tuple[int, str, int]]:
    """(stage, script path, number of runs) for the stages that have unfinished runs."""
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
        out.append((stage, path, len(ids)))
    return out


def slurm_backend(workdir: str, runs: list[dict], sbatch_args: str = "") -> list[str]:
    """Writes the stage scripts and submits them; returns the job ids."""
    import sys

    scripts = write_scripts(workdir, runs, sys.executable)
    if not scripts:
        print("sweep: every run is done; nothing to submit")
        return []
    if shutil.which("sbatch") is None:
        raise RuntimeError("slurm backend: `sbatch` is not on PATH (run on a SLURM login node, or use "
                           f"--backend=print); scripts are in {os.path.join(workdir, 'slurm')}")
    job_ids, previous = [], None
    for stage, path, count in scripts:
        cmd = ["sbatch", "--parsable", *shlex.split(sbatch_args)]
        if previous is not None:
            cmd.append(f"--dependency=afterok:{previous}")
        proc = subprocess.run(cmd + [path], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"slurm backend: sbatch failed for stage {stage}: {proc.stderr.strip()}")
        previous = proc.stdout.strip().split(";")[0]
        job_ids.append(previous)
        print(f"sweep: submitted stage {stage} ({count} runs) as job {previous}: {path}")
    print(f"sweep: when they finish: python -m mlm_vs_clm.sweep analyze --workdir={workdir}")
    return job_ids
