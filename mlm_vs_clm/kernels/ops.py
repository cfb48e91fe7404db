"""The model's and the loss's other device-dependent choices, behind device-free names:
2-D projections, the rotary half-rotation, a transposed operand, and the embedding gradient's
accumulation dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlm_vs_clm.kernels import cpu, platform

EMBED_GRAD_F32 = ("auto", "on", "off")  # model.embed_grad_f32


def sixteen_bit_on_cpu(dtype) -> bool:
    """16-bit compute on a CPU: products go through kernels/cpu.py to run on the bf16 units."""
    return cpu.wanted(jnp.dtype(dtype))


def matmul(x_TxI, kernel_IxO, dtype):
    """[T, I] @ [I, O] in the compute `dtype`."""
    dtype = jnp.dtype(dtype)
    if cpu.wanted(dtype):
        return cpu.matmul(dtype.name, kernel_IxO.dtype.name)(x_TxI, kernel_IxO)
    return x_TxI @ kernel_IxO.astype(dtype)


def rotate_half(x_BxLxNxH):
    """[-x2, x1] of the two halves of the last axis (rotary embeddings)."""
    if cpu.wanted(x_BxLxNxH.dtype):
        return cpu.rotate_half(x_BxLxNxH)
    half = x_BxLxNxH.shape[-1] // 2
    return jnp.concatenate([-x_BxLxNxH[..., half:], x_BxLxNxH[..., :half]], axis=-1)


def transposed_operand(h_TxD, dtype):
    """h^T [D, T] as an array of its own, so that the product it feeds runs as a plain GEMM."""
    h_TxD = h_TxD.astype(dtype)
    if cpu.wanted(jnp.dtype(dtype)):
        return cpu.standalone_transpose(h_TxD)
    return jax.lax.optimization_barrier(h_TxD.T)


def dot_accumulation():
    """`preferred_element_type` of a 16-bit product: f32 on a CPU (its bf16 units give f32
    results; a bf16 result sends the dot to XLA's f32 path), the compiler's choice elsewhere."""
    return jnp.float32 if platform.current() == "cpu" else None


def embed_grad_f32(setting: str) -> bool:
    """Whether a 16-bit embedding's gradient is summed in f32 (`model.embed_grad_f32`): 'auto'
    does so on GPUs and TPUs, where 16-bit scatter-adds are compare-and-swap loops, and not on a
    CPU, where autodiff's 16-bit scatter-add is faster (docs/performance.md)."""
    if setting not in EMBED_GRAD_F32:
        raise ValueError(f"model.embed_grad_f32: unknown setting {setting!r} (one of {', '.join(EMBED_GRAD_F32)})")
    if setting == "auto":
        return platform.current() != "cpu"
    return setting == "on"
