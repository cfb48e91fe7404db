"""`make replicate`: the study's four findings (PAPER.md) at a size and budget this machine runs.

`python -m mlm_vs_clm.replicate --workdir=replication_runs --report_dir=replication [--scale=full]`

The defaults of --workdir and --report_dir follow the scale: `replication_runs` and
`replication` (the committed report) for `full`; `replication_runs_SCALE` and
`replication_runs_SCALE/report` for another scale, so a smoke run never mixes its runs with a
full one's nor overwrites replication/REPORT.md unless --report_dir says so.

One size (the `tiny` preset), one budget (`--scale=full`: 1,500 steps of 16 x 128 tokens),
on the demo corpus (BBC News), every run seeing the same token stream. Every schedule is
pretrained with 3 pretraining seeds (`pretrain_seeds`: the data order is fixed by
`data.seed=0`; the initialisation and the MLM masks change with the seed), and a biphasic run
branches from the CLM run of its own seed. Comparisons are paired by pretraining seed:
1. pure MLM-40, pure CLM, and CLM-then-MLM-40 at 25 / 50 / 75 % CLM (equal steps and tokens;
   the biphasic runs branch from the CLM run's checkpoint at the switch: sweep.py);
2. data efficiency: the MLM and CLM runs' checkpoints at 25 / 50 / 75 % of the steps;
3. fine-tuning stability: every final checkpoint on a learning-rate x seed grid;
4. continued pretraining: MLM-40 for `cpt_steps` more steps from the CLM run and from the
   MLM run (fresh optimizer, the same extra compute).
Every checkpoint is fine-tuned on the `news` suite (4 tasks) with `seeds` fine-tuning seeds
(one per pretraining run at both scales: the variation that is tested is the pretraining
seed's); the report (report.py) writes REPORT.md with tables, plots, and per finding the test,
its p-value (Holm-corrected over the findings at alpha 0.05), the verdict and the FLOP ratio.
Every stage resumes: rerunning skips what is done. Stage commands go to the run logs. A
continued-pretraining run records its source checkpoint and steps in its done.json; a workdir
whose run was made from another source or for other steps stops the command with one line
(replicate: ...) rather than being reused or overwritten.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections

from mlm_vs_clm.checkpoint import resolve_step_dir
from mlm_vs_clm.sweep import runner as sweep
from mlm_vs_clm.sweep.children import run_child

SCHEDULES = ("mlm40", "clm", "clm25_mlm40", "clm50_mlm40", "clm75_mlm40")
KEEP_FRACTIONS = (0.25, 0.5, 0.75)
NEWS_TASKS = ("topic", "retrieval", "cloze_qa", "truecase")

PRETRAIN_SEEDS = (0, 1, 2)
DATA_SEED = 0  # the one data order of every pretraining run

SCALES = {
    "full": dict(steps=1500, cpt_steps=500, overrides=("train.eval_every=250", "train.checkpoint_every=250"),
                 pretrain_seeds=PRETRAIN_SEEDS, learning_rates=(3e-4, 1e-3, 3e-3), seeds=(0,), tasks=NEWS_TASKS,
                 ft_overrides=("steps=100", "eval_every=25")),
    "smoke": dict(steps=20, cpt_steps=8,
                  overrides=("train.batch_size=8", "train.seq_len=64", "train.eval_every=10",
                             "train.checkpoint_every=10", "train.eval_batches=2"),
                  pretrain_seeds=PRETRAIN_SEEDS, learning_rates=(1e-3, 3e-3), seeds=(0,), tasks=("topic",),
                  ft_overrides=("steps=6", "eval_every=3", "max_eval_examples=48")),
}


def pretrain_sweep(scale: dict) -> ml_collections.ConfigDict:
    """The sweep config of stage 1 (see configs/sweeps/micro.py for the keys)."""
    c = ml_collections.ConfigDict()
    c.base = "configs/pretrain.py"
    c.sizes = ("tiny",)
    c.steps = (scale["steps"],)
    c.schedules = SCHEDULES
    c.seeds = tuple(scale["pretrain_seeds"])
    c.keep_fractions = KEEP_FRACTIONS
    c.branch = "resume"
    c.overrides = tuple(scale["overrides"]) + (f"data.seed={DATA_SEED}",)
    c.finetune = ml_collections.ConfigDict(dict(config="", overrides=()))
    return c


def stage(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_pretraining(workdir: str, scale: dict) -> dict:
    """(schedule, pretraining seed) -> run folder."""
    sweep_dir = os.path.join(workdir, "pretrain")
    runs = sweep.write_plan(sweep_dir, pretrain_sweep(scale))
    failed = sweep.run_local(sweep_dir, runs)
    if failed:
        raise RuntimeError(f"pretraining runs failed: {', '.join(failed)} (logs under {sweep_dir}/runs)")
    sweep.collect(sweep_dir)
    return {(r["schedule"], r["seed"]): sweep.run_dir(sweep_dir, r["id"]) for r in runs if r.get("in_grid", True)}


def run_cpt(workdir: str, scale: dict, sources: dict) -> dict:
    """MLM-40 continued pretraining from the CLM and the MLM runs' final checkpoints, one per
    pretraining seed: (name, seed) -> run folder, for `sources` (name, seed) -> run folder."""
    out = {}
    for key in sorted(k for k in sources if k[0] in ("clm", "mlm40")):
        name, seed = key
        rdir = os.path.join(workdir, "cpt", f"from_{name}_s{seed}")
        out[key] = rdir
        done = os.path.join(rdir, "done.json")
        made_from = {"source": resolve_step_dir(sources[key]), "steps": scale["cpt_steps"]}
        if os.path.isfile(done):
            with open(done) as f:
                recorded = json.load(f)
            if {k: recorded.get(k) for k in made_from} != made_from:
                raise RuntimeError(
                    f"{rdir} was made from {recorded.get('source', '(unrecorded)')} for "
                    f"{recorded.get('steps', '(unrecorded)')} steps, not from {made_from['source']} for "
                    f"{made_from['steps']} steps: use another --workdir or remove that folder")
            continue
        os.makedirs(rdir, exist_ok=True)
        args = ["mlm_vs_clm.train", "--config=configs/pretrain.py:tiny,mlm40", f"--workdir={rdir}",
                f"--config.init_from={sources[key]}", f"--config.train.steps={scale['cpt_steps']}",
                f"--config.seed={seed}", "--config.train.progress=False"]
        args += [f"--config.{kv}" for kv in scale["overrides"]] + [f"--config.data.seed={DATA_SEED}"]
        start = time.time()
        print(f"cpt: MLM-40 for {scale['cpt_steps']} steps from the {name} run of seed {seed}", flush=True)
        run_child(args, os.path.join(rdir, "train.log"))
        with open(done, "w") as f:
            json.dump({"wall_s": time.time() - start, **made_from, **sweep.final_metrics(rdir)}, f)
    return out


def finetune(workdir: str, name: str, checkpoints: list[str], scale: dict, learning_rates) -> str:
    ft_dir = os.path.join(workdir, name)
    os.makedirs(ft_dir, exist_ok=True)
    args = ["mlm_vs_clm.finetune", "--config=configs/finetune.py:news_quick", f"--workdir={ft_dir}",
            f"--config.checkpoints={tuple(checkpoints)!r}", f"--config.tasks={','.join(scale['tasks'])}",
            f"--config.learning_rates={tuple(learning_rates)!r}", f"--config.seeds={tuple(scale['seeds'])!r}",
            "--config.progress=False"] + [f"--config.{kv}" for kv in scale["ft_overrides"]]
    print(f"finetune: {len(checkpoints)} checkpoints x {len(scale['tasks'])} tasks x {len(learning_rates)} "
          f"learning rates x {len(scale['seeds'])} seeds -> {ft_dir}", flush=True)
    run_child(args, os.path.join(ft_dir, "finetune.log"))
    return ft_dir


def finals(runs: dict, cpt: dict) -> list[str]:
    """The final checkpoints to fine-tune: every pretraining run, then every CPT run."""
    return [runs[k] for k in sorted(runs, key=lambda k: (SCHEDULES.index(k[0]), k[1]))] + [cpt[k] for k in sorted(cpt)]


def intermediate_checkpoints(run_dir: str, steps: int) -> list[str]:
    return [os.path.join(run_dir, "checkpoints", str(int(round(f * steps)))) for f in KEEP_FRACTIONS]


def output_dirs(scale_name: str, workdir: str = "", report_dir: str = "") -> tuple[str, str]:
    """Absolute (workdir, report_dir); empty ones take the scale's defaults (module docstring)."""
    full = scale_name == "full"
    workdir = os.path.abspath(workdir or ("replication_runs" if full else f"replication_runs_{scale_name}"))
    return workdir, os.path.abspath(report_dir or ("replication" if full else os.path.join(workdir, "report")))
