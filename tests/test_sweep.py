"""The sweep tool: planning, branch reuse of CLM checkpoints, the local, print and slurm
backends, results.csv, and reruns that do nothing."""

import csv
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from mlm_vs_clm import sweep_plan
from mlm_vs_clm.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
       "JAX_COMPILATION_CACHE_DIR": os.path.join(REPO, ".cache", "jax")}
FAST = ("train.batch_size=8", "train.seq_len=64", "train.eval_every=10", "train.checkpoint_every=10",
        "train.eval_batches=2", "train.log_every=5")


def _sweep_config(**kw):
    c = load_config("configs/sweeps/micro.py")
    c.sizes = ("d64=tiny",)
    c.steps = (20,)
    c.schedules = ("mlm40", "clm", "clm50_mlm40")
    c.overrides = FAST
    c.finetune.overrides = ("tasks=topic", "seeds=(0,)", "steps=8", "eval_every=4", "max_eval_examples=64")
    for k, v in kw.items():
        c[k] = v
    return c


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mlm_vs_clm.sweep", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=900)


def _flag_args(c):
    out = [f"--config.sizes={tuple(c.sizes)!r}", f"--config.steps={tuple(c.steps)!r}",
           f"--config.schedules={tuple(c.schedules)!r}", f"--config.overrides={tuple(c.overrides)!r}",
           f"--config.finetune.overrides={tuple(c.finetune.overrides)!r}", f"--config.branch={c.branch}",
           f"--config.finetune.config={c.finetune.config}"]
    return ["--config=configs/sweeps/micro.py", *out]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ planning


def test_paper_grid_plan():
    runs = sweep_plan.plan(load_config("configs/sweeps/paper.py"))
    assert len(runs) == 3 * 3 * 17
    branches = [r for r in runs if r.branch_from]
    assert len(branches) == 3 * 3 * 12
    by_id = {r.id: r for r in runs}
    r = by_id["610m_42000_clm25_mlm30_s0"]
    assert (r.branch_from, r.branch_step, r.mask_ratio, r.clm_fraction) == ("610m_42000_clm_s0", 10500, 0.3, 0.25)
    trunk = by_id["610m_42000_clm_s0"]
    assert trunk.keep_steps == (10500, 21000, 31500)
    assert runs.index(trunk) < runs.index(r)  # trunks come first
    assert by_id["1b_12000_mlm50_s0"].branch_from == ""


def test_trunk_is_added_when_the_grid_lacks_pure_clm():
    c = _sweep_config(schedules=("mlm40", "clm50_mlm40"))
    runs = sweep_plan.plan(c)
    assert [(r.schedule, r.in_grid) for r in runs] == [("clm", False), ("mlm40", True), ("clm50_mlm40", True)]
    assert runs[2].branch_from == runs[0].id and runs[0].keep_steps == (10,)
    c.branch = "none"
    assert all(not r.branch_from for r in sweep_plan.plan(c))


