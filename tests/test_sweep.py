"""The sweep tool: planning, branch reuse of CLM checkpoints, the local, print and slurm
backends, results.csv, and reruns that do nothing."""

import csv
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from mlm_vs_clm.config import ConfigError, load_config
from mlm_vs_clm.sweep import plan as sweep_plan

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


def test_trunk_is_added_when_the_grid_lacks_pure_clm():
    c = _sweep_config(schedules=("mlm40", "clm50_mlm40", "clm75_mlm40"))
    runs = sweep_plan.plan(c)
    assert [(r.schedule, r.in_grid) for r in runs] == [("clm", False), ("mlm40", True), ("clm50_mlm40", True),
                                                       ("clm75_mlm40", True)]
    assert runs[2].branch_from == runs[0].id and runs[0].keep_steps == (10, 15)
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
    logs = {p: os.path.getsize(os.path.join(workdir, "runs", p, "train.log"))
            for p in os.listdir(os.path.join(workdir, "runs"))}
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


def _write_scripts(bin_dir, scripts):
    os.makedirs(bin_dir, exist_ok=True)
    for name, text in scripts.items():
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write("#!/usr/bin/env bash\n" + text)
        os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def test_slurm_sbatch_sigterm_reaches_the_training_processes_and_requeues(tmp_path):
    """SLURM signals the batch script (--signal=B:TERM); the TERM must reach the training
    processes, not srun (a real srun turns SIGTERM into SIGKILL of its tasks, so no checkpoint
    would be saved). The fakes: srun runs its command as a child and behaves like the real one
    on SIGTERM; scancel --signal=SIG JOB signals the tasks of the job's step; `python` stands
    in for the training command and records the signal it gets."""
    d = str(tmp_path)
    _write_scripts(os.path.join(d, "bin"), {
        "srun": f'while [[ "$1" == --* ]]; do shift; done\n"$@" &\ntask=$!\necho $task > {d}/task.pid\n'
                f'trap \'echo TERM >> {d}/srun.log; kill -KILL $task\' TERM\n'
                'status=0\nwait $task || status=$?\nwait $task || status=$?\nexit $status\n',
        "scancel": f'echo "$@" >> {d}/scancel.log\nsig="${{1#--signal=}}"\nkill -"$sig" "$(cat {d}/task.pid)"\n',
        "scontrol": f'echo "$@" >> {d}/scontrol.log\n',
        "python": f'trap \'echo "TERM $*" >> {d}/train.log; exit 0\' TERM\ntouch {d}/started\n'
                  'while true; do sleep 0.05; done\n',
    })
    env = {**ENV, "PATH": os.path.join(d, "bin") + os.pathsep + ENV["PATH"], "SLURM_JOB_ID": "77",
           "VENV": os.path.join(d, "no_venv")}
    proc = subprocess.Popen(["bash", "launch/slurm.sbatch", "--workdir=w"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(d, "started")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err

    def read(name):
        path = os.path.join(d, name)
        return open(path).read().splitlines() if os.path.exists(path) else []

    assert read("train.log") == ["TERM -m mlm_vs_clm.train --workdir=w"], out + err
    assert read("srun.log") == []
    assert read("scancel.log") == ["--signal=TERM 77"]
    assert read("scontrol.log") == ["requeue 77"]


def test_failed_trunk_fails_its_branches_and_keeps_going(tmp_path):
    c = _sweep_config(schedules=("mlm40", "clm", "clm50_mlm40"), overrides=FAST + ("optimizer.schedule=bogus",))
    c.finetune.config = ""
    proc = _cli(*_flag_args(c), f"--workdir={tmp_path}")
    assert proc.returncode == 1
    assert "sweep: not done: d64_20_clm50_mlm40_s0: its trunk d64_20_clm_s0 failed" in proc.stderr
    rows = _rows(os.path.join(tmp_path, "results.csv"))
    assert {r["status"] for r in rows} == {"missing"}
    shutil.rmtree(tmp_path)


# ------------------------------------------------------------------ plan bookkeeping (no training)


def _plan(workdir, **kw):
    from mlm_vs_clm.sweep import runner as sweep_runner

    c = _sweep_config(**kw)
    c.finetune.config = ""
    return {r["id"]: r for r in sweep_runner.write_plan(str(workdir), c)}


def _fake_done(workdir, run, **record):
    rdir = sweep_plan.run_dir(str(workdir), run["id"])
    os.makedirs(rdir, exist_ok=True)
    with open(os.path.join(rdir, "done.json"), "w") as f:
        json.dump({"step": run["steps"], **record}, f)
    return rdir


def test_trunk_is_added_only_when_it_saves_compute(tmp_path):
    """Without a pure CLM schedule an added trunk costs a whole CLM run: clm50_mlm40 alone would
    spend more than it saves, so it trains from scratch; with clm75_mlm40 too the net saving
    (0.5 + 0.75 - 1 CLM runs) is what is reported."""
    from mlm_vs_clm.sweep import runner as sweep_runner

    runs = _plan(tmp_path / "a", schedules=("mlm40", "clm50_mlm40"))
    assert list(runs) == ["d64_20_mlm40_s0", "d64_20_clm50_mlm40_s0"]
    assert not runs["d64_20_clm50_mlm40_s0"]["branch_from"]
    assert sweep_runner.branch_saving(list(runs.values()))[0] == 0
    runs = _plan(tmp_path / "b", schedules=("clm50_mlm40", "clm75_mlm40"))
    trunk = runs["d64_20_clm_s0"]
    assert not trunk["in_grid"] and runs["d64_20_clm75_mlm40_s0"]["branch_from"] == trunk["id"]
    saved, total = sweep_runner.branch_saving(list(runs.values()))
    assert saved == pytest.approx(0.25 * trunk["flops"])
    assert total == runs["d64_20_clm50_mlm40_s0"]["flops"] + runs["d64_20_clm75_mlm40_s0"]["flops"]


def test_flops_sum_every_phase_and_plain_mlm_uses_the_config_mask_ratio(tmp_path):
    runs = _plan(tmp_path, schedules=("clm", "mlm20", "mlm30", "mlm40", "mlm50", "mlm", "mlm40+clm@50%",
                                      "clm+mlm20@50%+mlm50@75%"),
                 overrides=FAST + ("mlm.mask_ratio=0.3",), branch="none")
    F = {s: runs[f"d64_20_{s}_s0"]["flops"] for s in ("clm", "mlm20", "mlm30", "mlm40", "mlm50")}
    assert len(set(F.values())) == 5
    plain = runs["d64_20_mlm_s0"]
    assert (plain["mask_ratio"], plain["flops"]) == (0.3, F["mlm30"])
    two = runs[sweep_plan.run_id("d64", 20, "mlm40+clm@50%", 0)]
    assert two["flops"] == pytest.approx(0.5 * F["mlm40"] + 0.5 * F["clm"])
    multi = runs[sweep_plan.run_id("d64", 20, "clm+mlm20@50%+mlm50@75%", 0)]
    assert multi["flops"] == pytest.approx(0.5 * F["clm"] + 0.25 * F["mlm20"] + 0.25 * F["mlm50"])
    assert (multi["clm_steps"], multi["mask_ratio"]) == (10, 0.2)


@pytest.mark.parametrize("key,value,message", [
    ("steps", (4, 4), r"steps: \(4, 4\) repeats a value"),
    ("seeds", (0, 0), r"seeds: \(0, 0\) repeats a value"),
    ("seeds", (0.3, 0.6), "seeds: 0.3 is not an integer"),
    ("steps", (20, 7.5), "steps: 7.5 is not an integer"),
    ("steps", ("20",), "steps: '20' is not an integer"),
])
def test_duplicate_or_fractional_steps_and_seeds_are_one_line_errors(key, value, message):
    with pytest.raises(ConfigError, match="^" + message):
        sweep_plan.plan(_sweep_config(**{key: value}))


def test_planned_paths_work_from_any_directory(tmp_path):
    """The training and fine-tuning subprocesses (and SLURM jobs) run in the caller's cwd: the plan
    holds absolute config paths."""
    args = [a.replace("--config=configs/", f"--config={REPO}/configs/") for a in _flag_args(_sweep_config())]
    proc = subprocess.run([sys.executable, "-m", "mlm_vs_clm.sweep", *args, "--workdir=w", "--backend=print"],
                          cwd=tmp_path, env={**ENV, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "w" / "plan.json") as f:
        saved = json.load(f)
    for r in saved["runs"]:
        config = next(a for a in r["train_args"] if a.startswith("--config="))[len("--config="):].partition(":")[0]
        assert os.path.isabs(config) and os.path.isfile(config), config
    finetune = saved["sweep"]["finetune"]["config"].partition(":")[0]
    assert os.path.isabs(finetune) and os.path.isfile(finetune)


def test_finished_run_with_other_arguments_is_refused(tmp_path):
    from mlm_vs_clm.sweep import runner as sweep_runner

    runs = _plan(tmp_path)
    rid = "d64_20_mlm40_s0"
    rdir = sweep_plan.run_dir(str(tmp_path), rid)
    os.makedirs(rdir)
    with open(os.path.join(rdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 20, "val_mlm_loss": 5.0, "val_clm_loss": 6.0}) + "\n")
    sweep_runner.finish(str(tmp_path), runs[rid], {"finetune": {"config": "", "overrides": ()}}, 1.0)
    _plan(tmp_path)  # the same arguments: accepted
    _plan(tmp_path, schedules=("mlm40", "clm", "clm50_mlm40", "clm25_mlm40"))  # the trunk keeps more checkpoints
    with pytest.raises(ConfigError) as e:  # another model under the same size name
        _plan(tmp_path, sizes=("d64=tiny:model.hidden_size=32,model.ffn_size=96",))
    assert str(e.value).startswith(f"run {rid}: finished with other training or fine-tuning arguments")
    assert "use a new --workdir" in str(e.value) and "\n" not in str(e.value)
    with open(os.path.join(rdir, "done.json")) as f:
        record = json.load(f)
    del record["args_hash"]  # a done.json from before the hash: accepted
    with open(os.path.join(rdir, "done.json"), "w") as f:
        json.dump(record, f)
    _plan(tmp_path, sizes=("d64=tiny:model.hidden_size=32,model.ffn_size=96",))


def test_branch_of_a_trunk_finished_without_its_checkpoint_trains_from_scratch(tmp_path, capsys):
    """clm25_mlm40 added to a sweep whose trunk already finished (keeping only step 10)."""
    from mlm_vs_clm.sweep import runner as sweep_runner

    runs = _plan(tmp_path)
    trunk = _fake_done(tmp_path, runs["d64_20_clm_s0"], args_hash=runs["d64_20_clm_s0"]["args_hash"])
    os.makedirs(os.path.join(trunk, "checkpoints", "10"))
    runs = _plan(tmp_path, schedules=("mlm40", "clm", "clm50_mlm40", "clm25_mlm40"))
    assert runs["d64_20_clm50_mlm40_s0"]["branch_from"] == "d64_20_clm_s0"
    late = runs["d64_20_clm25_mlm40_s0"]
    assert (late["branch_from"], late["saved_flops"]) == ("", 0.0)
    note = "d64_20_clm25_mlm40_s0: its trunk d64_20_clm_s0 finished without a checkpoint at step 5"
    assert note in capsys.readouterr().out
    # a plan written before the trunk finished: prepare trains it from scratch too
    sweep_runner.prepare(str(tmp_path), dict(late, branch_from="d64_20_clm_s0", branch_step=5))
    assert "trains from scratch" in capsys.readouterr().out


def test_slurm_branches_wait_only_for_their_own_trunk(tmp_path, monkeypatch):
    from mlm_vs_clm.sweep import slurm as sweep_slurm

    runs = list(_plan(tmp_path / "sweep", steps=(20, 40), schedules=("clm", "clm50_mlm40", "clm25_mlm40")).values())
    log = str(tmp_path / "sbatch.log")
    _fake_slurm(str(tmp_path / "bin"), log)
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    sweep_slurm.slurm_backend(str(tmp_path / "sweep"), runs)
    with open(log) as f:
        calls = f.read().splitlines()
    stage2 = str(tmp_path / "sweep" / "slurm" / "stage2.sbatch")
    assert calls[1:] == [f"--parsable --array=0,1 --dependency=afterok:1001_0 {stage2}",
                         f"--parsable --array=2,3 --dependency=afterok:1001_1 {stage2}"]
    for stage in (1, 2):
        subprocess.run(["bash", "-n", str(tmp_path / "sweep" / "slurm" / f"stage{stage}.sbatch")], check=True)
    # a finished trunk's branches need not wait
    ids = ["d64_40_clm_s0"]
    assert sweep_slurm.stage2_submissions(runs, ids, ["d64_20_clm50_mlm40_s0", "d64_40_clm25_mlm40_s0"], "7") == [
        ("0", ""), ("1", "afterok:7_0")]
