"""Matmul, attention and RoPE's rotation for 16-bit compute on XLA's CPU backend.

XLA's CPU matmul kernels (YNNPACK) run bf16 operands on the AMX / AVX512-BF16 units only when
the product accumulates into an f32 result and neither operand is a transpose; any other bf16
dot runs on the much slower f32 path (`python tools/perf/matmul_rates.py`; docs/performance.md). Autodiff of the
plain model breaks both rules: bf16 results, f32 cotangents, and gradients such as x^T @ dy
whose operand is a transpose. The functions here state their backward passes by hand so that
every product of a training step takes the fast path. They compute the same functions as
`x @ kernel` and `jax.nn.dot_product_attention` (tests/test_model.py); `docs/performance.md`,
"bf16 on a CPU", has what they bought. f32 models never use them (no gain measured there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mlm_vs_clm.kernels import platform

F32 = jnp.float32


def wanted(dtype) -> bool:
    """Whether a model computing in `dtype` takes these functions: 16-bit compute on a CPU."""
    return jnp.dtype(dtype).itemsize == 2 and platform.current() == "cpu"


def standalone_transpose(x, axes=(1, 0)):
    """x transposed by `axes`, as an array of its own that XLA cannot fold back into a dot.

    XLA's CPU backend sends a dot whose operand is a transpose (folded into the dot or not, even
    behind an optimization barrier, which it removes first) to its f32 path. A matrix whose sides
    divide into blocks is transposed block-wise ([A, B] -> [A/b, b, B/b, b] -> [B/b, b, A/b, b]),
    which XLA keeps as written and runs as a fast copy. Otherwise a pad of the last axis by one
    and a slice back does the same; it is slower for bf16, whose pad XLA computes in f32."""
    if tuple(axes) == (1, 0):
        a, b = x.shape
        block = next((n for n in (64, 32, 16, 8) if a % n == 0 and b % n == 0), None)
        if block is not None:
            blocks = x.reshape(a // block, block, b // block, block)
            return jnp.transpose(blocks, (2, 3, 0, 1)).reshape(b, a)
    xt = jnp.transpose(x, axes)
    padded = jnp.pad(xt, [(0, 0)] * (xt.ndim - 1) + [(0, 1)])
    return jax.lax.slice(padded, (0,) * xt.ndim, xt.shape)


def _dot(a, b, contract, batch=0):
    """a . b over a's axis contract[0] and b's axis contract[1], the first `batch` axes batched,
    accumulated (and returned) in f32."""
    batch_axes = tuple(range(batch))
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), (batch_axes, batch_axes)),
                               preferred_element_type=F32)


@functools.cache
def matmul(dtype: str, param_dtype: str):
    """(x [T, I] in `dtype`, kernel [I, O] in `param_dtype`) -> x @ kernel [T, O] in `dtype`.

    Backward: d x = d y . kernel over O (the kernel as stored), d kernel = x^T @ d y with x^T
    standalone; the kernel's gradient stays f32 from the accumulator to the master weights."""
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)

    def forward(x_TxI, kernel_IxO):
        kernel_IxO = kernel_IxO.astype(dtype)
        return _dot(x_TxI, kernel_IxO, (1, 0)).astype(dtype), (x_TxI, kernel_IxO)

    def backward(res, dy_TxO):
        x_TxI, kernel_IxO = res
        dy_TxO = dy_TxO.astype(dtype)
        dx_TxI = _dot(dy_TxO, kernel_IxO, (1, 1))
        dkernel_IxO = _dot(standalone_transpose(x_TxI), dy_TxO, (1, 0))
        return dx_TxI.astype(dtype), dkernel_IxO.astype(param_dtype)

    fn = jax.custom_vjp(lambda x_TxI, kernel_IxO: forward(x_TxI, kernel_IxO)[0])
    fn.defvjp(forward, backward)
    return fn


@jax.custom_vjp
def rotate_half(x):
    """[x1, x2] -> [-x2, x1] along the last axis (RoPE's rotation), as a product with a signed
    permutation matrix (exact in any dtype). In a bf16 step the slices and the concatenation,
    fused by XLA with the casts and the heads-first transposes around them, cost more than this
    small product (`tools/perf/cpu_ops_ab.py`). Its transpose is minus itself, which is the
    backward pass (in x's dtype, so that it too stays on the bf16 path)."""
    h = x.shape[-1]
    half = jnp.arange(h // 2)
    rotation = jnp.zeros((h, h), x.dtype).at[half + h // 2, half].set(-1).at[half, half + h // 2].set(1)
    return _dot(x, rotation, (x.ndim - 1, 0)).astype(x.dtype)


rotate_half.defvjp(lambda x: (rotate_half(x), None), lambda _, g: (-rotate_half(g),))


_HEADS_FIRST = (0, 2, 1, 3)  # [B, L, N, H] <-> [B, N, L, H]
_KEYS_FIRST = (0, 1, 3, 2)  # [B, N, Lq, Lk] -> [B, N, Lk, Lq]


@jax.custom_vjp
def attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, mask_Bx1xLxL):
    """softmax(q k^T / sqrt(H), where mask) v over [B, L, N, H] inputs (as many kv heads as query
    heads; repeat them first for grouped queries), a boolean mask [B, 1, L, L] (causality
    included). Softmax in f32, probabilities rounded to the compute dtype for the products."""
    return _attention_forward(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, mask_Bx1xLxL)[0]


def _attention_forward(q, k, v, mask):
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5
    qt = standalone_transpose(q, _HEADS_FIRST)  # [B, N, L, H]
    kt = standalone_transpose(k, _HEADS_FIRST)
    vt = standalone_transpose(v, _HEADS_FIRST)
    s = _dot(qt, kt, (3, 3), batch=2) * scale  # [B, N, Lq, Lk], scaled in f32
    s = jnp.where(mask, s, jnp.finfo(F32).min)
    p = jax.nn.softmax(s, axis=-1).astype(dtype)
    o = _dot(p, vt, (3, 2), batch=2)  # [B, N, Lq, H]
    out = jnp.transpose(o.astype(dtype), _HEADS_FIRST)
    return out, (qt, kt, vt, p, o, mask)


def _attention_backward(res, dout):
    qt, kt, vt, p, o, mask = res
    dtype = qt.dtype
    scale = qt.shape[-1] ** -0.5
    dot_ = standalone_transpose(dout.astype(dtype), _HEADS_FIRST)  # [B, N, Lq, H]
    dv = _dot(standalone_transpose(p, _KEYS_FIRST), dot_, (3, 2), batch=2)  # [B, N, Lk, H]
    dp = _dot(dot_, vt, (3, 3), batch=2)  # [B, N, Lq, Lk]
    rows = jnp.sum(dot_.astype(F32) * o, axis=-1, keepdims=True)
    ds = jnp.where(mask, p.astype(F32) * (dp - rows), 0.0).astype(dtype)
    dq = _dot(ds, kt, (3, 2), batch=2) * scale
    dk = _dot(standalone_transpose(ds, _KEYS_FIRST), qt, (3, 2), batch=2) * scale
    back = lambda x: jnp.transpose(x.astype(dtype), _HEADS_FIRST)
    return back(dq), back(dk), back(dv), None


attention.defvjp(_attention_forward, _attention_backward)
