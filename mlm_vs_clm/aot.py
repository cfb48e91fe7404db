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
import importlib.util
import json
import math
import os
import sys
import time

from mlm_vs_clm import config as config_lib

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


def mesh_layouts():
    """The `configs/meshes.py` module (configs/ is not an installed package)."""
    path = os.path.join(config_lib.REPO_ROOT, "configs", "meshes.py")
    spec = importlib.util.spec_from_file_location("_mlm_vs_clm_meshes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def objectives_of(config, name: str | None):
    """The objectives to check: `name` ('clm', 'mlm40', ...) or every one in the config's schedule."""
    from mlm_vs_clm import schedules

    spec = name or config.objective
    return schedules.objective_schedule(spec, int(config.train.steps), float(config.mlm.mask_ratio)).distinct()


def check(config, objective_name: str | None = None, devices=None) -> list[MemoryReport]:
    """Compile the train step of `config` on the mesh `config.mesh` describes; one report per objective."""
    import jax

    from mlm_vs_clm import sharding, step, train_state
    from mlm_vs_clm.validate import validate

    devices = list(devices if devices is not None else jax.devices())
    mesh_shape = sharding.mesh_shape(config.mesh, len(devices))
    mesh = sharding.make_mesh(config.mesh, devices)
    dp = sharding.data_parallel_size(mesh)
    batch, seq_len = int(config.train.batch_size), int(config.train.seq_len)
    accum = int(config.train.grad_accum_steps)
    if batch % (dp * accum):
        raise ValueError(
            f"aot: train.batch_size={batch} does not split into {dp} data-parallel devices x {accum} accumulation steps"
        )
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


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Pretraining config, e.g. configs/pretrain.py:1b.")
    flags.DEFINE_string("mesh", None, "DATAxFSDPxTENSOR, e.g. 1x8x1 (or use --layout; neither: the config's mesh).")
    flags.DEFINE_string("layout", None, "A layout of configs/meshes.py (h100x8, tpu_v5p, fsdp, ...); "
                        "default: the config's mesh.layout, if set.")
    flags.DEFINE_integer("devices_per_node", None, "Devices per node/slice for --layout (default: the layout's).")
    flags.DEFINE_integer("devices", None, "Number of virtual CPU devices (default: the mesh's size).")
    flags.DEFINE_string("objective", None, "clm, mlm40, ... (default: every objective of the config's schedule).")
    flags.DEFINE_float("device_memory_gib", None, "Memory of one chip, e.g. 80 (H100), 95 (TPU v5p), 32 (v4).")
    flags.DEFINE_string("json", None, "Also write the reports to this JSON file.")
    flags.DEFINE_string(
        "platform", "cpu", "cpu: N virtual CPU devices (the default); cuda/tpu: compile for this machine's own chips."
    )
    flags.mark_flags_as_required(["config"])
    return flags.FLAGS


def _devices_needed(f) -> int:
    if f.mesh and f.layout:
        raise ValueError("aot: give --mesh or --layout, not both")
    if f.mesh:
        size = math.prod(parse_mesh(f.mesh))
        if f.devices not in (None, size):
            raise ValueError(f"aot: --mesh={f.mesh} has {size} devices but --devices={f.devices}")
        return size
    if f.layout:
        if not f.devices:
            raise ValueError("aot: --layout needs --devices")
        return f.devices
    if f.config.mesh.get("layout") and not f.devices:
        raise ValueError(f"aot: mesh.layout={f.config.mesh.layout!r} needs --devices")
    return f.devices or 1


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"aot: unexpected arguments {argv[1:]}")
    f = FLAGS
    config = f.config
    try:
        num_devices = _devices_needed(f)
        # Virtual CPU devices must be set before the backend starts (nothing above touched it).
        import jax

        jax.config.update("jax_platforms", f.platform)
        if f.platform == "cpu":
            jax.config.update("jax_num_cpu_devices", num_devices)
        else:
            try:
                available = len(jax.devices())
            except Exception:  # noqa: BLE001 - JAX raises assorted errors for a missing backend
                raise ValueError(f"aot: --platform={f.platform}: no such backend on this machine") from None
            if available < num_devices:
                raise ValueError(f"aot: --platform={f.platform} has {available} devices, the mesh needs {num_devices}")
        if f.mesh:
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = parse_mesh(f.mesh)
        elif f.layout:
            mesh_layouts().apply_mesh_layout(config, f.layout, num_devices, f.devices_per_node)
        elif config.mesh.get("layout"):  # as the train command applies it
            devices_per_node = f.devices_per_node or config.mesh.get("devices_per_node") or None
            mesh_layouts().apply_mesh_layout(config, config.mesh.layout, num_devices, devices_per_node)
        reports = check(config, f.objective, jax.devices()[:num_devices])
    except ValueError as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        raise SystemExit(2) from None
    preset = config.get("preset", "?")
    kind = jax.devices()[0].device_kind
    print(f"{preset}: batch {config.train.batch_size} x seq {config.train.seq_len} on {num_devices} x {kind}")
    for r in reports:
        print(r.line())
    fits = True
    if f.device_memory_gib:
        for r in reports:
            ok = r.fits(f.device_memory_gib)
            fits &= ok
            verdict = "fits" if ok else "DOES NOT FIT"
            print(f"{r.objective}: {r.total_bytes / GIB:.2f} GiB of {f.device_memory_gib:g} GiB per device: {verdict}")
    if f.json:
        with open(f.json, "w") as out:
            rows = [dict(dataclasses.asdict(r), total_bytes=r.total_bytes) for r in reports]
            json.dump({"preset": preset, "devices": num_devices, "reports": rows}, out, indent=1)
    raise SystemExit(0 if fits else 1)


if __name__ == "__main__":
    from absl import app

    FLAGS = _define_flags()
    app.run(main)
