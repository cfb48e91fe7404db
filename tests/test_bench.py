"""The benchmark: the JSON contract end to end on `tiny`, the analytic FLOP count, the checks."""

import importlib.util
import json
import mmap
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from mlm_vs_clm import bench, flops, schedules, sharding, train_state
from mlm_vs_clm import step as step_lib
from mlm_vs_clm.config import load_config
from mlm_vs_clm.kernels import host_memory
from mlm_vs_clm.model import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_writes_the_json_contract(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.path.join(REPO, ".cache", "jax"))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mlm_vs_clm.bench", "--config=configs/pretrain.py:tiny", "--steps=2", "--warmup=1",
         "--peer", "--peer_kept", "--data", "--data_seconds=0.5", "--objectives=clm,mlm40",
         "--config.train.batch_size=4", f"--json={out}"],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["peak_flops_per_second"] > 0
    for name in ("clm", "mlm40"):
        r = result[name]
        assert r["steps_timed"] == 2
        for key in ("tokens_per_second", "step_seconds", "mfu", "compile_seconds", "model_flops_per_token"):
            assert r[key] > 0, key
        assert r["tokens_per_second"] == pytest.approx(4 * 128 / r["step_seconds"])
        assert np.isfinite(r["final_loss"])
        assert r["memory"]["temp_bytes"] > 0 and not r["memory"]["materialises_full_logits"]
        # attention counted only inside segments: fewer keys than the whole-row convention
        assert 0 < r["attention_keys_per_query_in_segments"] < (128 if name == "mlm40" else 64.5)
        assert r["mfu_in_segments"] == pytest.approx(
            r["mfu"] * r["model_flops_per_token_in_segments"] / r["model_flops_per_token"])
    assert result["attention_kernel"] == "default" and result["remat_policy"] == "none"
    assert "MFU counting attention inside segments only: clm " in proc.stdout
    assert result["peer"]["tokens_per_second"] > 0
    assert result["peer"]["ours_clm_over_peer"] == pytest.approx(
        result["clm"]["tokens_per_second"] / result["peer"]["tokens_per_second"])
    assert "| ours clm |" in proc.stdout and "| peer clm (HF torch) |" in proc.stdout
    # Both peers run in processes of their own, timed in the same rounds as ours; `peer` keeps
    # glibc's defaults (as its users run it), `peer_kept` takes our host memory settings.
    assert result["peer"]["host_memory_kept_mapped"] is False
    assert result["peer_kept"]["host_memory_kept_mapped"] is True
    assert result["peer_kept"]["steps_timed"] == 2
    assert result["peer_kept"]["ours_clm_over_peer"] == pytest.approx(
        result["clm"]["tokens_per_second"] / result["peer_kept"]["tokens_per_second"])
    assert "| peer clm (HF torch, host memory kept mapped) |" in proc.stdout
    assert result["host_memory_kept_mapped"] is True
    for name in ("clm", "mlm40", "peer", "peer_kept"):
        assert result[name]["minor_page_faults_per_step"] >= 0
    # --data: the input pipeline's rows/s against what the first objective's step consumes
    d = result["data"]
    assert d["rows_per_second"] > 0
    assert d["step_rows_per_second"] == pytest.approx(result["clm"]["tokens_per_second"] / 128)
    assert d["headroom"] == pytest.approx(d["rows_per_second"] / d["step_rows_per_second"])
    assert "rows/s vs step" in proc.stdout


def test_flops_match_a_hand_count():
    cfg = ModelConfig.from_config(load_config("configs/pretrain.py:tiny").model)
    # tiny: 2 layers, D=64, 4 heads (H=16), 2 kv heads, F=192, V=4096; L=128.
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.ffn_size, cfg.vocab_size) == (
        2, 64, 4, 2, 192, 4096)
    q, k, v, o = 2 * 64 * 64, 2 * 64 * 32, 2 * 64 * 32, 2 * 64 * 64
    mlp = 3 * 2 * 64 * 192
    head = 2 * 64 * 4096
    causal_attn = 2 * 2 * 64 * 64.5  # QK^T and AV, 4 heads x 16 dims, (128+1)/2 keys
    clm = flops.train_flops_per_token(cfg, 128, "clm")
    assert clm.per_token == 3 * (2 * (q + k + v + o + mlp + causal_attn) + head)
    bidir_attn = 2 * 2 * 64 * 128
    mlm = flops.train_flops_per_token(cfg, 128, "mlm", 0.4, sparse_head=True)
    assert mlm.head_positions_per_row == 52  # ceil(0.4 * 128)
    assert mlm.per_token == pytest.approx(3 * (2 * (q + k + v + o + mlp + bidir_attn) + head * 52 / 128))
    dense = flops.train_flops_per_token(cfg, 128, "mlm", 0.4, sparse_head=False)
    assert dense.per_token == pytest.approx(3 * (2 * (q + k + v + o + mlp + bidir_attn) + head))
    with pytest.raises(ValueError, match="objective kind"):
        flops.train_flops_per_token(cfg, 128, "mlx")


