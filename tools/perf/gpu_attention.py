"""One GPU check of issue 8's GPU target: cuDNN's packed layout against the dense segment mask.

  python tools/perf/gpu_attention.py --out=DIR              # on one NVIDIA GPU (Hopper or newer)
  python tools/perf/gpu_attention.py --preset=tiny --variants=xla:none --skip_check   # the flow, on a CPU

1. Checks `gpu_ops.attention` (packed path, and the dense fallback of a batch over the segment
   bound) against XLA's attention in f32 with the dense mask: output and q/k/v gradients,
   causal and bidirectional, grouped queries, padded rows.
2. Benchmarks the preset (default `210m`, sequence 2,048, bf16) for each variant
   `IMPL:REMAT[:BATCH][+bf16_embed_grad|+f32_embed_grad]` through `mlm_vs_clm.bench.run` (CLM
   and MLM-40; a suffix sets `model.embed_grad_f32`: autodiff's 16-bit scatter-add, or f32 sums
   also on a CPU), writing each result to
   DIR/VARIANT.json as soon as it is done and a table at the end. Variants start only while
   `--budget_s` seconds have not passed, so a lease-limited run returns what it finished.
3. `--profile=clm,mlm40`: traces 3 steps of each objective (preset defaults, `--batch`) with
   `jax.profiler` and prints the GPU time per kernel (summed over launches and steps, / 3);
   writes each step's optimised HLO to DIR/hlo_OBJECTIVE.txt.gz, to map op
   names to shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

DEFAULT_VARIANTS = "auto:dots_no_batch,auto:dots_no_batch+bf16_embed_grad,cudnn:dots_no_batch,auto:dots_no_batch:64"


def check_attention() -> list[str]:
    """Relative errors of the packed attention (and its fallback) against f32 XLA attention."""
    import jax
    import jax.numpy as jnp

    from mlm_vs_clm import bench, model
    from mlm_vs_clm.kernels import gpu as gpu_ops

    B, L, N, K, H = 4, 512, 4, 2, 64
    seg = jnp.asarray(bench.synthetic_batch(B, L, 100, seed=3)["segment_ids"])
    mask = model.attention_mask(seg)
    valid = (seg > 0)[:, :, None, None]
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (B, L, N, H), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, L, K, H), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, L, K, H), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(keys[3], (B, L, N, H), jnp.float32) * valid  # padding rows carry no loss
    rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
    lines = []
    for causal in (False, True):
        def ref_loss(q, k, v, causal=causal):
            o = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                             mask=mask, is_causal=causal, implementation="xla")
            return jnp.sum(o * w), o * valid

        ref = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        for max_segments in (32, 2):
            packed = gpu_ops.packed_segments(seg, max_segments)

            def loss(q, k, v, packed=packed, causal=causal):
                o = gpu_ops.attention(q, k, v, mask, packed, causal)
                return jnp.sum(o.astype(jnp.float32) * w), o

            (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
            (_, o_ref), grads_ref = ref
            errs = [rel(o * valid, o_ref)] + [rel(g, gr) for g, gr in zip(grads, grads_ref)]
            finite = all(bool(jnp.all(jnp.isfinite(t))) for t in (o, *grads))
            pad = float(jnp.max(jnp.abs(jnp.where(valid, 0, o))))
            # bf16 inputs against an f32 reference: errors of a few 1e-3 are rounding.
            ok = finite and pad == 0.0 and max(errs) < 2e-2
            lines.append(f"check causal={causal} max_segments={max_segments} packed={bool(packed.fits)}: rel err "
                         f"o {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e} finite={finite} "
                         f"pad o max {pad:.1e}: {'ok' if ok else 'FAIL'}")
            print(lines[-1], flush=True)
    return lines


def profile(config, objective_name: str, out: str, top: int = 15) -> list[str]:
    """GPU milliseconds per step by kernel (summed over its launches), from a trace of 3 steps."""
    import collections
    import glob
    import gzip
    import re
    import tempfile

    import jax

    from mlm_vs_clm import bench, schedules, sharding, train_state
    from mlm_vs_clm import step as step_lib

    mesh = sharding.make_mesh(config.mesh)
    setup = train_state.build(config, mesh)
    B, L = config.train.batch_size, config.train.seq_len
    batch = jax.device_put(bench.synthetic_batch(B, L, config.model.vocab_size), step_lib.batch_shardings(mesh))
    state = train_state.init_state(setup, config.seed)
    objective = schedules._objective(objective_name, config.mlm.mask_ratio)
    compiled = step_lib.compiled_train_step(setup, objective).lower(state, batch).compile()
    with gzip.open(os.path.join(out, f"hlo_{objective_name}.txt.gz"), "wt") as fh:
        fh.write(compiled.as_text())
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    folder = tempfile.mkdtemp(prefix="mlm_vs_clm_gpu_profile_")
    jax.profiler.start_trace(folder)
    t0 = time.perf_counter()
    for _ in range(3):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    wall = (time.perf_counter() - t0) / 3
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True))[-1]
    # Kernels, from the GPU plane's stream lines (the traces of jax 0.11.2 carry no "XLA Ops" line).
    total, count = collections.Counter(), collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "Stream" not in line.name:
                continue
            for event in line.events:
                name = re.sub(r"\.\d+$", "", event.name)[:110]
                total[name] += event.duration_ns
                count[name] += 1
    lines = [f"profile {objective_name}: {wall * 1e3:.1f} ms/step wall (traced); kernel time "
             f"{sum(total.values()) / 3e6:.1f} ms/step"]
    for name, ns in total.most_common(top):
        lines.append(f"  kernel {ns / 3e6:7.2f} ms  x{count[name] // 3:4d}  {name}")
    print("\n".join(lines), flush=True)
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="Folder for VARIANT.json files and summary.md.")
    parser.add_argument("--preset", default="210m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="", help="Compute dtype (default: the preset's).")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="Comma-separated IMPL:REMAT[:BATCH].")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget_s", type=float, default=360.0, help="Start no variant after this many seconds.")
    parser.add_argument("--skip_check", action="store_true")
    parser.add_argument("--profile", default="", help="Comma-separated objectives to profile (after the variants).")
    args = parser.parse_args()

    import inspect

    import jax

    from configs import pretrain
    from mlm_vs_clm import bench

    t_start = time.perf_counter()
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        print("cudnn attention:", inspect.signature(cudnn.dot_product_attention), flush=True)
    except Exception as e:  # noqa: BLE001 - a report, not a failure
        print(f"cudnn attention module: {type(e).__name__}: {e}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    lines = [] if args.skip_check else check_attention()
    rows = []
    for variant in [v for v in args.variants.split(",") if v]:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"skipped {variant}: budget of {args.budget_s:.0f} s spent", flush=True)
            continue
        spec, _, flag = variant.partition("+")
        if flag not in ("", "bf16_embed_grad", "f32_embed_grad"):
            raise SystemExit(f"unknown variant flag {flag!r} in {variant!r}")
        impl, remat, *rest = spec.split(":")
        config = pretrain.get_config(args.preset)
        config.model.attention_impl = "" if impl == "auto" else impl
        config.model.remat_policy = remat
        config.model.embed_grad_f32 = {"": "auto", "bf16_embed_grad": "off", "f32_embed_grad": "on"}[flag]
        config.model.dtype = args.dtype or config.model.dtype
        config.train.batch_size = int(rest[0]) if rest else args.batch
        t0 = time.perf_counter()
        try:
            result = bench.run(config, ("clm", "mlm40"), steps=args.steps, warmup=args.warmup)
        except Exception as e:  # noqa: BLE001 - one variant's failure must not lose the others
            print(f"{variant}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            continue
        name = variant.replace(":", "_").replace("+", "_")
        with open(os.path.join(args.out, f"{name}.json"), "w") as fh:
            json.dump(result, fh, indent=2, sort_keys=True)
        print(f"{variant} done in {time.perf_counter() - t0:.0f} s", flush=True)
        for obj in ("clm", "mlm40"):
            r = result[obj]
            # the compiled step's own temporary memory (the device's peak in use is the process's,
            # carried over from the variants before)
            temp_gib = r["memory"]["temp_bytes"] / 2**30
            rows.append(f"| {variant} | {obj} | {config.train.batch_size} | {r['compile_seconds']:.0f} | "
                        f"{r['step_seconds']:.4f} | {r['tokens_per_second']:,.0f} | {100 * r['mfu']:.1f} % | "
                        f"{100 * r['mfu_in_segments']:.1f} % | {temp_gib:.1f} |")
        print(rows[-2] + "\n" + rows[-1], flush=True)
        peak = result["peak_flops_per_second"] / 1e12
        lines.append(f"{variant}: peak {peak:.0f} TFLOP/s on {result['device']}, kernel {result['attention_kernel']}")
    for objective_name in [o for o in args.profile.split(",") if o]:
        config = pretrain.get_config(args.preset)
        config.train.batch_size = args.batch
        config.model.dtype = args.dtype or config.model.dtype
        try:
            lines += profile(config, objective_name, args.out)
        except Exception as e:  # noqa: BLE001 - a report, not a failure
            print(f"profile {objective_name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    head = ("| variant | objective | batch | compile s | step s | tokens/s | MFU | MFU in segments | XLA temp GiB |\n"
            "|---|---|---|---|---|---|---|---|---|")
    summary = "\n".join([*lines, "", head, *rows])
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(summary + "\n")
    print("\n" + summary, flush=True)
    if any(line.endswith(": FAIL") for line in lines):
        sys.exit("the packed attention check failed (see the check lines)")


if __name__ == "__main__":
    main()
