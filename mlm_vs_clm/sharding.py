"""Meshes and shardings: logical axis names -> mesh axes ('data', 'fsdp', 'tensor')."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Sizes of ('data', 'fsdp', 'tensor'); one size may be -1 (filled in from the device count)."""
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed mesh sizes {sizes}")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices")
    return tuple(sizes)


def multislice_grid(shape: tuple[int, int, int], devices) -> np.ndarray | None:
    """Devices on several TPU slices (distinct `slice_index`) arranged [data, fsdp, tensor] so
    that `fsdp` and `tensor` stay inside a slice (ICI) and only `data` crosses slices (DCN);
    None on a single slice or on devices without slices."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if len(slices) <= 1 or None in slices:
        return None
    n = len(slices)
    if shape[0] % n:
        raise ValueError(
            f"mesh: the devices span {n} TPU slices, so mesh.data must be a multiple of {n} "
            f"(fsdp and tensor stay inside a slice); got (data, fsdp, tensor) = {shape}"
        )

    return mesh_utils.create_hybrid_device_mesh((shape[0] // n, shape[1], shape[2]), (n, 1, 1), devices)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    grid = multislice_grid(shape, devices)
    if grid is not None:
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def rules(config) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.mesh.rules)


def logical_to_shardings(logical_specs, mesh, rules_):
    """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules_)


def batch_sharding(mesh) -> NamedSharding:
    """Rows of a [B, L] batch split over the data-parallel axes ('data', 'fsdp')."""
    return NamedSharding(mesh, P(("data", "fsdp"), None))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_split(config, data_parallel: int, where: str = "") -> None:
    """train.batch_size must split evenly into `data_parallel` devices x grad_accum_steps (ValueError)."""
    batch, accum = int(config.train.batch_size), int(config.train.get("grad_accum_steps", 1))
    if batch <= 0 or batch % (data_parallel * accum):
        raise ValueError(
            f"train.batch_size: {batch} is not divisible by data-parallel size {data_parallel} x "
            f"grad_accum_steps {accum}{where}"
        )


# Named mesh layouts: `apply_mesh_layout(config, "h100x8", num_devices=64)`.
#
# A layout fills in `config.mesh.{data,fsdp,tensor}` from the number of devices in the run.
# The rule for every multi-node layout: parameters and optimizer state are sharded (FSDP)
# over the devices of one node or TPU slice, where links are fast (NVLink, ICI), and each
# node/slice holds a full replica that trains on its own rows (data parallel across nodes /
# slices, where only the gradient all-reduce crosses the slower network).
#
#   layout   devices_per_node (default)  mesh (data, fsdp, tensor)
#   data     -                           (N, 1, 1)        small models: replicate everything
#   fsdp     -                           (1, N, 1)        ZeRO-3 over every device
#   node     required                    (N / n, n, 1)    FSDP in a node, data across nodes
#   h100x8   8                           (N / 8, 8, 1)    8xH100 (or A100) nodes
#   tpu_v5p  N (one slice)               (N / n, n, 1)    n = chips per slice (multislice: DCN)
#   tpu_v4   N (one slice)               (N / n, n, 1)    as tpu_v5p
#
# The global batch (`train.batch_size`) must divide by data * fsdp; per device it is
# batch_size / (data * fsdp) rows, split further by `train.grad_accum_steps`.

LAYOUTS = {
    # name: default devices per node (None = the layout ignores nodes, 0 = all devices = one slice)
    "data": None,
    "fsdp": None,
    "node": -1,  # the caller must say how many devices one node has
    "h100x8": 8,
    "tpu_v5p": 0,
    "tpu_v4": 0,
}


def layout_shape(name: str, num_devices: int, devices_per_node: int | None = None) -> tuple[int, int, int]:
    """(data, fsdp, tensor) of layout `name` on `num_devices` devices."""
    if name not in LAYOUTS:
        raise ValueError(f"mesh.layout: unknown layout {name!r} (known: {', '.join(LAYOUTS)})")
    if num_devices < 1:
        raise ValueError(f"mesh.layout: need at least one device, got {num_devices}")
    if name == "data":
        return (num_devices, 1, 1)
    if name == "fsdp":
        return (1, num_devices, 1)
    per_node = devices_per_node or LAYOUTS[name]
    if per_node == -1:
        raise ValueError(f"mesh.layout: layout {name!r} needs devices_per_node")
    if per_node == 0:
        per_node = num_devices
    if num_devices % per_node:
        raise ValueError(
            f"mesh.layout: {num_devices} devices are not a whole number of nodes/slices of {per_node} ({name!r})"
        )
    return (num_devices // per_node, per_node, 1)


def apply_mesh_layout(config, name: str, num_devices: int, devices_per_node: int | None = None):
    """Set `config.mesh.{data,fsdp,tensor}` for layout `name`; checks the batch divides. Returns config."""
    data, fsdp, tensor = layout_shape(name, num_devices, devices_per_node)
    check_batch_split(config, data * fsdp, f" (layout {name!r} on {num_devices} devices)")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    return config