def test_xla_cost_analysis_is_close_to_the_analytic_count():
    # No loops (unrolled layers, one loss chunk): XLA counts every op once. It also counts the
    # full L x L attention, the softmax and the elementwise work, so it lies a little above the
    # model FLOPs (measured 1.09x; the loss's custom VJP recomputes no head matmul).
    config = load_config("configs/pretrain.py:tiny,clm", {"model.scan_layers": False, "loss_chunk_size": 128,
                                                         "train.batch_size": 4})
    setup = train_state.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    batch = bench.synthetic_batch(4, 128, config.model.vocab_size)
    compiled = step_lib.compiled_train_step(setup, schedules.Objective("clm")).lower(
        setup.abstract_state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_per_token = cost["flops"] / (4 * 128)
    analytic = flops.train_flops_per_token(setup.model.cfg, 128, "clm").per_token
    assert 1.0 < xla_per_token / analytic < 1.6, (xla_per_token, analytic)


def test_synthetic_batch_is_packed():
    b = bench.synthetic_batch(8, 64, 100, seed=3)
    tokens, seg, pos = b["tokens"], b["segment_ids"], b["positions"]
    assert tokens.shape == seg.shape == pos.shape == (8, 64) and tokens.dtype == np.int32
    assert np.all((tokens == 0) == (seg == 0))
    assert np.all(tokens[seg > 0] >= bench.FIRST_ORDINARY_ID) and tokens.max() < 100
    assert seg.max() > 1  # some rows hold several segments
    for row in range(8):
        for s in set(seg[row]) - {0}:
            np.testing.assert_array_equal(pos[row][seg[row] == s], np.arange(np.sum(seg[row] == s)))


def test_largest_array_in_hlo_text():
    text = "ROOT %x = f32[32,128,32000]{2,1,0} dot(bf16[32,128,256] %a, f32[256,32000] %w) s32[] pred[4,4]"
    assert bench.largest_array_elements(text) == 32 * 128 * 32000


def test_bad_objectives_are_rejected():
    config = load_config("configs/pretrain.py:tiny")
    with pytest.raises(ValueError, match="unknown objective"):
        bench.run(config, ["clm", "mlmx"], steps=1)
    with pytest.raises(ValueError, match="steps >= 1, warmup >= 0 and rewarm >= 0"):
        bench.run(config, ["clm"], steps=0)


def test_keep_mapped_stops_page_faults_on_reuse():
    # A 256 MiB buffer freed and allocated again: by default glibc unmaps it and the second one
    # faults every page in again; with the setting the pages stay mapped.
    script = (
        "import ctypes, resource, sys\n"
        "from mlm_vs_clm import bench\nfrom mlm_vs_clm.kernels import host_memory\n"
        "if sys.argv[1] == 'on': assert host_memory.keep_mapped(respect_env=False)\n"
        "if sys.argv[1] == 'env': assert host_memory.keep_mapped()\n"
        "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p\n"
        "def touch(n):\n"
        "    p = libc.malloc(ctypes.c_size_t(n)); ctypes.memset(p, 1, n); return p\n"
        "libc.free(ctypes.c_void_p(touch(256 << 20)))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "touch(256 << 20)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = {}
    for mode in ("off", "on", "env"):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.pop("MLM_VS_CLM_HOST_MEMORY", None)
        proc = subprocess.run([sys.executable, "-c", script, mode], cwd=REPO, capture_output=True, text=True,
                              timeout=120, check=False, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        faults[mode] = int(proc.stdout.split()[-1])
    # 256 MiB = 65,536 pages; `env` is what the train and finetune CLIs call
    assert faults["off"] > 30_000 and faults["on"] < 1_000 and faults["env"] < 1_000, faults


def test_host_memory_setting_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLM_VS_CLM_HOST_MEMORY", "default")
    assert host_memory.keep_mapped() is False  # glibc's defaults kept, nothing called
    monkeypatch.setenv("MLM_VS_CLM_HOST_MEMORY", "auto")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert host_memory.keep_mapped() is False  # temporaries live on the device: nothing called
    monkeypatch.setenv("MLM_VS_CLM_HOST_MEMORY", "sometimes")
    with pytest.raises(ValueError, match="MLM_VS_CLM_HOST_MEMORY='sometimes'"):
        host_memory.keep_mapped()


def test_cpu_only_reads_jax_platforms_then_installed_plugins(monkeypatch, tmp_path):
    for platforms, expected in (("cpu", True), ("cuda", False), ("cpu,cuda", True), ("tpu,cpu", False)):
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert host_memory.cpu_only() is expected, platforms
    monkeypatch.delenv("JAX_PLATFORMS")
    # an installed accelerator plugin (a `jax_plugins` namespace package) means not CPU-only
    (tmp_path / "jax_plugins" / "xla_cuda12").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_cuda12" / "__init__.py").write_text("")
    if "jax_plugins" in sys.modules or importlib.util.find_spec("jax_plugins") is not None:
        pytest.skip("a real accelerator plugin is installed here")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert host_memory.cpu_only() is False
    finally:  # no later JAX start in this process may find the fake plugin
        sys.modules.pop("jax_plugins", None)


@pytest.mark.parametrize("command,prefix", [
    (["mlm_vs_clm.train", "--config=configs/pretrain.py:tiny"], "error: "),
    (["mlm_vs_clm.finetune", "--config=configs/finetune.py:news_quick"], "finetune: "),
    (["mlm_vs_clm.bench", "--config=configs/pretrain.py:tiny", "--steps=1"], "error: "),
])
def test_clis_reject_a_bad_host_memory_setting(tmp_path, command, prefix):
    env = dict(os.environ, JAX_PLATFORMS="cpu", MLM_VS_CLM_HOST_MEMORY="sometimes")
    args = command if command[0] == "mlm_vs_clm.bench" else [*command, f"--workdir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{prefix}MLM_VS_CLM_HOST_MEMORY='sometimes'")
    assert not (tmp_path / "run").exists()  # nothing written


def test_bench_bad_arguments_are_one_line_errors():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "mlm_vs_clm.bench", "--config=configs/pretrain.py:tiny",
                           "--rewarm=-1"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                          env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: bench: need steps >= 1")


@pytest.mark.parametrize("args, expected", [
    (["--config.train.batch_size=0"], "error: train.batch_size: must be positive, got 0"),
    (["--config.model.num_kv_heads=3"], "error: model.num_kv_heads: 3 kv heads do not divide num_heads"),
    (["--json={missing}/bench.json"], "error: --json: folder {missing} does not exist"),
])
def test_bench_checks_its_config_and_json_folder_before_running(tmp_path, args, expected):
    missing = str(tmp_path / "missing")
    args = [a.format(missing=missing) for a in args]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "mlm_vs_clm.bench", "--config=configs/pretrain.py:tiny", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(expected.format(missing=missing))
    assert "Traceback" not in proc.stderr and "| ours" not in proc.stdout  # nothing was timed


def test_interleaved_times_take_turns_and_rewarm():
    calls = []

    def runner(name, reported=None):
        def run_one():
            calls.append(name)
            if reported is None:  # fault 16 MiB of fresh pages in this process: 4,096 faults
                buf = mmap.mmap(-1, 16 << 20)
                buf.write(b"x" * (16 << 20))
                buf.close()
            return reported
        return run_one

    faults = {}
    times = bench.interleaved_times({"a": runner("a"), "b": runner("b", 7), "c": runner("c", np.ones(3))},
                                    warmup=1, steps=2, faults=faults, gap_s=0.0, rewarm=1)
    # warm-up once each, then per round each runner twice in a row (one untimed, one timed)
    assert calls == ["a", "b", "c"] + ["a", "a", "b", "b", "c", "c"] * 2
    assert len(times["a"]) == len(times["b"]) == 2
    assert faults["b"] == 7  # an int a runner reports for itself (a peer's child process)
    assert faults["a"] >= 4096  # this process's own count
    assert faults["c"] < 4096  # a non-int return value (the peak's array) is not a count


def test_perf_scripts_compile_and_document_their_command():
    # tools/perf/ holds the experiments behind figures in docs/performance.md: each must at least
    # compile and say how it is run (the full runs take minutes; they are not repeated here).
    folder = os.path.join(REPO, "tools", "perf")
    scripts = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    assert scripts == ["cpu_ops_ab.py", "gpu_attention.py", "loss_ab.py", "matmul_rates.py", "parts.py",
                       "profile_step.py", "step_ab.py", "step_bound.py"]
    docs = pathlib.Path(REPO, "docs", "performance.md").read_text()
    for name in scripts:
        source = pathlib.Path(folder, name).read_text()
        compile(source, name, "exec")
        assert f"python tools/perf/{name}" in source and f"tools/perf/{name}" in docs, name
        assert 'if __name__ == "__main__":' in source, name


def test_peer_and_peak_follow_a_16_bit_compute_dtype():
    # With model.dtype bfloat16 the peer's forward runs under torch.autocast (f32 weights, bf16
    # compute, as ours) and the peak chain accumulates each bf16 product in f32, as our step does.
    import ml_collections

    from mlm_vs_clm.bench import peer as bench_peer

    torch = pytest.importorskip("torch")  # the hf extra
    pytest.importorskip("transformers")

    c = load_config("configs/pretrain.py:tiny")
    c.model.dtype = "bfloat16"
    peer_cfg = bench_peer._peer_config(c)
    assert peer_cfg["model"]["dtype"] == "bfloat16"
    run_one, info = bench_peer.peer_runner(ml_collections.ConfigDict(peer_cfg), bench.synthetic_batch(2, 16, 4096))
    assert info["autocast"] == "bfloat16"
    seen = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: seen.add(out.dtype) if isinstance(mod, torch.nn.Linear) else None)
    try:
        run_one()
    finally:
        hook.remove()
    assert seen == {torch.bfloat16}

    run_peak, peak = bench.peak_runner("bfloat16")
    assert peak["dtype"] == "bfloat16" and run_peak().dtype == jax.numpy.bfloat16

    timing = {"step_seconds": 2.0, "step_seconds_p25": 2.0, "step_seconds_p75": 2.0, "tokens_per_second": 1.0}
    result = {"peak_matmul": peak, "peak_flops_per_second": 1e9, "num_devices": 1, "device": "cpu",
              "peer_kept": {**timing, "autocast": "bfloat16"}}
    assert "| peer clm (HF torch, host memory kept mapped, bfloat16 autocast) |" in bench.table(result)


def _dot_operand_types(hlo_text: str) -> list:
    """(lhs type, rhs type) of every dot in an optimised HLO module's text, e.g. 'bf16[64,2048]'."""
    import re

    types = dict(re.findall(r"(%[\w.\-]+) = (\w+\[[\d,]*\])", hlo_text))
    return [(types[a], types[b]) for a, b in re.findall(r"\} dot\((%[\w.\-]+), (%[\w.\-]+)\)", hlo_text)]


def test_bf16_step_on_cpu_runs_every_matmul_in_bf16():
    # XLA's CPU backend sends a bf16 dot with a bf16 result or a transposed operand to its f32
    # path (3-4x slower); mlm_vs_clm/kernels/cpu.py and the loss avoid both, forward and backward.
    c = load_config("configs/pretrain.py:tiny,clm")
    c.model.dtype = "bfloat16"
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])  # one CPU device, as the benchmark runs
    setup = train_state.build(c, mesh)
    batch = jax.device_put(bench.synthetic_batch(4, 128, c.model.vocab_size), step_lib.batch_shardings(mesh))
    state = train_state.init_state(setup, c.seed)
    hlo = step_lib.compiled_train_step(setup, schedules._objective("clm", 0.4)).lower(state, batch).compile().as_text()
    dots = _dot_operand_types(hlo)
    # per layer 7 projections x 3 (forward, d x, d kernel) and the attention core's 6 products,
    # and the head's 3 (tiny scans its layers: one layer's dots appear once)
    assert len([t for t in dots if t[0].count(",") == 1]) >= 7 * 3 + 3
    assert len([t for t in dots if t[0].count(",") == 3]) >= 6
    assert all(a.startswith("bf16[") and b.startswith("bf16[") for a, b in dots), dots


