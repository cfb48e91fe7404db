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
"""

from __future__ import annotations

import dataclasses
import time

import jax

from mlm_vs_clm import schedules, sharding, step, train_state
from mlm_vs_clm.config import validate

GIB = 1024**3


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

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    def fits(self, device_memory_gib: float) -> bool:
        return self.total_bytes <= device_memory_gib * GIB

    def line(self) -> str:
        def g(b):
            return f"{b / GIB:8.2f}"

        return (
            f"{self.objective:6s} mesh={'x'.join(map(str, self.mesh)):9s} rows/device={self.rows_per_device:<4d} "
            f"seq={self.seq_len:<5d} GiB/device: args {g(self.argument_bytes)} out {g(self.output_bytes)} "
            f"(aliased {g(self.alias_bytes).strip()}) temps {g(self.temp_bytes)} code {g(self.code_bytes)} "
            f"total {g(self.total_bytes)}  [compiled in {self.compile_seconds:.1f} s]"
        )


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


def check(config, objective_name: str | None = None, devices=None) -> list[MemoryReport]:
    """Compile the train step of `config` on the mesh `config.mesh` describes; one report per objective."""
    devices = list(devices if devices is not None else jax.devices())
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
        compiled = step.compiled_train_step(setup, objective).lower(setup.abstract_state, abstract_batch).compile()
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
            )
        )
    return reports
