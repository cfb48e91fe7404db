"""Named mesh layouts: `apply_mesh_layout(config, "h100x8", num_devices=64)`.

A layout fills in `config.mesh.{data,fsdp,tensor}` from the number of devices in the run.
The rule for every multi-node layout: parameters and optimizer state are sharded (FSDP)
over the devices of one node or TPU slice, where links are fast (NVLink, ICI), and each
node/slice holds a full replica that trains on its own rows (data parallel across nodes /
slices, where only the gradient all-reduce crosses the slower network).

  layout   devices_per_node (default)  mesh (data, fsdp, tensor)
  data     -                           (N, 1, 1)        small models: replicate everything
  fsdp     -                           (1, N, 1)        ZeRO-3 over every device
  node     required                    (N / n, n, 1)    FSDP in a node, data across nodes
  h100x8   8                           (N / 8, 8, 1)    8xH100 (or A100) nodes
  tpu_v5p  N (one slice)               (N / n, n, 1)    n = chips per slice (multislice: DCN)
  tpu_v4   N (one slice)               (N / n, n, 1)    as tpu_v5p

The global batch (`train.batch_size`) must divide by data * fsdp; per device it is
batch_size / (data * fsdp) rows, split further by `train.grad_accum_steps`.
"""

from __future__ import annotations

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
    batch, accum = int(config.train.batch_size), int(config.train.get("grad_accum_steps", 1))
    if batch % (data * fsdp * accum):
        raise ValueError(
            f"mesh.layout: train.batch_size={batch} does not split into {data * fsdp} data-parallel devices "
            f"x {accum} accumulation steps (layout {name!r} on {num_devices} devices)"
        )
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    return config

