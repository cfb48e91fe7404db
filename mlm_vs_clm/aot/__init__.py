"""Ahead-of-time memory check: will this preset fit on these chips? Runs on a CPU.

    python -m mlm_vs_clm.aot --config=configs/pretrain.py:1b --mesh=1x8x1 --devices=8 \
        --objective=mlm40 --device_memory_gib=80 [--config.train.batch_size=96]
    python -m mlm_vs_clm.aot --config=configs/pretrain.py:610m --layout=h100x8 --devices=64 ...

Without --mesh or --layout it checks the config's own mesh, with `mesh.layout` applied as the
train command applies it. It validates the config as the train command does (one line, exit
status 2), then builds the state shardings on a mesh of N virtual CPU devices, lowers and
compiles the train step for abstract (never allocated) inputs, and prints the per-device
memory from XLA's `memory_analysis()` of the partitioned program: arguments, outputs,
temporaries, generated code and their total (outputs aliased to donated arguments are counted once). The CPU
compiler's buffer assignment approximates, but is not identical to, the GPU/TPU compiler's:
keep a margin (docs/scaling.md); `--platform=cuda` (or tpu) compiles for the chips of the machine
it runs on instead, for as many devices as it has. Exit status: 0 fits (or no --device_memory_gib), 1 does not.

For TPUs, with no TPU at hand (libtpu installed: `pip install -e '.[tpu]'`):

    python -m mlm_vs_clm.aot --config=configs/pretrain.py:210m --platform=tpu --topology=v5p:2x2x1

compiles with TPU's own compiler for the chips of a topology (`tpu_devices`), with the kernels
chosen for TPUs (splash attention), and checks against the chip's HBM (`CHIPS`). Each report
also carries the model FLOPs of the step (flops.py), and, when asked (`roofline`), an estimate
of its time from XLA's cost model.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax

from mlm_vs_clm import flops, schedules, sharding, step, train_state
from mlm_vs_clm.config import validate
from mlm_vs_clm.kernels import platform

GIB = 1024**3

# TPU chips by `device_kind`: (name, HBM GiB, bf16 peak FLOP/s, HBM bytes/s) per chip, as
# Google's Cloud TPU pages state them: v4 "32 GiB", v5e "16 GB", v5p "95 GB", v6e "32 GB". A
# "GB" is read as 10^9 bytes, the smaller reading, so the check errs on the side of "does not
# fit" (95 GB = 88.5 GiB). The runtime reserves some HBM too: keep a margin.
CHIPS = {
    "TPU v4": ("v4", 32.0, 275e12, 1228e9),
    "TPU v5 lite": ("v5e", 16e9 / GIB, 197e12, 819e9),
    "TPU v5": ("v5p", 95e9 / GIB, 459e12, 2765e9),
    "TPU v6 lite": ("v6e", 32e9 / GIB, 918e12, 1640e9),
}

LIBTPU_MISSING = (
    "aot: --platform=tpu needs libtpu: pip install -e '.[tpu]' (or pip install --target DIR 'libtpu==0.0.42.*' "
    "and PYTHONPATH=DIR)"
)


def tpu_devices(topology: str, num_slices: int = 1) -> list:
    """Compile-only devices of a TPU topology ('v5p:2x2x1', 'v5e:4x4', ...; `num_slices` > 1:
    that many slices joined over DCN). Needs libtpu, not a TPU (ValueError without it)."""
    from jax.experimental import topologies  # imported here: it loads the TPU plugin machinery

    # Compile-only devices touch no chip: skip the TPU VM metadata query (absent off Cloud) and
    # libtpu's one-process lock (several checks may compile at once).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", num_slices=num_slices)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise ValueError(LIBTPU_MISSING) from None
        raise ValueError(f"aot: --topology={topology!r}: {str(e).strip().splitlines()[0]}") from None
    return list(desc.devices)


@dataclasses.dataclass
class MemoryReport:
    objective: str
    mesh: tuple[int, int, int]
    rows_per_device: int  # sequences per device per optimizer step (before grad accumulation)
    seq_len: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    compile_seconds: float
    model_flops: float = 0.0  # model FLOPs of one step, all devices (flops.py)
    estimate_seconds: float | None = None  # roofline estimate from XLA's cost model (`roofline`)
    estimate_flops: float | None = None  # per device, every layer counted
    estimate_bytes: float | None = None
    layer_flops: float | None = None  # per device and micro-batch, one layer (forward + backward)
    layer_bytes: float | None = None
    max_rows_per_device: int | None = None  # `largest_micro_batch`, when searched
    refused: str = ""  # the compiler's own out-of-memory message, when it refused the program

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    def fits(self, device_memory_gib: float) -> bool:
        return not self.refused and self.total_bytes <= device_memory_gib * GIB

    def line(self) -> str:
        def g(b):
            return f"{b / GIB:8.2f}"

        if self.refused:
            mesh = "x".join(map(str, self.mesh))
            return (f"{self.objective:6s} mesh={mesh:9s} rows/device={self.rows_per_device:<4d} "
                    f"seq={self.seq_len:<5d} refused by the compiler: {self.refused}  "
                    f"[{self.compile_seconds:.1f} s]")
        return (
            f"{self.objective:6s} mesh={'x'.join(map(str, self.mesh)):9s} rows/device={self.rows_per_device:<4d} "
            f"seq={self.seq_len:<5d} GiB/device: args {g(self.argument_bytes)} out {g(self.output_bytes)} "
            f"(aliased {g(self.alias_bytes).strip()}) temps {g(self.temp_bytes)} code {g(self.code_bytes)} "
            f"total {g(self.total_bytes)}  [compiled in {self.compile_seconds:.1f} s]"
        )

    def flops_line(self, num_devices: int) -> str:
        line = (f"{self.objective}: model FLOPs per step {self.model_flops:.3e} "
                f"({self.model_flops / num_devices:.3e} per device)")
        if self.estimate_seconds is not None:
            line += (f"; estimate from XLA's cost model (not a measurement): {self.estimate_seconds * 1e3:.1f} ms "
                     f"per step at the chip's peak ({self.estimate_flops:.3e} FLOPs, "
                     f"{self.estimate_bytes / GIB:.1f} GiB accessed per device; one layer of a micro-batch: "
                     f"{self.layer_flops:.3e} FLOPs, {self.layer_bytes / GIB:.2f} GiB)")
        return line


def parse_mesh(spec: str) -> tuple[int, int, int]:
    """'DATAxFSDPxTENSOR' (e.g. '2x8x1') -> (2, 8, 1)."""
    try:
        sizes = tuple(int(p) for p in spec.lower().split("x"))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"aot: --mesh={spec!r} is not DATAxFSDPxTENSOR with positive sizes (e.g. 1x8x1)")
    return sizes


def objectives_of(config, name: str | None):
    """The objectives to check: `name` ('clm', 'mlm40', ...) or every one in the config's schedule."""
    spec = name or config.objective
    return schedules.objective_schedule(spec, int(config.train.steps), float(config.mlm.mask_ratio)).distinct()