def test_gpu_attention_script_flow_on_a_cpu(tmp_path):
    # The GPU figures come from tools/perf/gpu_attention.py; here its flow runs on the tiny preset
    # (XLA attention, both embedding-gradient variants, a profile): a JSON per variant and a table.
    script = os.path.join(REPO, "tools", "perf", "gpu_attention.py")
    out = subprocess.run(
        [sys.executable, script, "--preset=tiny", "--batch=8", "--variants=xla:none,xla:none+bf16_embed_grad",
         "--skip_check", "--steps=1", "--warmup=0", "--profile=mlm40", f"--out={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "hlo_mlm40.txt.gz", "summary.md", "xla_none.json", "xla_none_bf16_embed_grad.json"]
    rows = [ln for ln in (tmp_path / "summary.md").read_text().splitlines() if ln.startswith("| xla:none")]
    assert len(rows) == 4
    r = json.loads((tmp_path / "xla_none.json").read_text())
    assert r["attention_kernel"] == "xla" and 0 < r["mlm40"]["mfu_in_segments"] <= r["mlm40"]["mfu"]


def test_keys_in_segments_counts_pairs_inside_each_segment():
    from mlm_vs_clm import flops

    seg = np.array([[1, 1, 2, 2, 2, 0]])
    assert flops.keys_in_segments(seg, causal=False) == pytest.approx((4 + 9) / 6)
    assert flops.keys_in_segments(seg, causal=True) == pytest.approx((3 + 6) / 6)
    one = np.ones((2, 8), np.int32)  # one segment per row: the convention's counts
    assert flops.keys_in_segments(one, causal=False) == 8 and flops.keys_in_segments(one, causal=True) == 4.5


def _perf_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", "perf", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step_bound_reads_every_product_of_the_step(dtype):
    # tools/perf/step_bound.py times the step's products alone; the products it reads out of the
    # optimised HLO, each counted once per trip of the loops around it (layers scanned, loss
    # chunks), must add up to the model's analytic FLOPs (bf16 adds RoPE's small rotation
    # products, mlm_vs_clm/kernels/cpu.py).
    step_bound = _perf_tool("step_bound")
    c = load_config("configs/pretrain.py:tiny")
    c.model.dtype = dtype
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])  # one CPU device, as the tool runs
    setup = train_state.build(c, mesh)
    B, L = 4, 64
    batch = jax.device_put(bench.synthetic_batch(B, L, c.model.vocab_size), step_lib.batch_shardings(mesh))
    for name, chunks in (("clm", 2), ("mlm40", 1)):  # loss chunks of 32: 64 positions, 26 masked
        obj = schedules._objective(name, 0.4)
        state = train_state.init_state(setup, c.seed)
        hlo = step_lib.compiled_train_step(setup, obj).lower(state, batch).compile().as_text()
        products = step_bound.step_products(hlo)
        model = flops.train_flops_per_token(setup.model.cfg, L, obj.kind, obj.mask_ratio, True).per_token * B * L
        ratio = sum(p["flops"] * p["count"] for p in products) / model
        assert 1.0 <= ratio < 1.04, (name, ratio)
        assert not any(p["unknown_trip_count"] for p in products)
        head = [p for p in products if p["out"][1] == (B * 32 if name == "clm" else B * 26, c.model.vocab_size)]
        assert head and {p["count"] for p in head} == {chunks}, head
        assert c.model.num_layers in {p["count"] for p in products}  # the scanned layers' products

    product = products[0]
    result = step_bound.product_runner(product)()
    assert result.shape == product["out"][1] and str(result.dtype) == {"f32": "float32", "bf16": "bfloat16"}[
        product["out"][0]]


def test_step_ab_imports_an_older_revision_next_to_the_working_tree():
    # tools/perf/step_ab.py runs a git revision's package in the same process as ours.
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    step_ab = _perf_tool("step_ab")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        old = step_ab.import_revision("HEAD")
    finally:
        os.chdir(cwd)
    import mlm_vs_clm

    assert old.__name__ == step_ab.OLD and old.__file__ != mlm_vs_clm.__file__
    old_config = importlib.import_module(f"{step_ab.OLD}.config")
    assert old_config.__name__ == f"{step_ab.OLD}.config"  # its imports point at the old package
    assert dict(old_config.load_config(os.path.join(REPO, "configs/pretrain.py:tiny")).model) == dict(
        load_config("configs/pretrain.py:tiny").model)
