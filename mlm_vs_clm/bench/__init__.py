"""The training-step benchmark: our step against the device's matmul peak and a peer.

  python -m mlm_vs_clm.bench --config=configs/pretrain.py:small --json=bench.json --peer

For each objective (`--objectives=clm,mlm40`): compile time, median step time over `--steps`
steps after `--warmup` steps, tokens/s, analytic model FLOPs per token (mlm_vs_clm/flops.py),
MFU against a jitted matmul peak measured in the same run in the compute dtype, and memory
(the compiled program's temp + argument bytes, host peak RSS). `--peer` times the same model
in Hugging Face transformers (PyTorch `LlamaForCausalLM`, AdamW, causal LM loss) on the same
batch; `--data` times the input pipeline against the rows/s the step consumes.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from mlm_vs_clm import flops, schedules, sharding, train_state
from mlm_vs_clm import model as model_lib
from mlm_vs_clm import step as step_lib
from mlm_vs_clm.bench import peer as bench_peer
from mlm_vs_clm.config import ConfigError, validate
from mlm_vs_clm.data import pipeline

DEFAULT_OBJECTIVES = ("clm", "mlm40")
FIRST_ORDINARY_ID = 5  # ids below are pad/unk/bos/eos/mask in every preset


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0, max_segments: int = 4) -> dict:
    """A packed batch of int32 [B, L] arrays: 1..max_segments segments per row, a short
    padded tail on some rows, positions restarting at 0 in each segment."""
    rs = np.random.RandomState(seed)
    tokens_BxL = rs.randint(FIRST_ORDINARY_ID, vocab_size, (batch_size, seq_len)).astype(np.int32)
    segment_ids_BxL = np.zeros((batch_size, seq_len), np.int32)
    positions_BxL = np.zeros((batch_size, seq_len), np.int32)
    for row in range(batch_size):
        used = seq_len - rs.randint(0, max(1, seq_len // 16))  # a padded tail of < L/16 tokens
        n_seg = rs.randint(1, max_segments + 1)
        cuts = np.sort(rs.choice(np.arange(1, used), size=min(n_seg - 1, used - 1), replace=False))
        for seg, (a, b) in enumerate(zip([0, *cuts], [*cuts, used]), start=1):
            segment_ids_BxL[row, a:b] = seg
            positions_BxL[row, a:b] = np.arange(b - a)
    tokens_BxL[segment_ids_BxL == 0] = 0
    return {"tokens": tokens_BxL, "segment_ids": segment_ids_BxL, "positions": positions_BxL}


def peak_runner(dtype: str):
    """A jitted chain of square matmuls in `dtype`: (run_one, FLOPs per call). On a CPU a 16-bit
    dtype accumulates each product in f32 (and rounds it back for the next), as our step's
    matmuls do there (mlm_vs_clm/kernels/cpu.py): XLA's CPU backend runs a bf16 x bf16 -> bf16 dot
    as an f32 one, far slower. Accelerators chain plain products in `dtype`."""
    on_cpu = jax.default_backend() == "cpu"
    n = 1024 if on_cpu else 8192
    reps = max(1, int((2e10 if on_cpu else 2e13) // (2 * n**3)))
    x_NxN = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    w_NxN = (jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)
    def product(a, w):
        if not on_cpu:
            return a @ w
        return jnp.matmul(a, w, preferred_element_type=jnp.float32).astype(a.dtype)

    chain = jax.jit(lambda x, w: jax.lax.fori_loop(0, reps, lambda _, a: product(a, w), x))
    info = {"n": n, "reps": reps, "dtype": str(jnp.dtype(dtype)), "flops_per_call": 2 * n**3 * reps}
    return (lambda: chain(x_NxN, w_NxN).block_until_ready()), info


_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")


def largest_array_elements(hlo_text: str) -> int:
    """Elements of the largest array in an (optimised) HLO module's text."""
    best = 0
    for _, dims in _SHAPE.findall(hlo_text):
        best = max(best, math.prod(int(d) for d in dims.split(",") if d) if dims else 1)
    return best


