"""Fault injection (issue 21): one owner per run folder, sweeps that leave no orphans, a full
disk, read-only and misplaced run folders, SIGTERM during start-up, unknown config keys and a
malformed fine-tuning results.json. Each case: one line, the documented exit status, the data
safe. docs/reliability.md lists them. The kill -9 and SIGTERM resume tests of a training run are
in test_checkpoint.py."""

import asyncio
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import tensorstore as ts

from mlm_vs_clm import logs, runlock
from tests.helpers import write_word_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
       "JAX_COMPILATION_CACHE_DIR": os.path.join(REPO, ".cache", "jax")}
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus"))


def _train_flags(corpus, workdir, steps=12, *extra):
    return ["--config=configs/pretrain.py:tiny,clm50_mlm40", f"--workdir={workdir}",
            f"--config.data.source={corpus}", "--config.data.tokenizer_vocab_size=384",
            "--config.model.vocab_size=384", "--config.train.batch_size=8", "--config.train.seq_len=32",
            f"--config.train.steps={steps}", "--config.train.log_every=1", "--config.train.eval_every=6",
            "--config.train.checkpoint_every=4", "--config.train.eval_batches=1", "--config.train.progress=False",
            "--config.mesh.data=1", *extra]


def _start(module, args, **kw):
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _run(module, args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _wait_for(cond, timeout=240, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _holder_pid(directory):
    try:
        with open(os.path.join(directory, runlock.LOCK_FILE)) as f:
            return json.load(f)["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _records(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip().endswith("}")]


def _alive(pid):
    """Running (a zombie waiting for a container's PID 1 to reap it counts as ended)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except OSError:
        return False


def _one_line(text):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    proc = _run("mlm_vs_clm.train", _train_flags(corpus, workdir))
    assert proc.returncode == 0 and "done: step 12" in proc.stdout, proc.stderr[-3000:]
    return workdir


# ------------------------------------------------------------------ one owner per run folder


def test_lock_names_the_holder_and_is_released(tmp_path):
    first = runlock.RunLock(str(tmp_path))
    with pytest.raises(runlock.RunLockError, match=f"in use by PID {os.getpid()} on {socket.gethostname()}"):
        runlock.RunLock(str(tmp_path))
    runlock.RunLock(str(tmp_path), process_index=1).release()  # another process of the same run
    first.release()
    runlock.RunLock(str(tmp_path)).release()


def test_second_train_on_a_workdir_stops_and_a_killed_holder_leaves_no_lock(corpus, tmp_path):
    workdir = str(tmp_path / "run")
    first = _start("mlm_vs_clm.train", _train_flags(corpus, workdir, 100000))
    try:
        _wait_for(lambda: _holder_pid(workdir) == first.pid, what="the first run's lock")
        second = _run("mlm_vs_clm.train", _train_flags(corpus, workdir, 100000), timeout=120)
        assert second.returncode == 1, second.stderr[-3000:]
        line = _one_line(second.stderr)
        assert line.startswith(f"error: {workdir} is in use by PID {first.pid} on {socket.gethostname()}"), line
        assert first.poll() is None
    finally:
        first.kill()  # kill -9: the kernel drops its lock
        first.wait()
    assert _holder_pid(workdir) == first.pid  # its name stays in the file, without the lock
    runlock.RunLock(workdir).release()


def test_second_sweep_on_a_folder_stops(tmp_path):
    lock = runlock.RunLock(str(tmp_path))
    try:
        proc = _run("mlm_vs_clm.sweep", ["analyze", f"--workdir={tmp_path}"], timeout=120)
    finally:
        lock.release()
    assert proc.returncode == 1
    assert f"is in use by PID {os.getpid()}" in _one_line(proc.stderr)


def test_second_finetune_on_a_folder_stops(finished_run, tmp_path):
    lock = runlock.RunLock(str(tmp_path))
    try:
        proc = _run("mlm_vs_clm.finetune", ["--config=configs/finetune.py:news_quick",
                                            f"--config.checkpoint={finished_run}", f"--workdir={tmp_path}"],
                    timeout=120)
    finally:
        lock.release()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"is in use by PID {os.getpid()}" in _one_line(proc.stderr)


# ------------------------------------------------------------------ sweeps leave no orphans


def _sweep_args(workdir, steps):
    return ["--config=configs/sweeps/micro.py", "--config.sizes=('d64=tiny',)", f"--config.steps=({steps},)",
            "--config.schedules=('mlm40',)", "--config.finetune.config=", f"--workdir={workdir}",
            "--config.overrides=('train.batch_size=8', 'train.seq_len=32', 'train.log_every=1', "
            "'train.eval_every=1000', 'train.checkpoint_every=1000', 'train.eval_batches=1')"]


def _sweep_child(workdir, steps):
    rdir = os.path.join(workdir, "runs", f"d64_{steps}_mlm40_s0")
    return rdir, lambda: _holder_pid(rdir)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_sweep_children_end_with_the_sweep_and_save(sig, tmp_path):
    workdir, steps = str(tmp_path / "sweep"), 100000
    rdir, child_pid = _sweep_child(workdir, steps)
    sweep = _start("mlm_vs_clm.sweep", _sweep_args(workdir, steps))
    try:
        _wait_for(lambda: _records(rdir) or sweep.poll() is not None, what="the child's first step")
        assert sweep.poll() is None, sweep.communicate()
        child = child_pid()
        assert child and _alive(child)
        sweep.send_signal(sig)
        out, err = sweep.communicate(timeout=120)
        _wait_for(lambda: not _alive(child), timeout=120, what=f"the train child {child} to end")
    finally:
        if sweep.poll() is None:
            sweep.kill()
    with open(os.path.join(rdir, "train.log")) as f:
        log = f.read()
    assert "preempted: checkpoint saved at step" in log, log[-3000:]
    saved = int(log.split("preempted: checkpoint saved at step")[1].split()[0])
    assert os.path.isdir(os.path.join(rdir, "checkpoints", str(saved)))
    if sig == signal.SIGTERM:
        with open(os.path.join(rdir, "wall_s.json")) as f:
            assert len(json.load(f)) == 1  # this invocation's training time (kill -9: none recorded)
        assert sweep.returncode == 0, err[-3000:]
        assert "sweep: stopped by a signal" in out


def _two_recorded_times(rdir: str, workdir: str) -> list[float]:
    """The run's recorded invocation times; results.csv's wall_s must be their sum."""
    with open(os.path.join(rdir, "wall_s.json")) as f:
        times = json.load(f)
    with open(os.path.join(workdir, "results.csv")) as f:
        header, row = f.read().splitlines()[:2]
    wall = float(row.split(",")[header.split(",").index("wall_s")])
    assert len(times) == 2 and wall == pytest.approx(sum(times), rel=1e-5)
    return times


def test_wall_s_adds_up_every_invocation(tmp_path):
    workdir, steps = str(tmp_path / "sweep"), 400
    rdir, _ = _sweep_child(workdir, steps)
    sweep = _start("mlm_vs_clm.sweep", _sweep_args(workdir, steps))
    _wait_for(lambda: _records(rdir) or sweep.poll() is not None, what="the child's first step")
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 0 and "stopped" in out, err[-3000:]
    proc = _run("mlm_vs_clm.sweep", _sweep_args(workdir, steps))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _two_recorded_times(rdir, workdir)


def test_slurm_wall_s_adds_up_a_preempted_and_a_requeued_invocation(tmp_path):
    """The slurm stage script, as a SLURM array task would run it: SIGTERM to the batch script
    (preemption: the training saves, the task is requeued), then the requeued task trains to the
    end. Fakes: sbatch prints a job id, srun runs its command in its place, scancel signals it."""
    d, workdir, steps = str(tmp_path), str(tmp_path / "sweep"), 400
    rdir, _ = _sweep_child(workdir, steps)
    bin_dir = os.path.join(d, "bin")
    os.makedirs(bin_dir)
    for name, text in {"sbatch": "echo 1001\n",
                       "srun": f'while [[ "$1" == --* ]]; do shift; done\necho $$ > {d}/task.pid\nexec "$@"\n',
                       "scancel": f'kill -"${{1#--signal=}}" "$(cat {d}/task.pid)"\n',
                       "scontrol": f'echo "$@" >> {d}/scontrol.log\n'}.items():
        with open(os.path.join(bin_dir, name), "w") as f:
            f.write("#!/usr/bin/env bash\n" + text)
        os.chmod(os.path.join(bin_dir, name), 0o755)
    env = {**ENV, "PATH": bin_dir + os.pathsep + ENV["PATH"], "SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_ID": "1001",
           "GPUS_PER_NODE": "1", "VENV": os.path.dirname(os.path.dirname(sys.executable))}
    submit = subprocess.run([sys.executable, "-m", "mlm_vs_clm.sweep", *_sweep_args(workdir, steps), "--backend=slurm"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stderr[-3000:]
    task = ["bash", os.path.join(workdir, "slurm", "stage1.sbatch")]
    elapsed = []
    start = time.time()
    first = subprocess.Popen(task, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _records(rdir) or first.poll() is not None, what="the first step")
        first.send_signal(signal.SIGTERM)  # SLURM's --signal=B:TERM: the batch script only
        out, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    elapsed.append(time.time() - start)
    assert first.returncode == 0 and "preempted, requeued" in out, out[-2000:] + err[-3000:]
    with open(os.path.join(d, "scontrol.log")) as f:
        assert f.read().split() == ["requeue", "1001"]
    assert not os.path.exists(os.path.join(rdir, "done.json"))
    start = time.time()
    second = subprocess.run(task, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    elapsed.append(time.time() - start)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    collect = subprocess.run([sys.executable, "-m", "mlm_vs_clm.sweep", "collect", f"--workdir={workdir}"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=300)
    assert collect.returncode == 0, collect.stderr[-3000:]
    times = _two_recorded_times(rdir, workdir)
    for recorded, measured in zip(times, elapsed):  # whole seconds, within the task's own time
        assert 1 <= recorded <= measured + 1, (times, elapsed)


# ------------------------------------------------------------------ a full disk


@pytest.fixture
def tmpfs(tmp_path):
    if not ROOT or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_during_a_checkpoint_is_one_line_and_resumes(corpus, tmpfs):
    """4 MiB holds the tokenizer and two checkpoints of this model (1.6 MiB each), not a third."""
    workdir = os.path.join(tmpfs, "run")
    proc = _run("mlm_vs_clm.train", _train_flags(corpus, workdir))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    # One line and nothing else on stderr: no traceback (not even the closed-event-loop ones of
    # the failed save's unfinished writes: test_orphaned_callbacks_of_a_failed_save_are_dropped).
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-3000:]
    errors = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    line = errors[0]
    others = [ln for ln in proc.stderr.splitlines() if ln.strip() and ln != line]
    assert all("tokenizer: the text supports" in ln for ln in others), proc.stderr[-3000:]  # a tiny corpus
    assert "no space left on device" in line, line
    if "checkpoint at step" in line:
        assert f"({workdir}/checkpoints); the previous checkpoint is intact" in line
    subprocess.run(["mount", "-o", "remount,size=64m", tmpfs], check=True)
    proc = _run("mlm_vs_clm.train", _train_flags(corpus, workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step" in proc.stdout and "done: step 12" in proc.stdout


def _orphaned_callback():
    """What a failed orbax save leaves: its coroutine stops at the first error and its event loop
    closes while a tensorstore write it awaited is unfinished; when that write ends, tensorstore's
    callback finds the loop closed and hands the RuntimeError to sys.unraisablehook."""
    promise, write = ts.Promise.new()

    async def save():
        write.__await__()  # registers tensorstore's callback on this loop
        raise OSError(errno.ENOSPC, "No space left on device")

    loop = asyncio.new_event_loop()
    with pytest.raises(OSError):
        loop.run_until_complete(save())
    loop.close()
    promise.set_result(None)


def test_orphaned_callbacks_of_a_failed_save_are_dropped(monkeypatch):
    printed = []
    hook = logs.OrphanedCallbacks(printed.append)
    monkeypatch.setattr(sys, "unraisablehook", hook)
    _orphaned_callback()
    assert not printed  # held while the save is in flight
    hook.settle(failed=True)
    _orphaned_callback()  # the failed save's later writes
    assert not printed
    promise, future = ts.Promise.new()  # any other unraisable error is printed at once
    future.add_done_callback(lambda _: 1 / 0)
    promise.set_result(None)
    assert [u.exc_type for u in printed] == [ZeroDivisionError]

    unexplained = logs.OrphanedCallbacks(printed.append)  # no failed save explains it: printed
    monkeypatch.setattr(sys, "unraisablehook", unexplained)
    _orphaned_callback()
    unexplained.settle(failed=False)
    assert str(printed[-1].exc_value) == "Event loop is closed" and len(printed) == 2


# ------------------------------------------------------------------ the run folder itself


@pytest.fixture
def read_only(finished_run, tmp_path):
    """The finished run seen through a read-only bind mount (root ignores file permissions)."""
    if ROOT:
        mnt = str(tmp_path / "ro")
        os.mkdir(mnt)
        if subprocess.run(["mount", "--bind", finished_run, mnt]).returncode != 0:
            pytest.skip("cannot bind-mount here")
        subprocess.run(["mount", "-o", "remount,ro,bind", mnt], check=True)
        yield mnt
        subprocess.run(["umount", "-l", mnt])
    else:
        copy = str(tmp_path / "ro")
        shutil.copytree(finished_run, copy)
        for root, dirs, files in os.walk(copy):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o555 if name in dirs else 0o444)
        os.chmod(copy, 0o555)
        yield copy
        os.chmod(copy, 0o755)


def test_read_only_workdir(corpus, read_only):
    done = _run("mlm_vs_clm.train", _train_flags(corpus, read_only))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: step 12, 3,072 tokens, loss " in done.stdout and "val_mlm_loss" in done.stdout
    more = _run("mlm_vs_clm.train", _train_flags(corpus, read_only, 16))
    assert more.returncode == 2
    assert _one_line(more.stderr) == f"error: workdir {read_only} is read-only"


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_workdir_that_is_a_file_or_under_one(corpus, tmp_path, where):
    path = tmp_path / "f"
    path.write_text("not a folder")
    workdir = str(path) if where == "file" else str(path / "run")
    proc = _run("mlm_vs_clm.train", _train_flags(corpus, workdir), timeout=120)
    assert proc.returncode == 2
    expected = "is a file, not a folder" if where == "file" else f"is under {path}, which is a file"
    assert _one_line(proc.stderr) == f"error: workdir {workdir} {expected}"


def test_failing_command_leaves_no_empty_workdir(tmp_path):
    workdir = tmp_path / "new" / "run"
    proc = _run("mlm_vs_clm.train", ["--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
                                     f"--config.data.source={tmp_path}/missing/*.txt"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _one_line(proc.stderr).startswith("error: ")
    assert not (tmp_path / "new").exists()


def test_finished_run_rerun_prints_its_summary(corpus, finished_run):
    proc = _run("mlm_vs_clm.train", _train_flags(corpus, finished_run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [ln for ln in proc.stdout.splitlines() if ln.startswith("done:")]
    assert len(done) == 1 and ", loss " in done[0] and ", ;" not in done[0], proc.stdout
    assert "_CHECKPOINT_METADATA" not in proc.stderr


# ------------------------------------------------------------------ start-up


def test_sigterm_during_start_up_stops_before_the_first_step(corpus, tmp_path):
    workdir = str(tmp_path / "run")
    proc = _start("mlm_vs_clm.train", _train_flags(corpus, workdir))
    _wait_for(lambda: _holder_pid(workdir) == proc.pid or proc.poll() is not None, what="the lock")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped: SIGTERM during start-up" in out and "before the first step" in out, out + err[-2000:]
    assert not os.path.isdir(os.path.join(workdir, "checkpoints", "1"))


# ------------------------------------------------------------------ config keys and results files


@pytest.mark.parametrize("module,config,key,expected", [
    ("mlm_vs_clm.train", "configs/pretrain.py:tiny", "train.stepz=10",
     "error: unknown config key train.stepz (did you mean train.steps?)"),
    ("mlm_vs_clm.train", "configs/pretrain.py:tiny", "nonsense=1", "error: unknown config key nonsense"),
    ("mlm_vs_clm.bench", "configs/pretrain.py:tiny", "model.num_layerz=1",
     "error: unknown config key model.num_layerz (did you mean model.num_layers?)"),
    ("mlm_vs_clm.bench", None, "train.stepz=1",  # its default config, loaded as the flag is defined
     "error: unknown config key train.stepz (did you mean train.steps?)"),
    ("mlm_vs_clm.aot", "configs/pretrain.py:tiny", "nonsense=1", "aot: unknown config key nonsense"),
    ("mlm_vs_clm.finetune", "configs/finetune.py:news_quick", "stepz=3",
     "finetune: unknown config key stepz (did you mean steps?)"),
    ("mlm_vs_clm.sweep", "configs/sweeps/micro.py", "sizez=1", "sweep: unknown config key sizez (did you mean sizes?)"),
])
def test_unknown_config_keys_are_named(module, config, key, expected, tmp_path):
    config_flag = [f"--config={config}"] if config else []
    proc = _run(module, [*config_flag, f"--config.{key}", f"--workdir={tmp_path / 'w'}"], timeout=120)
    assert proc.returncode == 2
    assert _one_line(proc.stderr) == expected
    assert not (tmp_path / "w").exists()


def test_finetune_results_json_with_the_wrong_shape(finished_run, tmp_path):
    (tmp_path / "results.json").write_text('{"runs": "oops"}')
    proc = _run("mlm_vs_clm.finetune", ["--config=configs/finetune.py:news_quick",
                                        f"--config.checkpoint={finished_run}", f"--workdir={tmp_path}"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert line.startswith(f"finetune: results: {tmp_path / 'results.json'} is not a results file"), line


def test_sweep_add_wall_that_cannot_write_is_one_line(tmp_path):
    """The slurm stage script's `sweep add-wall` on a run folder it cannot write: one line, exit 1."""
    from tests.helpers import run_command

    workdir = str(tmp_path / "sweep")
    planned = run_command("sweep", ["--config=configs/sweeps/micro.py", f"--workdir={workdir}", "--backend=print"])
    assert planned.returncode == 0, planned.stderr[-2000:]
    with open(os.path.join(workdir, "plan.json")) as f:
        run_id = json.load(f)["runs"][0]["id"]
    runs = os.path.join(workdir, "runs")
    os.makedirs(runs, exist_ok=True)
    shutil.rmtree(os.path.join(runs, run_id), ignore_errors=True)
    with open(os.path.join(runs, run_id), "w") as f:  # a file where the run's folder should be
        f.write("not a folder")
    res = run_command("sweep", ["add-wall", f"--workdir={workdir}", f"--run={run_id}", "--wall_s=3"])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("sweep: add-wall: "), res.stderr
    assert run_id in lines[0] and "Traceback" not in res.stderr
