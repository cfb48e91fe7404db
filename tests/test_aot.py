"""The ahead-of-time memory check compiles the 210m train step on virtual devices."""

import importlib.machinery
import json
import os
import subprocess
import sys

import pytest

from mlm_vs_clm import aot, sharding
from mlm_vs_clm.config import ConfigError, load_config
from mlm_vs_clm.kernels import attention, platform

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 210m at a reduced batch and sequence so that compiling stays within seconds on a CPU.
SMALL = {"train.batch_size": 8, "train.seq_len": 64}


def _report(mesh):
    config = load_config("configs/pretrain.py:210m", SMALL)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    (report,) = aot.check(config, "mlm40")
    return report


def test_210m_memory_is_reported_and_shrinks_with_more_fsdp():
    fsdp8, fsdp2 = _report((1, 8, 1)), _report((4, 2, 1))
    for r in (fsdp8, fsdp2):
        assert min(r.argument_bytes, r.output_bytes, r.temp_bytes) > 0 and r.code_bytes >= 0  # CPU: code 0
        assert r.total_bytes > r.argument_bytes
    # The fp32 params + two Adam moments of 210m (~162M values with its 32,000-row embedding and
    # head) sharded 8 ways: ~0.24 GB per device of arguments, ~4x that when sharded 2 ways.
    assert 0.18e9 < fsdp8.argument_bytes < 0.35e9
    assert fsdp2.argument_bytes > 3.5 * fsdp8.argument_bytes
    assert fsdp8.total_bytes < fsdp2.total_bytes
    assert (fsdp8.rows_per_device, fsdp2.rows_per_device) == (1, 1)


def test_batch_that_does_not_split_over_the_mesh_is_rejected():
    config = load_config("configs/pretrain.py:210m", {"train.batch_size": 12, "train.seq_len": 64})
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 8, 1
    with pytest.raises(ValueError, match="not divisible by data-parallel size 8"):
        aot.check(config, "clm")


@pytest.mark.parametrize("overrides,mesh,message", [
    # the reviewer's 1b-on-128-chips case in small: hidden_size is sharded over fsdp
    ({"model.hidden_size": 36, "model.num_heads": 2, "model.num_kv_heads": 2}, (1, 8, 1),
     "model.hidden_size: 36 is not divisible by mesh.fsdp=8"),
    ({"model.vocab_size": 255}, (4, 1, 2), "model.vocab_size: 255 is not divisible by mesh.tensor=2"),
    ({"model.ffn_size": 191}, (2, 2, 2), "model.ffn_size: 191 is not divisible by mesh.tensor=2"),
])
def test_a_parameter_that_does_not_split_over_the_mesh_is_a_config_error(overrides, mesh, message):
    config = load_config("configs/pretrain.py:tiny", {"train.batch_size": 8, "train.seq_len": 16, **overrides})
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    with pytest.raises(ConfigError, match=message):
        aot.check(config, "clm")


