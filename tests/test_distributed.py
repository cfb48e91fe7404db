"""Multi-process start-up on localhost: clear exits instead of hangs, and a working psum."""

import json
import os
import subprocess
import sys
import time

import portpicker
import pytest

from mlm_vs_clm import distributed

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process of a run: joins through the MLM_VS_CLM_* environment variables, sums a global
# array built from process-local rows, passes two barriers, prints what it saw as JSON.
WORKER = r"""
import json, os, sys, time
import numpy as np
from mlm_vs_clm import distributed
distributed.initialize()
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
pid = jax.process_index()
mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
local_rows_Rx2 = np.full((jax.local_device_count(), 2), pid + 1, np.float32)
x_Nx2 = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_rows_Rx2)
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
value = float(total(x_Nx2))  # the first collective also sets up the gloo context
if os.environ.get("SKIP_COLLECTIVE_IN") == str(pid):
    time.sleep(float(os.environ["SKIP_SLEEP_S"]))
    sys.exit(0)
try:
    double = float(total(2 * x_Nx2))
except Exception as e:
    print(json.dumps({"process": pid, "error": str(e).splitlines()[0]}), flush=True)
    sys.exit(5)
distributed.sync("after_sum")
distributed.sync("after_sum")  # the same name twice: ids stay unique
print(json.dumps({"process": pid, "count": jax.process_count(), "devices": jax.device_count(),
                  "local": jax.local_device_count(), "sum": value, "double": double,
                  "main": distributed.is_main_process()}), flush=True)
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",) and not k.startswith("MLM_VS_CLM_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT, PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _start(code, env):
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _record(out: str) -> dict:
    """The worker's JSON line (gloo's own C++ prints share stdout and may come after it)."""
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, out[-2000:]
    return json.loads(lines[-1])


def _run_pair(timeout, **extra):
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    procs = [
        _start(
            WORKER,
            _env(
                MLM_VS_CLM_COORDINATOR=address,
                MLM_VS_CLM_NUM_PROCESSES=2,
                MLM_VS_CLM_PROCESS_ID=i,
                MLM_VS_CLM_CPU_DEVICES=4,
                **extra,
            ),
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return procs, outs


def test_missing_coordinator_exits_with_clear_error_within_timeout():
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"  # nobody listens here
    env = _env(MLM_VS_CLM_CPU_DEVICES=4)
    code = f"from mlm_vs_clm import distributed; distributed.initialize({address!r}, 2, 1, timeout_s=5)"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          check=False, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("distributed: process 1 of 2 (coordinator 127.0.0.1:") and "within 5 s" in last, proc.stderr
    assert 5 <= elapsed < 5 + 15, elapsed  # python + jax start-up on a busy 2-core machine


def test_two_processes_see_eight_devices_and_agree_on_a_psum():
    procs, outs = _run_pair(timeout=120)
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        results.append(_record(out))
    # rows of process 0 hold 1.0, of process 1 hold 2.0: 4 devices x 2 columns each
    assert [(r["sum"], r["double"]) for r in results] == [(4 * 2 * 1.0 + 4 * 2 * 2.0, 2 * 24.0)] * 2
    assert [(r["count"], r["devices"], r["local"]) for r in results] == [(2, 8, 4)] * 2
    assert [r["main"] for r in results] == [True, False]


def test_collective_whose_peer_never_joins_fails_instead_of_hanging():
    # Process 1 skips the second all-reduce; process 0 must give up after the collective timeout.
    start = time.monotonic()
    procs, outs = _run_pair(
        timeout=90, SKIP_COLLECTIVE_IN=1, SKIP_SLEEP_S=10, MLM_VS_CLM_COLLECTIVE_TIMEOUT_S=3
    )
    out0, err0 = outs[0]
    assert procs[0].returncode != 0
    record = _record(out0)
    assert record["process"] == 0 and "timed out" in record["error"].lower(), err0[-2000:]
    assert time.monotonic() - start < 60


def test_incomplete_explicit_settings_are_rejected_with_one_line():
    with pytest.raises(distributed.DistributedError, match="needs all of --coordinator_address"):
        distributed.initialize("127.0.0.1:1234", 2, None)
    with pytest.raises(distributed.DistributedError, match="process_id < num_processes"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(distributed.DistributedError, match="not HOST:PORT"):
        distributed.initialize("localhost", 2, 0)


def test_single_process_is_a_no_op(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", distributed.ENV_MODE, distributed.ENV_COORDINATOR):
        monkeypatch.delenv(name, raising=False)
    distributed.initialize()  # must not start a coordinator or touch the backend
    assert not __import__("jax").distributed.is_initialized()


LOCAL_SH = os.path.join(REPO_ROOT, "launch", "local.sh")


def test_local_launcher_stops_the_others_when_one_process_fails(tmp_path):
    # Process 1 fails at once; process 0 would wait forever at the coordinator's barrier.
    (tmp_path / "failing_worker.py").write_text(
        "import os, sys, time\n"
        "from mlm_vs_clm import distributed\n"
        "if os.environ['MLM_VS_CLM_PROCESS_ID'] == '1':\n"
        "    sys.exit(7)\n"
        "distributed.initialize()\n"
        "time.sleep(600)\n"
    )
    env = _env(PYTHON=sys.executable, MODULE="failing_worker", PYTHONPATH=str(tmp_path))
    start = time.monotonic()
    proc = subprocess.run(["bash", LOCAL_SH, "2"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                          timeout=60)
    assert proc.returncode == 7, proc.stderr[-2000:]
    assert "a process exited with status 7" in proc.stderr
    assert time.monotonic() - start < 30


def test_local_launcher_rejects_a_bad_process_count():
    proc = subprocess.run(["bash", LOCAL_SH, "two"], env=_env(), capture_output=True, text=True, check=False,
                          timeout=10)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: launch/local.sh NUM_PROCESSES")


def _train_flags(corpus, workdir):
    return [
        "--config=configs/pretrain.py:tiny,clm", f"--workdir={workdir}", f"--config.data.source={corpus}",
        "--config.data.tokenizer_vocab_size=384", "--config.model.vocab_size=384", "--config.train.batch_size=8",
        "--config.train.seq_len=32", "--config.train.steps=4", "--config.train.log_every=1",
        "--config.train.eval_every=100", "--config.train.checkpoint_every=100", "--config.train.eval_batches=1",
        "--config.train.progress=False", "--config.mesh.data=2", "--config.mesh.fsdp=4",
    ]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [(r["step"], r["objective"], r["loss"]) for r in records if "loss" in r]


def test_two_process_training_equals_one_process_with_eight_devices(tmp_path):
    import random

    rng = random.Random(0)
    words = ["the", "bank", "said", "shares", "rose", "while", "team", "won", "its", "game", "minister", "film"]
    (tmp_path / "corpus").mkdir()
    for i in range(64):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(10, 80)))
        (tmp_path / "corpus" / f"d{i}.txt").write_text(text + ".\n")
    corpus = str(tmp_path / "corpus" / "*.txt")
    cache = os.path.join(REPO_ROOT, ".cache", "jax")

    one = str(tmp_path / "one")
    single = subprocess.run(
        [sys.executable, "-m", "mlm_vs_clm.train", *_train_flags(corpus, one)],
        env=_env(MLM_VS_CLM_CPU_DEVICES=8, JAX_COMPILATION_CACHE_DIR=cache), cwd=REPO_ROOT,
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]

    two = str(tmp_path / "two")
    pair = subprocess.run(
        ["bash", LOCAL_SH, "2", *_train_flags(corpus, two)],
        env=_env(PYTHON=sys.executable, MLM_VS_CLM_CPU_DEVICES=4, JAX_COMPILATION_CACHE_DIR=cache), cwd=REPO_ROOT,
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert pair.returncode == 0, pair.stderr[-2000:]
    expected, got = _losses(one), _losses(two)
    assert [s for s, _, _ in expected] == [1, 2, 3, 4]
    assert [(s, o) for s, o, _ in got] == [(s, o) for s, o, _ in expected]
    assert [l for _, _, l in got] == pytest.approx([l for _, _, l in expected], rel=1e-5, abs=1e-6)

    # Checkpoints cross the process boundary both ways: the 2-process run resumes in one
    # process, the 1-process run resumes in two, and both continue identically.
    more = ["--config.train.steps=6"]
    single_resume = subprocess.run(
        [sys.executable, "-m", "mlm_vs_clm.train", *_train_flags(corpus, two), *more],
        env=_env(MLM_VS_CLM_CPU_DEVICES=8, JAX_COMPILATION_CACHE_DIR=cache), cwd=REPO_ROOT,
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert single_resume.returncode == 0 and "resumed from step 4" in single_resume.stdout, single_resume.stderr[-2000:]
    pair_resume = subprocess.run(
        ["bash", LOCAL_SH, "2", *_train_flags(corpus, one), *more],
        env=_env(PYTHON=sys.executable, MLM_VS_CLM_CPU_DEVICES=4, JAX_COMPILATION_CACHE_DIR=cache), cwd=REPO_ROOT,
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert pair_resume.returncode == 0 and "resumed from step 4" in pair_resume.stdout, pair_resume.stderr[-2000:]
    a, b = _losses(one), _losses(two)
    assert [s for s, _, _ in a] == [1, 2, 3, 4, 5, 6]
    assert [l for _, _, l in a] == pytest.approx([l for _, _, l in b], rel=1e-5, abs=1e-6)


def _children(pid: int) -> list[int]:
    """Live child processes of `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def _preempt(args, env, workdir, signal_to, after_records):
    """Start launch/local.sh, wait for `after_records` metric records past the start, send SIGTERM
    to `signal_to(launcher pid)`, return (returncode, stdout, stderr)."""
    import signal

    def records():
        path = os.path.join(workdir, "metrics.jsonl")
        if not os.path.exists(path):
            return 0
        with open(path) as f:
            return sum(1 for line in f if line.strip())

    start_records = records()
    env = {**env, "MLM_VS_CLM_PORT": str(portpicker.pick_unused_port())}  # apart from other tests' picks
    launcher = subprocess.Popen(["bash", LOCAL_SH, "2", *args], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and launcher.poll() is None and records() < start_records + after_records:
        time.sleep(0.1)
    assert launcher.poll() is None and records() >= start_records + after_records, launcher.communicate()[1][-2000:]
    for pid in signal_to(launcher.pid):
        os.kill(pid, signal.SIGTERM)
    out, err = launcher.communicate(timeout=180)
    return launcher.returncode, out, err


def test_sigterm_to_one_process_or_the_launcher_saves_one_step_on_every_process(tmp_path):
    # A preemption may signal one process of a multi-process run, or all of them at different
    # steps: they agree on one step, save it together and exit 0. A signal to the launcher is
    # forwarded, and the launcher then reports the processes' own status (0), not the signal's.
    import random

    from mlm_vs_clm import checkpoint as ckpt_lib

    rng = random.Random(1)
    words = ["the", "bank", "said", "shares", "rose", "while", "team", "won", "its", "game", "minister", "film"]
    (tmp_path / "corpus").mkdir()
    for i in range(64):
        (tmp_path / "corpus" / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(40)) + ".\n")
    workdir = str(tmp_path / "run")
    args = [a for a in _train_flags(str(tmp_path / "corpus" / "*.txt"), workdir) if "train.steps" not in a]
    args += ["--config.train.steps=100000", "--config.train.checkpoint_every=100000",
             "--config.train.eval_every=100000"]
    env = _env(PYTHON=sys.executable, MLM_VS_CLM_CPU_DEVICES=4,
               JAX_COMPILATION_CACHE_DIR=os.path.join(REPO_ROOT, ".cache", "jax"))

    rc, out, err = _preempt(args, env, workdir, lambda launcher: _children(launcher)[-1:], after_records=3)
    assert rc == 0, err[-2000:]
    saved = [int(line.split("saved at step")[1]) for line in out.splitlines() if "preempted:" in line]
    assert len(saved) == 2 and saved[0] == saved[1], out[-2000:]  # both processes, one step
    assert ckpt_lib.Checkpointer(workdir).steps() == [saved[0]]

    rc, out, err = _preempt(args, env, workdir, lambda launcher: [launcher], after_records=3)
    assert rc == 0 and "a process exited" not in err, err[-2000:]
    assert f"resumed from step {saved[0]}" in out
    again = [int(line.split("saved at step")[1]) for line in out.splitlines() if "preempted:" in line]
    assert len(again) == 2 and again[0] == again[1] > saved[0], out[-2000:]
    assert ckpt_lib.Checkpointer(workdir).steps()[-1] == again[0]
