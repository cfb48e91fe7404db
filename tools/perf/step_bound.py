"""How fast the `small` train step could be on this machine if its matmuls were all it did.

  python tools/perf/step_bound.py [DTYPE] [OBJECTIVE] [ROUNDS]

DTYPE is the compute dtype (float32 or bfloat16, default float32), OBJECTIVE clm or mlm40
(default clm). Reads every dot of our compiled step out of its optimised HLO (a dot inside the
loss's loop counts once per chunk), runs each product alone, jitted, with the same operand
shapes, dtypes and dimension numbers, and adds up their median times: the step's "products
alone". Then times, round by round (`bench.interleaved_times`), our step, the peer with host
memory kept mapped (`bench --peer_kept`) and the peak matmul. Prints:

- the step against its products alone (what everything else costs);
- the MFU the step would reach at its products alone, against the peak of this run;
- ours / the peer now, and at most (the peer's step over our products alone).
"""

import collections
import json
import re
import sys
import tempfile

import numpy as np

from mlm_vs_clm import bench
from mlm_vs_clm.kernels import host_memory

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\((.*)$")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_DIMS = re.compile(r"\b(lhs_batch_dims|rhs_batch_dims|lhs_contracting_dims|rhs_contracting_dims)=\{([\d,]*)\}")


def step_products(hlo_text: str) -> list[dict]:
    """Every dot of an optimised HLO module: its operands' and result's dtype and shape, its
    dimension numbers, FLOPs, and how many times one run of the module executes it (the trip
    counts of the while loops around it; a loop without a known trip count counts once, and
    `unknown_trip_count` says so)."""
    computations, order, current = {}, [], None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            computations[current] = {"entry": line.startswith("ENTRY"), "lines": []}
            order.append(current)
        elif line == "}":
            current = None
        elif current is not None:
            computations[current]["lines"].append(line)
    types, calls = {}, collections.defaultdict(list)
    for name, comp in computations.items():
        for line in comp["lines"]:
            m = _INSTRUCTION.match(line)
            if m:
                types[m.group(1)] = (m.group(2), tuple(int(d) for d in m.group(3).split(",") if d))
            trips = _TRIP_COUNT.search(line)
            callees = _CALLED.findall(line)
            for branch in _BRANCHES.findall(line):
                callees += [c.strip().lstrip("%") for c in branch.split(",")]
            for callee in callees:
                body = " while(" in line and f"body=%{callee}" in line
                calls[name].append((callee, int(trips.group(1)) if body and trips else 1, body and not trips))
    times = collections.Counter()
    unknown = set()

    def visit(name, n, unsure):
        times[name] += n
        if unsure:
            unknown.add(name)
        for callee, trips, no_count in calls[name]:
            visit(callee, n * trips, unsure or no_count)

    for name, comp in computations.items():
        if comp["entry"]:
            visit(name, 1, False)
    products = []
    for name, comp in computations.items():
        for line in comp["lines"]:
            m = _INSTRUCTION.match(line)
            if not m or m.group(4) != "dot":
                continue
            lhs, rhs = re.findall(r"%([\w.\-]+)", m.group(5))[:2]
            dims = {k: tuple(int(d) for d in v.split(",") if d) for k, v in _DIMS.findall(line)}
            out_shape = types[m.group(1)][1]
            contracted = int(np.prod([types[lhs][1][d] for d in dims.get("lhs_contracting_dims", ())]))
            products.append({
                "lhs": types[lhs], "rhs": types[rhs], "out": types[m.group(1)],
                "dims": tuple(dims.get(k, ()) for k in ("lhs_contracting_dims", "rhs_contracting_dims",
                                                        "lhs_batch_dims", "rhs_batch_dims")),
                "flops": 2 * int(np.prod(out_shape)) * contracted,
                "count": times[name], "unknown_trip_count": name in unknown,
            })
    return products


def product_runner(product: dict):
    """The product alone, jitted, on random operands: a callable returning its result."""
    import jax
    import jax.numpy as jnp

    hlo_dtypes = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "f64": jnp.float64}
    (lhs_dtype, lhs_shape), (rhs_dtype, rhs_shape), (out_dtype, _) = (
        (hlo_dtypes[t], shape) for t, shape in (product["lhs"], product["rhs"], product["out"]))
    lc, rc, lb, rb = product["dims"]
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, lhs_shape, jnp.float32).astype(lhs_dtype)
    b = jax.random.normal(key_b, rhs_shape, jnp.float32).astype(rhs_dtype)
    fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, ((lc, rc), (lb, rb)), preferred_element_type=out_dtype))
    return lambda: fn(a, b).block_until_ready()