def model_flops(config, objective) -> float:
    """Model FLOPs of one train step of `objective` on the config's global batch (flops.py)."""
    model_cfg = train_state.ModelConfig.from_config(config.model)
    seq_len = int(config.train.seq_len)
    per_token = flops.train_flops_per_token(model_cfg, seq_len, objective.kind, objective.mask_ratio,
                                            bool(config.mlm.sparse_head)).per_token
    return per_token * int(config.train.batch_size) * seq_len


def check(config, objective_name: str | None = None, devices=None) -> list[MemoryReport]:
    """Compile the train step of `config` on the mesh `config.mesh` describes; one report per objective.
    `devices` may be compile-only devices (`tpu_devices`): kernels are chosen for their platform."""
    devices = list(devices if devices is not None else jax.devices())
    with platform.target(devices[0].platform):
        return _check(config, objective_name, devices)


def _check(config, objective_name, devices) -> list[MemoryReport]:
    mesh_shape = sharding.mesh_shape(config.mesh, len(devices))
    mesh = sharding.make_mesh(config.mesh, devices)
    dp = sharding.data_parallel_size(mesh)
    batch, seq_len = int(config.train.batch_size), int(config.train.seq_len)
    sharding.check_batch_split(config, dp)
    validate(config, len(devices))  # what the train command checks first: one line, not a traceback
    setup = train_state.build(config, mesh)
    shardings = step.batch_shardings(mesh)
    abstract_batch = {
        k: jax.ShapeDtypeStruct((batch, seq_len), jax.numpy.int32, sharding=s) for k, s in shardings.items()
    }
    reports = []
    for objective in objectives_of(config, objective_name):
        start = time.perf_counter()
        try:
            compiled = step.compiled_train_step(setup, objective).lower(setup.abstract_state, abstract_batch).compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler checks HBM itself, and stops
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            reports.append(MemoryReport(
                objective=objective.name, mesh=tuple(mesh_shape), rows_per_device=batch // dp, seq_len=seq_len,
                argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=0, code_bytes=0,
                compile_seconds=time.perf_counter() - start, model_flops=model_flops(config, objective),
                refused=str(e).splitlines()[0].split("RESOURCE_EXHAUSTED: ", 1)[-1]))
            continue
        seconds = time.perf_counter() - start
        stats = compiled.memory_analysis()
        if stats is None:
            raise RuntimeError("aot: this backend reports no memory analysis for compiled programs")
        reports.append(
            MemoryReport(
                objective=objective.name,
                mesh=tuple(mesh_shape),
                rows_per_device=batch // dp,
                seq_len=seq_len,
                argument_bytes=int(stats.argument_size_in_bytes),
                output_bytes=int(stats.output_size_in_bytes),
                alias_bytes=int(stats.alias_size_in_bytes),
                temp_bytes=int(stats.temp_size_in_bytes),
                code_bytes=int(stats.generated_code_size_in_bytes),
                compile_seconds=seconds,
                model_flops=model_flops(config, objective),
            )
        )
    return reports