def test_cli_reports_the_verdict_and_exits_non_zero_when_it_does_not_fit(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [
        sys.executable, "-m", "mlm_vs_clm.aot", "--config=configs/pretrain.py:tiny", "--mesh=1x4x1",
        "--objective=clm", "--device_memory_gib=0.001", f"--json={tmp_path / 'r.json'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "clm: " in proc.stdout and "DOES NOT FIT" in proc.stdout
    (row,) = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert row["mesh"] == [1, 4, 1] and row["total_bytes"] > 0

    bad = subprocess.run(cmd[:4] + ["--mesh=1x4"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False,
                         timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("aot: --mesh='1x4'")


def test_largest_micro_batch_is_the_last_that_fits_next_to_one_that_does_not():
    """The search compiles until a fitting micro-batch sits next to one that does not fit, with
    the config's gradient accumulation (2 here); the budget is set between the compiled totals of
    micro-batches of 3 and 4 rows, so the answer is 3."""
    import jax

    def config(rows):
        return load_config("configs/pretrain.py:tiny", {"train.batch_size": 2 * rows, "train.seq_len": 64,
                                                        "train.grad_accum_steps": 2})

    devices = jax.devices()[:1]
    at = {}
    for rows in (3, 4):
        (at[rows],) = aot.check(config(rows), "mlm40", devices)
    budget = (at[3].total_bytes + at[4].total_bytes) / 2 / aot.GIB
    best, tried = aot.largest_micro_batch(config(1), "mlm40", devices, budget, max_compiles=8)
    assert best == 3, {r: t.total_bytes for r, t in tried.items()}
    assert tried[3].fits(budget) and not tried[4].fits(budget)
    assert tried[3].total_bytes == at[3].total_bytes
    assert all(t.rows_per_device == 2 * r for r, t in tried.items())  # rows per optimizer step: 2 micro-batches


def test_mesh_layouts():
    meshes = sharding
    assert meshes.layout_shape("h100x8", 64) == (8, 8, 1)
    assert meshes.layout_shape("tpu_v5p", 128) == (1, 128, 1)
    assert meshes.layout_shape("tpu_v5p", 256, devices_per_node=128) == (2, 128, 1)
    assert meshes.layout_shape("fsdp", 16) == (1, 16, 1) and meshes.layout_shape("data", 16) == (16, 1, 1)
    config = meshes.apply_mesh_layout(load_config("configs/pretrain.py:1b"), "h100x8", 192)
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (24, 8, 1)  # 2304 / 192 = 12 rows each
    with pytest.raises(ValueError, match="not a whole number of nodes"):
        meshes.layout_shape("h100x8", 12)
    with pytest.raises(ValueError, match="not divisible by data-parallel size 512"):
        meshes.apply_mesh_layout(load_config("configs/pretrain.py:1b"), "tpu_v4", 512)


def test_cli_checks_the_mesh_layout_of_the_config(tmp_path):
    """Without --mesh/--layout the check applies config.mesh.layout as the train command does."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "mlm_vs_clm.aot", "--config=configs/pretrain.py:tiny", "--config.mesh.layout=fsdp",
           "--objective=clm"]
    proc = subprocess.run(cmd + ["--devices=4", f"--json={tmp_path / 'r.json'}"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert row["mesh"] == [1, 4, 1]  # tiny's own sizes would give 4x1x1
    bad = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == "aot: mesh.layout='fsdp' needs --devices"


# --- compiling for TPU chips (needs libtpu, not a TPU) --------------------------------------
# libtpu is the optional extra `tpu` (setup.py); a folder holding it (pip install --target DIR
# 'libtpu==0.0.42.*') may also be named with MLM_VS_CLM_LIBTPU_DIR.
LIBTPU_DIR = os.environ.get("MLM_VS_CLM_LIBTPU_DIR", "")


def _libtpu_available() -> bool:
    paths = [LIBTPU_DIR] + sys.path if LIBTPU_DIR else sys.path
    return importlib.machinery.PathFinder.find_spec("libtpu", paths) is not None


def _tpu_env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, LIBTPU_DIR, env.get("PYTHONPATH", "")) if p)
    env["TPU_SKIP_MDS_QUERY"] = "1"  # no TPU metadata server here
    return env


@pytest.mark.skipif(not _libtpu_available(), reason="libtpu is not installed (pip install -e '.[tpu]', or set "
                    "MLM_VS_CLM_LIBTPU_DIR to a folder holding it)")
def test_tiny_compiles_for_a_tpu_topology_and_is_refused_when_it_does_not_fit(tmp_path):
    """tiny (rows of 128: splash attention) for 4 v5p chips: TPU memory and FLOPs; with a
    0.001 GiB chip the command refuses in one line and exits 1."""
    cmd = [sys.executable, "-m", "mlm_vs_clm.aot", "--config=configs/pretrain.py:tiny", "--config.train.seq_len=128",
           "--platform=tpu", "--topology=v5p:2x2x1", "--mesh=1x4x1", "--objective=clm", "--device_memory_gib=0.001",
           f"--json={tmp_path / 'r.json'}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_tpu_env(), capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "DOES NOT FIT" in proc.stdout and "model FLOPs per step" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("aot: tiny does not fit in 0.001 GiB per TPU v5 device")
    out = json.loads((tmp_path / "r.json").read_text())
    (row,) = out["reports"]
    assert out["device_kind"] == "TPU v5" and out["devices"] == 4 and row["mesh"] == [1, 4, 1]
    assert row["temp_bytes"] > 0 and row["code_bytes"] > 0  # TPU's compiler reports its code, the CPU's does not
    assert row["model_flops"] > 0


@pytest.mark.skipif(not _libtpu_available(), reason="libtpu is not installed (pip install -e '.[tpu]', or set "
                    "MLM_VS_CLM_LIBTPU_DIR to a folder holding it)")
def test_a_program_the_tpu_compiler_refuses_is_a_verdict_not_a_traceback():
    """4,096 rows of 128 per v5e chip need more HBM than the chip has: XLA's TPU compiler stops
    with RESOURCE_EXHAUSTED; the command reports it as not fitting, in lines, and exits 1."""
    cmd = [sys.executable, "-m", "mlm_vs_clm.aot", "--config=configs/pretrain.py:tiny", "--config.train.seq_len=128",
           "--platform=tpu", "--topology=v5e:2x2", "--mesh=1x4x1", "--objective=clm",
           "--config.train.batch_size=16384"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_tpu_env(), capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "refused by the compiler: Ran out of memory on HBM" in proc.stdout
    assert "clm: DOES NOT FIT: the compiler refused it" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("aot: tiny does not fit in 14.9 GiB per TPU v5 lite device")


@pytest.mark.skipif(importlib.machinery.PathFinder.find_spec("libtpu", sys.path) is not None,
                    reason="libtpu is installed in this environment: the missing-libtpu message cannot show")
def test_tpu_topology_without_libtpu_says_how_to_install_it():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "mlm_vs_clm.aot", "--config=configs/pretrain.py:tiny", "--platform=tpu",
           "--topology=v5p:2x2x1"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == aot.LIBTPU_MISSING


def test_splash_is_the_default_attention_when_tracing_for_tpu():
    with platform.target("tpu"):
        assert attention.resolve("", "bfloat16") == "splash" and attention.resolve("xla", "bfloat16") == "xla"
    assert attention.resolve("", "float32") == "default"  # on this CPU
