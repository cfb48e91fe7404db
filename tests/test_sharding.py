"""Mesh construction: the multislice (TPU slices over DCN) device arrangement."""

import dataclasses
import random

import jax
import pytest

from mlm_vs_clm.sharding import multislice_grid


@dataclasses.dataclass(frozen=True)
class FakeTpu:
    """What the mesh code reads of a TPU device: id, slice, platform, kind, chip coordinates."""

    id: int
    slice_index: int
    coords: tuple
    platform: str = "tpu"
    device_kind: str = "TPU v5p"
    process_index: int = 0
    core_on_chip: int = 0


def _two_slices_of_four():
    devs = [FakeTpu(i, i // 4, (i % 2, (i // 2) % 2, 0)) for i in range(8)]
    random.Random(0).shuffle(devs)  # the runtime's order is not the slice order
    return devs


@pytest.mark.parametrize("shape", [(2, 4, 1), (4, 2, 1), (2, 2, 2)])
def test_fsdp_and_tensor_stay_inside_a_slice(shape):
    grid = multislice_grid(shape, _two_slices_of_four())
    assert grid.shape == shape
    for replica in grid:  # one data index: an fsdp x tensor block, all on one slice
        assert len({d.slice_index for d in replica.ravel()}) == 1
    assert sorted(d.id for d in grid.ravel()) == list(range(8))


def test_data_must_cover_the_slices():
    with pytest.raises(ValueError, match="span 2 TPU slices, so mesh.data must be a multiple of 2"):
        multislice_grid((1, 8, 1), _two_slices_of_four())


def test_one_slice_or_no_slices_keeps_the_default_mesh():
    assert multislice_grid((2, 2, 2), [FakeTpu(i, 0, (i % 2, i // 2 % 2, i // 4)) for i in range(8)]) is None
    assert multislice_grid((8, 1, 1), jax.devices()) is None
