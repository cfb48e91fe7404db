"""Attention: one dispatch over named backends, chosen once per model.

The model asks `resolve(cfg.attention_impl, dtype)` for a backend name and calls
`dot_product_attention(name, ...)`; only this module (and the kernels beside it) looks at the
device. Backends:
  'default'       `jax.nn.dot_product_attention` as it chooses (XLA's dense path);
  'xla', 'cudnn'  `jax.nn.dot_product_attention` with that implementation (a dense [B, 1, L, L] mask);
  'cudnn_packed'  cuDNN with packed segments, no [L, L] mask (kernels/gpu.py; Hopper or newer);
  'cpu_ops'       16-bit attention on a CPU's bf16 units (kernels/cpu.py);
  'splash'        Pallas's splash attention with the rows' segment ids, no [L, L] mask
                  (kernels/tpu.py; TPUs, and any other device in Pallas's slow interpret mode).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlm_vs_clm.kernels import cpu, gpu, platform, tpu

# What `model.attention_impl` may name ('' = chosen by device and dtype).
ATTENTION_IMPLS = ("", "xla", "cudnn", "cudnn_packed", "splash")


def resolve(impl: str, dtype) -> str:
    """The backend a model runs: `impl` when set, else by the target platform (kernels/platform.py)
    and dtype: 'splash' (a TPU, any dtype), 'cpu_ops' (16-bit on a CPU), 'cudnn_packed' (16-bit on
    a Hopper or newer NVIDIA GPU), 'cudnn' (16-bit on an Ampere GPU, or on Hopper with a jax that
    lacks the packed layout), or 'default'."""
    if impl:
        return impl
    if platform.current() == "tpu":
        return "splash"
    dtype = jnp.dtype(dtype)
    if cpu.wanted(dtype):
        return "cpu_ops"
    capability = gpu.cuda_compute_capability()
    if capability is not None and dtype.itemsize == 2:
        if capability >= (9, 0) and gpu.packed_layout_available():
            return "cudnn_packed"
        return "cudnn" if capability >= (8, 0) else "default"
    return "default"


def prepare(backend: str, segment_ids_BxL, max_segments: int):
    """What a backend needs from the segment ids beyond the dense mask, computed once per forward
    pass and shared by every layer (None for backends that need nothing)."""
    if backend == "cudnn_packed":
        return gpu.packed_segments(segment_ids_BxL, max_segments)
    if backend == "splash":
        return segment_ids_BxL
    return None


def dot_product_attention(backend: str, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_Bx1xLxL, prepared, causal: bool):
    """Attention output [B, L, N, H]; grouped queries (K divides N); `mask_Bx1xLxL` keeps a query
    inside its segment and off padding, `causal` adds the triangle."""
    if backend == "cpu_ops":
        if causal:
            L = mask_Bx1xLxL.shape[-1]
            mask_Bx1xLxL = mask_Bx1xLxL & jnp.tril(jnp.ones((L, L), bool))
        groups = q_BxLxNxH.shape[2] // k_BxLxKxH.shape[2]  # kv head n // groups serves query head n
        return cpu.attention(
            q_BxLxNxH, jnp.repeat(k_BxLxKxH, groups, axis=2), jnp.repeat(v_BxLxKxH, groups, axis=2), mask_Bx1xLxL
        )
    if backend == "splash":
        return tpu.attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, prepared, causal)
    if backend == "cudnn_packed":
        return gpu.attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_Bx1xLxL, prepared, causal)
    return jax.nn.dot_product_attention(
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask=mask_Bx1xLxL, is_causal=causal,
        implementation=None if backend == "default" else backend,
    )
