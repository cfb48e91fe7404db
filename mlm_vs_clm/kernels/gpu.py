"""Attention over packed rows on NVIDIA GPUs: cuDNN's packed layout instead of a dense mask.

A packed row holds several documents (segment ids 1, 2, .. in contiguous runs, 0 for the padded
tail), and a query may attend only inside its own segment. Through `jax.nn.dot_product_attention`
that restriction travels as a dense [B, 1, L, L] mask, which the cuDNN kernel reads as an
additive bias: it reads B*L*L bias values per layer, computes every (query, key) block of the
row, and its backward pass also computes the bias's gradient (jax always asks cuDNN for it),
which nobody uses. cuDNN's packed ("ragged") layout states the segments instead, as a start
offset and a length per segment, so the kernel reads no mask, skips every block between two
segments and computes no bias gradient. jax exposes that layout only in its cuDNN module
(`jax._src.cudnn.fused_attention_stablehlo`, Hopper GPUs and newer), which is what `attention`
calls.

The layout needs a static bound on the segments per row (`model.attention_max_segments`). A
batch with a row over the bound, or with a segment id in two separate runs, takes the dense
mask path instead (one `lax.cond` per layer), so the function computed never changes.
`docs/performance.md` ("On a GPU") has what it bought and what it costs (more temporary memory:
cuDNN keeps softmax statistics for all B*M segment slots); tests/test_gpu_ops.py checks the glue
against the dense mask, tools/perf/gpu_attention.py the kernel on a GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mlm_vs_clm.kernels import platform

# The kernel of the dense-mask fallback (tests on a CPU set "xla").
DENSE_IMPL = "cudnn"


@dataclasses.dataclass(frozen=True)
class PackedSegments:
    """cuDNN's description of a packed batch (see `packed_segments`)."""

    valid_BxL: jax.Array  # bool: the position belongs to a segment (not padding)
    lengths_BxM: jax.Array  # int32: length of segment m+1 of each row, -1 where there is none
    offsets_BxM1: jax.Array  # int32: start of segment m+1 of each row, -1 where there is none
    fits: jax.Array  # bool scalar: every segment is one run and none has an id over M


jax.tree_util.register_dataclass(
    PackedSegments, data_fields=["valid_BxL", "lengths_BxM", "offsets_BxM1", "fits"], meta_fields=[]
)


def cuda_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first device when the backend is an NVIDIA GPU, else None (a CPU, a
    TPU, or a GPU whose capability is not CUDA's `major.minor`, as ROCm's `gfx90a`)."""
    if platform.current() != "gpu" or jax.default_backend() != "gpu":
        return None
    capability = str(getattr(jax.devices()[0], "compute_capability", "") or "")
    try:
        major, minor = (int(x) for x in capability.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def packed_layout_available() -> bool:
    """Whether this jax has the cuDNN module with the packed layout (a private module: a jax
    without it makes `model.resolve_attention` pick the dense-mask cuDNN path instead)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn
    except ImportError:
        return False
    return hasattr(cudnn, "dot_product_attention") and hasattr(cudnn.MaskType, "PADDING_CAUSAL")


def packed_segments(segment_ids_BxL: jax.Array, max_segments: int) -> PackedSegments:
    """The lengths and start offsets of segments 1..M of every row, in the shapes cuDNN's packed
    layout takes ([B, M] and [B, M + 1], -1 for an absent segment), and whether they describe
    the batch exactly: every id in 1..M, each segment one contiguous run. M >= 2: jax reads a
    single segment slot as the unpacked layout (every row starting at position 0)."""
    if max_segments < 2:
        raise ValueError(f"attention_max_segments must be >= 2, got {max_segments}")
    seg_BxL = segment_ids_BxL.astype(jnp.int32)
    B, L = seg_BxL.shape
    ids_M = jnp.arange(1, max_segments + 1, dtype=jnp.int32)
    hit_BxLxM = seg_BxL[:, :, None] == ids_M
    pos_L = jnp.arange(L, dtype=jnp.int32)[None, :, None]
    lengths_BxM = jnp.sum(hit_BxLxM, axis=1, dtype=jnp.int32)
    first_BxM = jnp.min(jnp.where(hit_BxLxM, pos_L, L), axis=1)
    last_BxM = jnp.max(jnp.where(hit_BxLxM, pos_L, -1), axis=1)
    present_BxM = lengths_BxM > 0
    one_run = jnp.all(~present_BxM | (last_BxM - first_BxM + 1 == lengths_BxM))
    fits = one_run & (jnp.max(seg_BxL) <= max_segments)
    absent_Bx1 = jnp.full((B, 1), -1, jnp.int32)
    return PackedSegments(
        valid_BxL=seg_BxL > 0,
        lengths_BxM=jnp.where(present_BxM, lengths_BxM, -1),
        offsets_BxM1=jnp.concatenate([jnp.where(present_BxM, first_BxM, -1), absent_Bx1], axis=1),
        fits=fits,
    )


def cudnn_packed_kernel(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, packed: PackedSegments, causal: bool):
    """cuDNN attention inside each segment of `packed` (positions outside every segment are left
    unwritten: their values, and their gradients, are whatever the buffers held)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn
    except ImportError as e:  # pragma: no cover - depends on the installed jax
        raise RuntimeError(f"model.attention_impl=cudnn_packed: this jax ({jax.__version__}) has no cuDNN "
                           f"attention module ({e}); use attention_impl=cudnn") from None
    mask_type = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
    return cudnn.dot_product_attention(
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH,
        q_seqlen=packed.lengths_BxM, kv_seqlen=packed.lengths_BxM,
        q_offsets=packed.offsets_BxM1, kv_offsets=packed.offsets_BxM1,
        scale=q_BxLxNxH.shape[-1] ** -0.5, mask_type=mask_type,
    )


def attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_Bx1xLxL, packed: PackedSegments, causal: bool):
    """`jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)` for a mask made by
    `model.attention_mask`, through cuDNN's packed layout when `packed.fits`, else through cuDNN
    with the dense mask. Padding positions come out as zeros, with zero gradients."""

    valid = packed.valid_BxL[:, :, None, None]

    def packed_path(q, k, v):
        # The kernel leaves padding positions (in no segment) unwritten, forward and backward:
        # selecting zeros there keeps stale values out of the output and out of dq, dk, dv.
        q, k, v = (jnp.where(valid, t, jnp.zeros((), t.dtype)) for t in (q, k, v))
        return cudnn_packed_kernel(q, k, v, packed, causal)

    def dense_path(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask_Bx1xLxL, is_causal=causal, implementation=DENSE_IMPL)

    o = jax.lax.cond(packed.fits, packed_path, dense_path, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH)
    return jnp.where(valid, o, jnp.zeros((), o.dtype))