def _cost(config, objective, devices) -> tuple[float, float]:
    """(flops, bytes accessed) per device of XLA's cost model for the step of `config`."""
    mesh = sharding.make_mesh(config.mesh, devices)
    setup = train_state.build(config, mesh)
    shardings = step.batch_shardings(mesh)
    shape = (int(config.train.batch_size), int(config.train.seq_len))
    batch = {k: jax.ShapeDtypeStruct(shape, jax.numpy.int32, sharding=s) for k, s in shardings.items()}
    compiled = step.compiled_train_step(setup, objective).lower(setup.abstract_state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def roofline(config, objective, devices) -> tuple[float, float, float, float, float] | None:
    """(seconds, flops, bytes, one layer's flops, one layer's bytes) per device of one step by
    XLA's cost model, the seconds at the chip's peak FLOP rate or HBM bandwidth, whichever binds
    (`CHIPS`; None for another chip).

    XLA's cost analysis counts a loop body once, and the step has three loops: the scanned
    layers, the micro-batches of gradient accumulation and the chunks of the loss. So the
    estimate compiles the micro-batch step twice more, unrolled, with 1 and 2 layers and the
    loss in one chunk: every layer costs the difference (c2 - c1), and the step
    accum x (c1 + (S - 1)(c2 - c1)); the optimizer update, counted once per micro-batch, makes
    this an upper bound when accum > 1. XLA's cost model does not see inside Pallas kernels:
    with splash attention the attention's own FLOPs and bytes are missing. An estimate, never a
    measurement."""
    chip = CHIPS.get(devices[0].device_kind)
    if chip is None:
        return None
    accum, layers = int(config.train.get("grad_accum_steps", 1)), int(config.model.num_layers)
    costs = []
    for n in (1, 2):
        c = config.copy_and_resolve_references()
        c.model.num_layers, c.model.scan_layers = n, False
        c.train.grad_accum_steps = 1
        c.train.batch_size = int(config.train.batch_size) // accum
        c.loss_chunk_size = int(config.train.seq_len)
        with platform.target(devices[0].platform):
            costs.append(_cost(c, objective, devices))
    (f1, b1), (f2, b2) = costs
    f, b = accum * (f1 + (layers - 1) * (f2 - f1)), accum * (b1 + (layers - 1) * (b2 - b1))
    return max(f / chip[2], b / chip[3]), f, b, f2 - f1, b2 - b1


def largest_micro_batch(config, objective_name: str, devices, memory_gib: float, max_compiles: int = 6):
    """The largest micro-batch (rows per device in one forward and backward pass, with the
    config's number of gradient-accumulation steps) whose step fits in `memory_gib` per device,
    for one objective, found by compiling: at the config's micro-batch r0 and at 2 r0, a line
    through the two totals (temporaries grow linearly with the rows) predicts the largest r,
    then r and r + 1 are compiled and the search steps by one until a fitting r sits next to a
    failing r + 1, or the compiles run out. A program the compiler refuses does not fit.
    Returns (largest fitting micro-batch or None, {micro-batch: MemoryReport} of every compile)."""
    dp = sharding.data_parallel_size(sharding.make_mesh(config.mesh, devices))
    accum = int(config.train.get("grad_accum_steps", 1))
    reports: dict[int, MemoryReport] = {}

    def at(rows: int) -> MemoryReport:
        if rows not in reports:
            c = config.copy_and_resolve_references()
            c.train.batch_size = rows * dp * accum
            (reports[rows],) = check(c, objective_name, devices)
        return reports[rows]

    def fits(rows: int) -> bool:
        return at(rows).fits(memory_gib)

    lo = max(1, int(config.train.batch_size) // (dp * accum))
    while at(lo).refused and lo > 1:  # the line needs two programs the compiler accepts
        lo //= 2
    if at(lo).refused:
        return None, reports
    hi = 2 * lo
    if at(hi).refused:
        if lo == 1:
            return (1 if fits(1) else None), reports
        lo, hi = lo // 2, lo
    a, b = at(lo), at(hi)
    slope = (b.total_bytes - a.total_bytes) / (hi - lo)
    if slope <= 0:
        raise RuntimeError(f"aot: the step's memory did not grow from {lo} to {hi} rows per device")
    guess = max(1, lo + int((memory_gib * GIB - a.total_bytes) // slope))
    while len(reports) < max_compiles:
        if not fits(guess):
            guess -= 1
            if guess < 1:
                return None, reports
        elif guess + 1 in reports and not fits(guess + 1):
            return guess, reports
        elif guess + 1 in reports:
            guess += 1
        else:
            at(guess + 1)
    known = [r for r in reports if fits(r) and r + 1 in reports and not fits(r + 1)]
    return (max(known) if known else None), reports