@pytest.mark.parametrize("key,value,message", [
    ("branch", "copy", "branch: 'copy' is not one of"),
    ("schedules", ("clm50_mlm40", "mlm140"), "schedules:"),
    ("sizes", ("huge",), "huge"),
    ("sizes", ("d64=tiny:model.hidden_size",), "expected LABEL=PRESET:KEY=VALUE"),
    ("steps", (), "steps: the grid needs at least one value"),
    ("overrides", ("train.nonsense=3",), "unknown key 'train.nonsense'"),
])
def test_bad_sweep_configs_are_one_line_errors(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        sweep_plan.plan(_sweep_config(**{key: value}))


def test_bad_sweep_config_through_the_cli(tmp_path):
    proc = _cli("--config=configs/sweeps/micro.py", "--config.branch=copy", f"--workdir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["sweep: branch: 'copy' is not one of resume, none"]


def test_print_backend_lists_trunks_before_branches(tmp_path):
    proc = _cli(*_flag_args(_sweep_config()), f"--workdir={tmp_path}", "--backend=print")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    cmds = [ln for ln in lines if "run-one" in ln]
    assert len(cmds) == 3
    assert lines.index("# stage 1: 2 runs") < lines.index(cmds[0])
    assert "--run=d64_20_clm50_mlm40_s0" in cmds[2] and lines[lines.index(cmds[2]) - 1].startswith("# stage 2")


# ------------------------------------------------------------------ running


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sweep"))
    proc = _cli(*_flag_args(_sweep_config()), f"--workdir={workdir}", "--backend=local")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc


def test_local_sweep_writes_a_row_per_run(local_sweep):
    workdir, proc = local_sweep
    rows = _rows(os.path.join(workdir, "results.csv"))
    assert [r["schedule"] for r in rows] == ["clm", "mlm40", "clm50_mlm40"]
    for r in rows:
        assert r["status"] == "done"
        assert 0 < float(r["val_mlm_loss"]) < 20 and 0 < float(r["val_clm_loss"]) < 20
        assert 0 <= float(r["ft_topic"]) <= 100 and r["ft_mean"] == r["ft_topic"]
        assert int(r["tokens"]) == 20 * 8 * 64
    branch = rows[2]
    assert branch["branch_from"] == "d64_20_clm_s0" and float(branch["clm_fraction"]) == 0.5
    assert float(branch["saved_flops"]) > 0 and float(rows[0]["saved_flops"]) == 0
    # mlm40's analytic FLOPs are below clm's (sparse head); the branch sits between them
    assert float(rows[1]["flops"]) < float(branch["flops"]) < float(rows[0]["flops"])
    ft = _rows(os.path.join(workdir, "finetune.csv"))
    assert sorted(r["run"] for r in ft) == sorted(r["run"] for r in rows)
    assert "saving" in proc.stdout and "1 branch from a CLM trunk" in proc.stdout


def test_branch_starts_from_the_trunk_checkpoint_at_the_switch(local_sweep):
    workdir, _ = local_sweep
    rdir = sweep_plan.run_dir(workdir, "d64_20_clm50_mlm40_s0")
    with open(os.path.join(rdir, "train.log")) as f:
        assert "resumed from step 10;" in f.read()
    with open(os.path.join(rdir, "metrics.jsonl")) as f:
        records = [json.loads(x) for x in f]
    trunk = os.path.join(sweep_plan.run_dir(workdir, "d64_20_clm_s0"), "metrics.jsonl")
    with open(trunk) as f:
        trunk_records = [json.loads(x) for x in f]
    assert [r for r in records if r["step"] <= 10] == [r for r in trunk_records if r["step"] <= 10]
    assert {r["objective"] for r in records if "objective" in r and r["step"] > 10} == {"mlm40"}


def test_branch_equals_training_the_clm_prefix_again(local_sweep, tmp_path):
    """branch='none' trains the biphasic run from scratch: the same losses, bit for bit."""
    workdir, _ = local_sweep
    c = _sweep_config(schedules=("clm50_mlm40",), branch="none")
    c.finetune.config = ""
    proc = _cli(*_flag_args(c), f"--workdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scratch = _rows(os.path.join(tmp_path, "results.csv"))[0]
    branch = _rows(os.path.join(workdir, "results.csv"))[2]
    assert scratch["branch_from"] == "" and branch["branch_from"]
    assert (scratch["val_mlm_loss"], scratch["val_clm_loss"]) == (branch["val_mlm_loss"], branch["val_clm_loss"])


def test_rerun_does_nothing(local_sweep):
    workdir, _ = local_sweep
    logs = {p: os.path.getsize(os.path.join(workdir, "runs", p, "train.log")) for p in os.listdir(os.path.join(workdir, "runs"))}
    proc = _cli(*_flag_args(_sweep_config()), f"--workdir={workdir}", "--backend=local")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 of 3 runs already done, skipped" in proc.stdout
    assert "sweep: start" not in proc.stdout
    assert logs == {p: os.path.getsize(os.path.join(workdir, "runs", p, "train.log")) for p in logs}


def _fake_slurm(bin_dir, log):
    """sbatch records its arguments and prints a job id; srun drops its options and runs."""
    os.makedirs(bin_dir, exist_ok=True)
    scripts = {
        "sbatch": f'#!/usr/bin/env bash\necho "$@" >> {log}\nn=$(wc -l < {log})\necho "$((1000 + n))"\n',
        "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    }
    for name, text in scripts.items():
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def test_slurm_backend_submits_two_dependent_arrays_that_run(tmp_path):
    bin_dir, log = str(tmp_path / "bin"), str(tmp_path / "sbatch.log")
    _fake_slurm(bin_dir, log)
    c = _sweep_config(schedules=("clm", "clm50_mlm40"))
    c.finetune.config = ""
    workdir = str(tmp_path / "sweep")
    env = {**ENV, "PATH": bin_dir + os.pathsep + os.path.dirname(sys.executable) + os.pathsep + ENV["PATH"]}
    cmd = [sys.executable, "-m", "mlm_vs_clm.sweep", *_flag_args(c), f"--workdir={workdir}", "--backend=slurm",
           "--sbatch_args=--nodes=1 --time=01:00:00"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(log) as f:
        calls = f.read().splitlines()
    assert calls[0].startswith("--parsable --nodes=1 --time=01:00:00") and calls[0].endswith("stage1.sbatch")
    assert "--dependency=afterok:1001" in calls[1] and calls[1].endswith("stage2.sbatch")
    # Run the two arrays as SLURM would (one task each, on this machine, through launch/slurm.sbatch).
    for stage in (1, 2):
        task_env = {**env, "SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_ID": str(1000 + stage), "GPUS_PER_NODE": "1",
                    "VENV": os.path.dirname(os.path.dirname(sys.executable))}
        run = subprocess.run(["bash", os.path.join(workdir, "slurm", f"stage{stage}.sbatch")], cwd=REPO,
                             env=task_env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert sweep_plan.is_done(workdir, "d64_20_clm_s0") and sweep_plan.is_done(workdir, "d64_20_clm50_mlm40_s0")
    with open(os.path.join(workdir, "runs", "d64_20_clm50_mlm40_s0", "done.json")) as f:
        assert json.load(f)["step"] == 20
    # Everything done: nothing is submitted again.
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "nothing to submit" in proc.stdout
    with open(log) as f:
        assert len(f.read().splitlines()) == 2


def test_failed_trunk_fails_its_branches_and_keeps_going(tmp_path):
    c = _sweep_config(schedules=("mlm40", "clm", "clm50_mlm40"), overrides=FAST + ("optimizer.schedule=bogus",))
    c.finetune.config = ""
    proc = _cli(*_flag_args(c), f"--workdir={tmp_path}")
    assert proc.returncode == 1
    assert "sweep: not done: d64_20_clm50_mlm40_s0: its trunk d64_20_clm_s0 failed" in proc.stderr
    rows = _rows(os.path.join(tmp_path, "results.csv"))
    assert {r["status"] for r in rows} == {"missing"}
    shutil.rmtree(tmp_path)