def products_alone_seconds(products: list[dict], repeats: int = 7) -> tuple[float, list]:
    """Sum over the step's products of count x the median seconds of the product run alone, and
    the rows (seconds per step, count, signature) behind it, largest first."""
    groups = collections.defaultdict(int)
    for p in products:
        groups[json.dumps({k: p[k] for k in ("lhs", "rhs", "out", "dims", "flops")})] += p["count"]
    rows = []
    for signature, count in groups.items():
        product = json.loads(signature)
        product = {**product, "lhs": tuple(product["lhs"]), "rhs": tuple(product["rhs"]), "out": tuple(product["out"])}
        run = product_runner(product)
        run()
        seconds = float(np.median(bench.interleaved_times({"p": run}, 0, repeats, gap_s=0.0)["p"]))
        rows.append((seconds * count, count, product["flops"] / seconds, product))
    rows.sort(key=lambda r: -r[0])
    return sum(r[0] for r in rows), rows


def _describe(product: dict) -> str:
    (ld, ls), (rd, rs), (od, os_) = product["lhs"], product["rhs"], product["out"]
    lc, rc = product["dims"][:2]
    return f"{ld}{list(ls)} x {rd}{list(rs)} -> {od}{list(os_)}, contracting {list(lc)} x {list(rc)}"


if __name__ == "__main__":
    host_memory.keep_mapped(respect_env=False)
    import jax

    from mlm_vs_clm import schedules, sharding, train_state
    from mlm_vs_clm import step as step_lib
    from mlm_vs_clm.bench import peer as bench_peer
    from mlm_vs_clm.config import load_config

    dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
    objective = schedules._objective(sys.argv[2] if len(sys.argv) > 2 else "clm", 0.4)
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    c = load_config("configs/pretrain.py:small")
    c.model.dtype = dtype
    mesh = sharding.make_mesh(c.mesh)
    setup = train_state.build(c, mesh)
    B, L = c.train.batch_size, c.train.seq_len
    batch_np = bench.synthetic_batch(B, L, c.model.vocab_size, c.seed)
    batch = jax.device_put(batch_np, step_lib.batch_shardings(mesh))
    ours, info, _ = bench.ours_runner(setup, objective, batch)
    state = train_state.init_state(setup, c.seed)
    hlo = step_lib.compiled_train_step(setup, objective).lower(state, batch).compile().as_text()
    del state
    products = step_products(hlo)
    alone, rows = products_alone_seconds(products)
    peak_run, peak = bench.peak_runner(dtype)
    runners = {"ours": ours, "peak": peak_run}
    with tempfile.TemporaryDirectory(prefix="mlm_vs_clm_peer_") as folder:
        runners["peer"], _, close = bench_peer.peer_process_runner(c, batch_np, folder, keep_host_memory=True)
        try:
            times = bench.interleaved_times(runners, 1, rounds, rewarm=1)
        finally:
            close()
    step, peer = float(np.median(times["ours"])), float(np.median(times["peer"]))
    peak_flops = peak["flops_per_call"] / min(times["peak"])
    model_flops = info["model_flops_per_token"] * B * L
    dot_flops = sum(p["flops"] * p["count"] for p in products)
    print(f"small, {dtype}, {objective.name}: {len(products)} dots in the optimised HLO, "
          f"{dot_flops / 1e9:.1f} GFLOP a step (the model's count: {model_flops / 1e9:.1f})")
    if any(p["unknown_trip_count"] for p in products):
        print("  some dots sit in loops without a known trip count: counted once per loop")
    print("largest products alone (seconds a step, count, GFLOP/s alone):")
    for seconds, count, rate, product in rows[:8]:
        print(f"  {seconds:7.3f} s  x{count:3d}  {rate / 1e9:6.0f}  {_describe(product)}")
    print(f"our step {step:.3f} s; its products alone {alone:.3f} s ({alone / step:.0%} of the step)")
    print(f"peak {peak_flops / 1e9:,.1f} GFLOP/s: MFU now {model_flops / step / peak_flops:.1%}, "
          f"at the products alone {model_flops / alone / peak_flops:.1%}")
    print(f"peer (host memory kept mapped) {peer:.3f} s: ours / peer now {peer / step:.2f}x, "
          f"at the products alone {peer / alone:.2f}x")
