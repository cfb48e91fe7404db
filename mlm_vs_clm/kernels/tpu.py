"""Attention over packed rows on TPUs: Pallas's splash attention instead of a dense mask.

Through `jax.nn.dot_product_attention`, XLA's TPU path materialises the [B, N, L, L] scores of
every layer (and the [B, 1, L, L] segment mask). Splash attention
(`jax.experimental.pallas.ops.tpu.splash_attention`) is a flash-attention kernel: it walks the
(query block, key block) grid keeping running softmax statistics, skips the blocks that its
static mask rules out (the upper triangle for CLM, `CausalMask`; nothing for MLM, `FullMask`),
and applies the packed rows' segment ids (`SegmentIds`) inside each block it computes.

- Grouped queries: the kernel takes N query heads and K kv heads (K divides N) as they are.
- Padding (segment 0): the kernel lets padding attend to padding, where the dense mask of
  `model.attention_mask` leaves a padding query with no key at all; padding outputs are set
  to zero here, so nothing of them reaches the loss or the gradients (as in kernels/gpu.py).
- Sharding: a Pallas kernel is opaque to XLA's partitioner, so under a mesh it runs inside
  `jax.shard_map`: rows split as the model's `activation_batch` axis, heads as
  `activation_heads` (the logical-axis rules of the config), each device on its own rows.
- Off a TPU (tests on a CPU) the kernel runs in Pallas's interpret mode: same function, slow.
- Rows must be a multiple of 128 long (the kernel's tile); shorter rows take XLA's attention.

Block sizes: `block_sizes` (chosen in docs/scaling.md, "Splash attention").
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mlm_vs_clm.kernels import platform

# Query/key block of the forward and backward kernels, by sequence length: the largest block
# that divides the length, up to BLOCK. 1024 for the study's rows of 2,048 (210m: head dim 64;
# 1b: 96, grouped): 2,048 exceeds the kernel's scoped VMEM on v5e and v5p, and of the blocks
# that compile, 1,024 has 4x fewer grid steps than 512 for 1.2x the causal work
# (docs/scaling.md, "Splash attention").
BLOCK = 1024


def _splash():
    # Imported on first use: the module pulls in Pallas's TPU (Mosaic) lowering, which a model
    # that never runs splash attention does not need.
    from jax.experimental.pallas.ops.tpu import splash_attention

    return splash_attention


def supported(seq_len: int) -> bool:
    """Whether the kernel takes rows of this length: a multiple of 128, its smallest tile."""
    return seq_len % 128 == 0


def block_size(seq_len: int, limit: int = BLOCK) -> int:
    """The largest power-of-two block in [128, limit] that divides seq_len."""
    b = limit
    while b > 128 and seq_len % b:
        b //= 2
    if seq_len % b:
        raise ValueError(f"splash attention: sequence length {seq_len} is not a multiple of 128")
    return b


def block_sizes(seq_len: int, block: int = BLOCK):
    """`BlockSizes` for one sequence length: the same block for the forward, dq and dkv kernels."""
    b = block_size(seq_len, block)
    return _splash().BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )


@functools.cache
def _kernel(num_heads: int, seq_len: int, causal: bool, block: int, interpret: bool):
    sa = _splash()
    one = sa.CausalMask((seq_len, seq_len)) if causal else sa.FullMask((seq_len, seq_len))
    mask = sa.MultiHeadMask([one] * num_heads)
    return sa.make_splash_mha(
        mask, block_sizes=block_sizes(seq_len, block), head_shards=1, q_seq_shards=1, interpret=interpret
    )


def splash(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, causal: bool, block: int = BLOCK,
           interpret: bool | None = None):
    """Attention output [B, L, N, H] of the rows on this device (no sharding): softmax(q k^T /
    sqrt(H)) v inside each segment, causal or not; zeros at padding (segment 0)."""
    if interpret is None:
        interpret = platform.current() != "tpu"
    B, L, N, H = q_BxLxNxH.shape
    kernel = _kernel(N, L, causal, block, interpret)
    scale = jnp.asarray(H**-0.5, q_BxLxNxH.dtype)
    q_BxNxLxH = jnp.swapaxes(q_BxLxNxH * scale, 1, 2)
    k_BxKxLxH, v_BxKxLxH = jnp.swapaxes(k_BxLxKxH, 1, 2), jnp.swapaxes(v_BxLxKxH, 1, 2)
    seg_BxL = segment_ids_BxL.astype(jnp.int32)
    segments = _splash().SegmentIds(q=seg_BxL, kv=seg_BxL)
    o_BxNxLxH = jax.vmap(kernel)(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, segments)
    o_BxLxNxH = jnp.swapaxes(o_BxNxLxH, 1, 2).astype(q_BxLxNxH.dtype)
    return jnp.where((seg_BxL > 0)[:, :, None, None], o_BxLxNxH, jnp.zeros((), o_BxLxNxH.dtype))


def attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, causal: bool, block: int = BLOCK,
              interpret: bool | None = None):
    """`splash` on the rows of every device: inside `jax.shard_map` over the context mesh (set by
    `jax.set_mesh`), rows and heads split as the logical-axis rules split the model's
    activations; a plain call without a mesh. Rows whose length is not a multiple of 128 (the
    `tiny` preset's) take XLA's attention with the dense segment mask instead."""
    if not supported(q_BxLxNxH.shape[1]):
        seg = segment_ids_BxL
        mask_Bx1xLxL = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0))[:, None]
        o = jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask=mask_Bx1xLxL, is_causal=causal)
        return jnp.where((seg > 0)[:, :, None, None], o, jnp.zeros((), o.dtype))
    fn = functools.partial(splash, causal=causal, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)
    batch, _, heads, _ = nn.logical_to_mesh_axes(("activation_batch", "activation_length", "activation_heads", None))
    qkv = P(batch, None, heads, None)
    return jax.shard_map(fn, in_specs=(qkv, qkv, qkv, P(batch, None)), out_specs=qkv, check_vma=False)(
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL
    )