def _memory(compiled, logits_elements: int) -> dict:
    mem = compiled.memory_analysis()
    out = {}
    if mem is not None:
        out.update(
            temp_bytes=int(mem.temp_size_in_bytes),
            argument_bytes=int(mem.argument_size_in_bytes),
            output_bytes=int(mem.output_size_in_bytes),
            alias_bytes=int(mem.alias_size_in_bytes),
        )
        out["peak_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    # Per device: the compiled module is the SPMD-partitioned one, logits rows split like the batch.
    largest = largest_array_elements(compiled.as_text())
    out["largest_array_elements"] = largest
    out["full_logits_elements_per_device"] = logits_elements
    out["full_f32_logits_bytes_per_device"] = 4 * logits_elements
    out["materialises_full_logits"] = largest >= logits_elements
    return out


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend offers a cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def interleaved_times(runners: dict, warmup: int, steps: int, faults: dict | None = None,
                      gap_s: float = 0.05, rewarm: int = 0) -> dict:
    """Seconds of each call of each runner, the runners taking turns round by round, so that a
    load change on a shared machine hits all of them alike.

    `gap_s` of idle time before each turn lets the previous runner's spinning worker threads
    (XLA's pool, OpenMP in a peer process) go to sleep instead of taking cores from the next.
    `rewarm` untimed calls open each turn, so that a timed step follows a step of its own
    runner, as in training. If `faults` is a dict, it receives each runner's median minor page
    faults per timed call (this process's, or what a runner that returns an int reports for
    itself)."""
    for _ in range(warmup):
        for run_one in runners.values():
            run_one()
    times = {name: [] for name in runners}
    counts = {name: [] for name in runners}
    for _ in range(steps):
        for name, run_one in runners.items():
            time.sleep(gap_s)
            for _ in range(rewarm):
                run_one()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            reported = run_one()
            times[name].append(time.perf_counter() - t0)
            own = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            counts[name].append(reported if isinstance(reported, int) else own)
    if faults is not None:
        faults.update({name: float(np.median(c)) for name, c in counts.items()})
    return times


def _timing(times: list[float], tokens_per_step: int) -> dict:
    median = float(np.median(times))
    return {
        "step_seconds": median,
        "step_seconds_p25": float(np.percentile(times, 25)),
        "step_seconds_p75": float(np.percentile(times, 75)),
        "steps_timed": len(times),
        "tokens_per_second": tokens_per_step / median,
    }


def ours_runner(setup, objective: schedules.Objective, batch):
    """Compile our train step for one objective: (run_one, static facts about it)."""
    config = setup.config
    B, L = batch["tokens"].shape
    holder = {"state": train_state.init_state(setup, config.seed)}
    t0 = time.perf_counter()
    compiled = step_lib.compiled_train_step(setup, objective).lower(holder["state"], batch).compile()
    info = {"compile_seconds": time.perf_counter() - t0}
    f = flops.train_flops_per_token(
        setup.model.cfg, L, objective.kind, objective.mask_ratio, bool(config.mlm.sparse_head)
    )
    info.update(model_flops_per_token=f.per_token, head_positions_per_row=f.head_positions_per_row)
    xla = _xla_flops(compiled)
    if xla is not None:  # loops (scan over layers / loss chunks) count once: a lower bound
        info["xla_flops_per_token"] = xla * jax.device_count() / (B * L)
    rows_per_device = B // max(1, sharding.data_parallel_size(setup.mesh))
    info["memory"] = _memory(compiled, rows_per_device * L * config.model.vocab_size)

    def run_one():
        holder["state"], metrics = compiled(holder["state"], batch)
        holder["loss"] = metrics["loss"]
        jax.block_until_ready(metrics)

    return run_one, info, holder


def bench_data(config, seconds: float, consumed_rows_per_second: float) -> dict:
    """The input pipeline's rows/s (mlm_vs_clm.data.pipeline) against the rows/s the step eats."""
    tokenizer = pipeline.prepare_tokenizer(config)
    rows = float(pipeline.pipeline_rows_per_second(config, tokenizer, seconds))
    return {"rows_per_second": rows, "step_rows_per_second": consumed_rows_per_second,
            "headroom": rows / consumed_rows_per_second}


def run(config, objective_names=DEFAULT_OBJECTIVES, steps: int = 10, warmup: int = 2, peer: bool = False,
        data: bool = False, data_seconds: float = 10.0, peer_kept: bool = False, rewarm: int = 1) -> dict:
    """The whole benchmark as a JSON-able dict (see the module docstring)."""
    if steps < 1 or warmup < 0 or rewarm < 0:
        raise ValueError(f"bench: need steps >= 1, warmup >= 0 and rewarm >= 0, got steps={steps} warmup={warmup} "
                         f"rewarm={rewarm}")
    objs = [schedules._objective(n, config.mlm.mask_ratio) for n in objective_names]  # validates names
    if len({o.name for o in objs}) != len(objs) or not objs:
        raise ValueError(f"bench: --objectives must name distinct objectives, got {list(objective_names)}")
    mesh = sharding.make_mesh(config.mesh)
    setup = train_state.build(config, mesh)
    B, L = config.train.batch_size, config.train.seq_len
    batch_np = synthetic_batch(B, L, config.model.vocab_size, config.seed)
    batch = jax.device_put(batch_np, step_lib.batch_shardings(mesh))

    runners, infos, holders = {}, {}, {}
    peak_run, peak = peak_runner(config.model.dtype)
    runners["peak"] = peak_run
    for obj in objs:
        runners[obj.name], infos[obj.name], holders[obj.name] = ours_runner(setup, obj, batch)
    with contextlib.ExitStack() as stack:  # peer processes stopped, then their folders removed
        for name, wanted, kept in (("peer", peer, False), ("peer_kept", peer_kept, True)):
            if wanted:
                folder = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"mlm_vs_clm_{name}_"))
                runners[name], infos[name], close = bench_peer.peer_process_runner(config, batch_np, folder, kept)
                stack.callback(close)
        faults = {}
        times = interleaved_times(runners, warmup, steps, faults, rewarm=rewarm)

    # The peak is the device's best: besides its turn in every round, it runs 5 times alone
    # after the rounds (no other runner's threads or memory traffic just before it).
    alone = interleaved_times({"peak": peak_run}, 0, 5)["peak"]
    peak_flops = peak["flops_per_call"] / min(times["peak"] + alone)
    out = {
        "preset": config.get("preset", ""),
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "batch_size": B,
        "seq_len": L,
        "compute_dtype": config.model.dtype,
        "attention_impl": config.model.attention_impl or "default",
        "attention_kernel": model_lib.resolve_attention(setup.model.cfg),
        "remat_policy": config.model.remat_policy,
        "peak_flops_per_second": peak_flops,
        "peak_flops_per_second_median": peak["flops_per_call"] / float(np.median(times["peak"])),
        "peak_matmul": peak,
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    for obj in objs:
        r = {**infos[obj.name], **_timing(times[obj.name], B * L)}
        r["minor_page_faults_per_step"] = faults[obj.name]
        r["model_flops_per_second"] = r["model_flops_per_token"] * r["tokens_per_second"]
        r["mfu"] = r["model_flops_per_second"] / peak_flops
        # The same count with only the (query, key) pairs inside a segment of this batch: the
        # work a kernel that skips the blocks between segments does (model.attention_impl
        # cudnn_packed). The convention above counts whole rows.
        keys = flops.keys_in_segments(batch_np["segment_ids"], obj.kind == "clm")
        r["attention_keys_per_query_in_segments"] = keys
        r["model_flops_per_token_in_segments"] = flops.train_flops_per_token(
            setup.model.cfg, L, obj.kind, obj.mask_ratio, bool(config.mlm.sparse_head), keys_per_query=keys
        ).per_token
        r["mfu_in_segments"] = r["model_flops_per_token_in_segments"] * r["tokens_per_second"] / peak_flops
        r["final_loss"] = float(jax.device_get(holders[obj.name]["loss"]))
        if jax.default_backend() != "cpu":
            stats = jax.devices()[0].memory_stats() or {}
            r["memory"]["device_peak_bytes_in_use"] = int(stats.get("peak_bytes_in_use", 0))
        out[obj.name] = r
    if "clm" in out:
        for obj in objs:
            if obj.kind == "mlm":
                out[obj.name]["step_seconds_over_clm"] = out[obj.name]["step_seconds"] / out["clm"]["step_seconds"]
    for name in ("peer", "peer_kept"):
        if name not in runners:
            continue
        out[name] = {**infos[name], **_timing(times[name], B * L), "minor_page_faults_per_step": faults[name]}
        if "clm" in out:
            out[name]["ours_clm_over_peer"] = out["clm"]["tokens_per_second"] / out[name]["tokens_per_second"]
            # Ours and the peer timed in the same rounds: the ratio of step times round by round.
            per_round = np.asarray(times[name]) / np.asarray(times["clm"])
            out[name]["ours_clm_over_peer_rounds_p25_p75"] = [float(np.percentile(per_round, q)) for q in (25, 75)]
    if data:
        out["data"] = bench_data(config, data_seconds, out[objs[0].name]["tokens_per_second"] / L)
    return out


PEER_ROWS = (("peer", "peer clm (HF torch)"), ("peer_kept", "peer clm (HF torch, host memory kept mapped)"))


def table(result: dict) -> str:
    """A Markdown table of one benchmark result."""
    head = ("| run | compile s | step s (p25-p75) | tokens/s | GFLOP/token | MFU | temp MiB | largest array / logits "
            "| host faults/step |")
    lines = [head, "|" + "---|" * 9]
    mib = lambda b: f"{b / 2**20:.0f}" if b is not None else "-"
    faults = lambda r: f"{r['minor_page_faults_per_step']:,.0f}" if "minor_page_faults_per_step" in r else "-"
    peers = dict(PEER_ROWS)
    for name, r in result.items():
        if not isinstance(r, dict) or "tokens_per_second" not in r or name in peers or name == "data":
            continue
        mem = r.get("memory", {})
        lines.append(
            f"| ours {name} | {r['compile_seconds']:.1f} | {r['step_seconds']:.4f} "
            f"({r['step_seconds_p25']:.4f}-{r['step_seconds_p75']:.4f}) | {r['tokens_per_second']:,.0f} | "
            f"{r['model_flops_per_token'] / 1e9:.4f} | {100 * r['mfu']:.1f} % | "
            f"{mib(mem.get('temp_bytes'))} | "
            f"{mem['largest_array_elements'] / mem['full_logits_elements_per_device']:.2f} | {faults(r)} |"
        )
    fpt = result["clm"]["model_flops_per_token"] if "clm" in result else None
    for name, label in PEER_ROWS:
        if name not in result:
            continue
        p = result[name]
        if p.get("autocast", "float32") != "float32":  # a 16-bit compute dtype: its forward under autocast
            label = f"{label[:-1]}, {p['autocast']} autocast)"
        mfu = f"{100 * fpt * p['tokens_per_second'] / result['peak_flops_per_second']:.1f} %" if fpt else "-"
        gf = f"{fpt / 1e9:.4f}" if fpt else "-"
        lines.append(
            f"| {label} | - | {p['step_seconds']:.4f} ({p['step_seconds_p25']:.4f}-"
            f"{p['step_seconds_p75']:.4f}) | {p['tokens_per_second']:,.0f} | {gf} | {mfu} | - | - | {faults(p)} |"
        )
    peak = result["peak_matmul"]
    notes = [(f"peak {result['peak_flops_per_second'] / 1e9:,.1f} GFLOP/s ({peak['dtype']} {peak['n']}^3 matmul) "
              f"on {result['num_devices']} x {result['device']}")]
    if "host_memory_kept_mapped" in result:
        notes.append("host memory kept mapped: " + ("yes" if result["host_memory_kept_mapped"] else "no"))
    for name, label in PEER_ROWS:
        if name in result and "ours_clm_over_peer" in result[name]:
            lo, hi = result[name]["ours_clm_over_peer_rounds_p25_p75"]
            notes.append(f"ours/{label.replace('peer clm ', 'peer ')} CLM tokens/s = "
                         f"{result[name]['ours_clm_over_peer']:.2f}x (round by round p25-p75 {lo:.2f}-{hi:.2f})")
    in_segments = [f"{name} {100 * r['mfu_in_segments']:.1f} %" for name, r in result.items()
                   if isinstance(r, dict) and "mfu_in_segments" in r]
    if in_segments:
        notes.append(f"attention {result.get('attention_kernel', '?')}; MFU counting attention inside segments only: "
                     + ", ".join(in_segments))
    for name, r in result.items():
        if isinstance(r, dict) and "step_seconds_over_clm" in r:
            notes.append(f"{name} step / clm step = {r['step_seconds_over_clm']:.2f}")
    if "data" in result:
        notes.append(f"pipeline {result['data']['rows_per_second']:,.0f} rows/s vs step "
                     f"{result['data']['step_rows_per_second']:,.0f} rows/s")
    return "\n".join(lines) + "\n\n" + "; ".join(notes)


def check_args(config, json_path: str) -> None:
    """Raise ConfigError for a config the train CLI would refuse or a --json with no folder to
    go in, before anything is built or timed."""
    validate(config, jax.device_count())
    folder = os.path.dirname(os.path.abspath(json_path)) if json_path else ""
    if folder and not os.path.isdir(folder):
        raise ConfigError(f"--json: folder {folder} does not exist")
