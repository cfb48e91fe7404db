"""Meshes and shardings: logical axis names -> mesh axes ('data', 'fsdp', 'tensor')."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

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
    from jax.experimental import mesh_utils

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
