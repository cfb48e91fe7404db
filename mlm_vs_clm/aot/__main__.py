"""`python -m mlm_vs_clm.aot`: the ahead-of-time memory check (see mlm_vs_clm/aot/__init__.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from mlm_vs_clm import sharding
from mlm_vs_clm.aot import (
    CHIPS,
    GIB,
    LIBTPU_MISSING,
    check,
    largest_micro_batch,
    objectives_of,
    parse_mesh,
    roofline,
    tpu_devices,
)
from mlm_vs_clm.config import flags_parser


def _define_flags():
    config_flags.DEFINE_config_file("config", None, "Pretraining config, e.g. configs/pretrain.py:1b.")
    flags.DEFINE_string("mesh", None, "DATAxFSDPxTENSOR, e.g. 1x8x1 (or use --layout; neither: the config's mesh).")
    flags.DEFINE_string("layout", None, "A layout of mlm_vs_clm/sharding.py (h100x8, tpu_v5p, fsdp, ...); "
                        "default: the config's mesh.layout, if set.")
    flags.DEFINE_integer("devices_per_node", None, "Devices per node/slice for --layout (default: the layout's).")
    flags.DEFINE_integer("devices", None, "Number of virtual CPU devices (default: the mesh's size).")
    flags.DEFINE_string("objective", None, "clm, mlm40, ... (default: every objective of the config's schedule).")
    flags.DEFINE_float("device_memory_gib", None, "Memory of one chip, e.g. 80 (H100), 95 (TPU v5p), 32 (v4).")
    flags.DEFINE_string("json", None, "Also write the reports to this JSON file.")
    flags.DEFINE_string(
        "platform", "cpu", "cpu: N virtual CPU devices (the default); cuda/tpu: compile for this machine's own chips, "
        "or with --topology for the TPU chips of a topology (needs libtpu, not a TPU)."
    )
    flags.DEFINE_string("topology", None, "A TPU topology to compile for, e.g. v5p:2x2x1, v5e:4x4, v6e:8x8 "
                        "(any name jax.experimental.topologies.get_topology_desc takes); implies --platform=tpu.")
    flags.DEFINE_integer("num_slices", 1, "With --topology: that many slices joined over DCN (multislice).")
    flags.DEFINE_bool("roofline", False, "Also estimate the step time from XLA's cost model (two more compiles, "
                      "of 1 and 2 unrolled layers, per objective; TPU chips of aot.CHIPS).")
    flags.DEFINE_bool("max_rows", False, "Also search the largest micro-batch (rows per device in one pass, with "
                      "the config's gradient accumulation) that fits the chip's memory: 4-6 more compiles.")
    flags.mark_flags_as_required(["config"])
    return flags.FLAGS


FLAGS = _define_flags()


def _devices_needed(f, topology_devices=None) -> int:
    if f.mesh and f.layout:
        raise ValueError("aot: give --mesh or --layout, not both")
    if topology_devices is not None:
        n = len(topology_devices)
        if f.devices not in (None, n):
            raise ValueError(f"aot: --topology={f.topology} has {n} chips but --devices={f.devices}")
        if f.mesh and math.prod(parse_mesh(f.mesh)) != n:
            raise ValueError(f"aot: --mesh={f.mesh} has {math.prod(parse_mesh(f.mesh))} devices, "
                             f"--topology={f.topology} {n}")
        return n
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
        topology_devices = None
        if f.topology:
            if f.platform not in ("cpu", "tpu"):
                raise ValueError(f"aot: --topology is for --platform=tpu, not {f.platform}")
            jax.config.update("jax_platforms", "cpu")  # the host compiles; the chips are the topology's
            topology_devices = tpu_devices(f.topology, f.num_slices)
        num_devices = _devices_needed(f, topology_devices)
        # Virtual CPU devices must be set before the backend starts (nothing above touched it).
        if topology_devices is None and f.platform == "cpu":
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", num_devices)
        elif topology_devices is None:
            jax.config.update("jax_platforms", f.platform)
            try:
                available = len(jax.devices())
            except Exception:  # noqa: BLE001 - JAX raises assorted errors for a missing backend
                if f.platform == "tpu" and importlib.util.find_spec("libtpu") is None:
                    raise ValueError(LIBTPU_MISSING + "; or compile for chips elsewhere with --topology") from None
                raise ValueError(f"aot: --platform={f.platform}: no such backend on this machine") from None
            if available < num_devices:
                raise ValueError(f"aot: --platform={f.platform} has {available} devices, the mesh needs {num_devices}")
        if f.mesh:
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = parse_mesh(f.mesh)
        elif f.layout:
            sharding.apply_mesh_layout(config, f.layout, num_devices, f.devices_per_node)
        elif config.mesh.get("layout"):  # as the train command applies it
            devices_per_node = f.devices_per_node or config.mesh.get("devices_per_node") or None
            sharding.apply_mesh_layout(config, config.mesh.layout, num_devices, devices_per_node)
        devices = topology_devices if topology_devices is not None else jax.devices()[:num_devices]
        reports = check(config, f.objective, devices)
    except ValueError as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        raise SystemExit(2) from None
    preset = config.get("preset", "?")
    kind = devices[0].device_kind
    where = f" ({f.topology}" + (f" x {f.num_slices} slices)" if f.num_slices > 1 else ")") if f.topology else ""
    print(f"{preset}: batch {config.train.batch_size} x seq {config.train.seq_len} on {num_devices} x {kind}{where}")
    for r in reports:
        print(r.line())
    if f.roofline:
        for r in reports:
            (objective,) = [o for o in objectives_of(config, f.objective) if o.name == r.objective]
            estimate = roofline(config, objective, devices)
            if estimate is not None:
                (r.estimate_seconds, r.estimate_flops, r.estimate_bytes, r.layer_flops, r.layer_bytes) = estimate
    for r in reports:
        print(r.flops_line(num_devices))
    fits = True
    memory_gib = f.device_memory_gib or (CHIPS[kind][1] if kind in CHIPS else None)
    if memory_gib:
        for r in reports:
            ok = r.fits(memory_gib)
            fits &= ok
            if r.refused:
                print(f"{r.objective}: DOES NOT FIT: the compiler refused it ({r.refused})")
                continue
            verdict = "fits" if ok else "DOES NOT FIT"
            print(f"{r.objective}: {r.total_bytes / GIB:.2f} GiB of {memory_gib:.4g} GiB per device: {verdict}")
    if f.max_rows and memory_gib:
        for r in reports:
            try:
                best, tried = largest_micro_batch(config, r.objective, devices, memory_gib)
            except (RuntimeError, ValueError) as e:
                print(str(e).splitlines()[0], file=sys.stderr)
                raise SystemExit(2) from None
            shown = ", ".join(f"{rows}: " + ("refused" if t.refused else f"{t.total_bytes / GIB:.3f}")
                              for rows, t in sorted(tried.items()))
            r.max_rows_per_device = best
            accum = int(config.train.get("grad_accum_steps", 1))
            print(f"{r.objective}: largest micro-batch that fits: "
                  + (f"{best} rows per device" if best else "not found in the compiles allowed")
                  + f" (compiled micro-batches: GiB per device {shown}; {accum} accumulation steps)")
    if f.json:
        with open(f.json, "w") as out:
            rows = [dict(dataclasses.asdict(r), total_bytes=r.total_bytes) for r in reports]
            json.dump({"preset": preset, "devices": num_devices, "device_kind": kind, "topology": f.topology,
                       "num_slices": f.num_slices, "device_memory_gib": memory_gib, "reports": rows}, out, indent=1)
    if not fits:
        print(f"aot: {preset} does not fit in {memory_gib:.4g} GiB per {kind} device (see above)", file=sys.stderr)
    raise SystemExit(0 if fits else 1)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser("aot: "))
