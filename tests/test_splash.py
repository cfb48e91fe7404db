"""Splash attention (kernels/tpu.py) against XLA's attention with the dense segment mask, run in
Pallas's interpret mode on a CPU: forward and gradients, causal and bidirectional, several
segments per row, padding, grouped queries; f32 and bf16.

Bounds come from rounding, not from this CPU. Both sides compute, for every query, an H-term dot
per score, a softmax over at most L keys and an L-term weighted sum; their orders of summation
differ (the kernel goes block by block with running statistics). With `accum_tol` (tests/
helpers.py: two n-term sums in a format with epsilon eps differ by at most n*eps times the sum
of the terms' magnitudes), the bounds below take each quantity's magnitude sum from an f64
recomputation and the number of terms it adds; a score error e moves a softmax weight p by at
most 2*p*e. In bf16 the kernel also rounds its inputs' products' weights (p and dS) to bf16
before the second product (eps16 relative each) and its outputs (eps16/2).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import EPS16, EPS32, accum_tol
from jax.sharding import AxisType

from mlm_vs_clm import model
from mlm_vs_clm.kernels import tpu

B, L, N, K, H = 2, 256, 4, 2, 64  # H = 64: the 1/sqrt(H) scaling is exact in bf16
BLOCK = 128  # 2 x 2 blocks per head: the online softmax crosses blocks, segments cross block edges


def _segments():
    seg = np.zeros((B, L), np.int32)
    seg[0, :100], seg[0, 100:160], seg[0, 160:210] = 1, 2, 3  # three documents, then padding
    seg[1, :130], seg[1, 130:] = 1, 2  # two documents, no padding
    return seg


def _inputs(dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, L, N, H), jnp.float32)
    k = jax.random.normal(keys[1], (B, L, K, H), jnp.float32)
    v = jax.random.normal(keys[2], (B, L, K, H), jnp.float32)
    w = jax.random.normal(keys[3], (B, L, N, H), jnp.float32)  # the loss sum(o * w): its gradient do = w
    return tuple(x.astype(dtype) for x in (q, k, v)) + (w,)


def _xla(q, k, v, seg, causal):
    o = jax.nn.dot_product_attention(q, k, v, mask=model.attention_mask(jnp.asarray(seg)), is_causal=causal,
                                     implementation="xla")
    return jnp.where((jnp.asarray(seg) > 0)[:, :, None, None], o, 0)


def _splash(q, k, v, seg, causal):
    return tpu.splash(q, k, v, jnp.asarray(seg), causal, block=BLOCK, interpret=True)


def _value_and_grads(fn, q, k, v, w, seg, causal):
    def loss(q, k, v):
        o = fn(q, k, v, seg, causal)
        return jnp.sum(o.astype(jnp.float32) * w), o

    (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return [np.asarray(x, np.float64) for x in (o, *grads)]


def _magnitudes(q, k, v, w, seg, causal):
    """f64 sums of the magnitudes of the terms behind o, dq, dk, dv, and the largest |score|."""
    q, k, v, w = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v, w))
    g = N // K
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("blnh,bmnh->bnlm", q, k) / np.sqrt(H)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    if causal:
        allowed &= np.tril(np.ones((L, L), bool))
    allowed = allowed[:, None]
    s_max = float(np.max(np.einsum("blnh,bmnh->bnlm", np.abs(q), np.abs(k)) / np.sqrt(H) * allowed))
    p = np.where(allowed, np.exp(np.where(allowed, s, -np.inf) - np.max(np.where(allowed, s, -1e30), -1,
                                                                        keepdims=True)), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    valid = (seg > 0)[:, None, :, None]
    do = np.where(valid, np.moveaxis(w, 2, 1), 0.0)  # [b, n, l, h]; padding outputs are zeroed
    o = np.einsum("bnlm,bmnh->bnlh", p, v)
    dp = np.einsum("bnlh,bmnh->bnlm", do, v)
    delta = np.sum(do * o, -1, keepdims=True)
    mag_ds = p * (np.einsum("bnlh,bmnh->bnlm", np.abs(do), np.abs(v)) + np.sum(np.abs(do * o), -1, keepdims=True)
                  + np.abs(dp - delta))
    mag_o = np.einsum("bnlm,bmnh->blnh", p, np.abs(v))
    mag_dq = np.einsum("bnlm,bmnh->blnh", mag_ds, np.abs(k)) / np.sqrt(H)
    group = lambda x: x.reshape(B, L, K, g, H).sum(3)  # a kv head sums over its group of query heads
    mag_dk = group(np.einsum("bnlm,blnh->bmnh", mag_ds, np.abs(q)) / np.sqrt(H))
    mag_dv = group(np.einsum("bnlm,bnlh->bmnh", p, np.abs(do)))
    return s_max, (mag_o, mag_dq, mag_dk, mag_dv)


def _bound(s_max, mag, bf16):
    """Max |difference| allowed between one side and XLA's f32 attention, elementwise. Each dot
    sum has at most L * (N/K) + H terms; a score error (relative accum_tol of s_max) moves a
    weight p by at most 2*p*(score error). In bf16 the kernel rounds its cotangent (do), its
    weights before their second product (p, dS) and its results: eps16/2 relative each, at most
    four on one path."""
    f32 = accum_tol(L * (N // K) + H, EPS32) * (1 + 2 * s_max)
    per_side = f32 + (4 * EPS16 / 2 if bf16 else 0.0)
    return (per_side + f32) * mag  # this side + XLA's f32 side


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_splash_matches_xla_attention_forward_and_gradients(causal, dtype):
    q, k, v, w = _inputs(jnp.dtype(dtype))
    seg = _segments()
    got = _value_and_grads(_splash, q, k, v, w, seg, causal)
    want = _value_and_grads(_xla, *(x.astype(jnp.float32) for x in (q, k, v)), w, seg, causal)
    s_max, mags = _magnitudes(q, k, v, w, seg, causal)
    for name, g, r, mag in zip(("o", "dq", "dk", "dv"), got, want, mags):
        bound = _bound(s_max, mag, bf16=dtype == "bfloat16")
        excess = np.abs(g - r) - bound
        assert np.all(excess <= 0), (name, float(np.max(np.abs(g - r))), float(np.max(excess)))
        if name == "o":  # not vacuous: the bound is well below the outputs (a wrong mask is not within it)
            assert np.median(bound) < (0.05 if dtype == "float32" else 0.25) * np.median(np.abs(r))
    # padding: zero output and zero gradients of the padded positions' q, k, v
    pad = seg == 0
    for x in got:
        assert np.all(x[pad] == 0)


def test_splash_under_a_mesh_runs_in_shard_map_and_matches():
    """On a 2 x 2 mesh (rows over data x fsdp... here 'data' and 'tensor' for the heads), the
    shard_map'd kernel gives the unsharded result."""
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 CPU devices (tests/conftest.py sets them)")
    mesh = jax.sharding.Mesh(np.asarray(devices[:4]).reshape(2, 1, 2), ("data", "fsdp", "tensor"),
                             axis_types=(AxisType.Auto,) * 3)
    rules = (("activation_batch", ("data", "fsdp")), ("activation_length", None), ("activation_heads", "tensor"))
    q, k, v, _ = _inputs(jnp.float32)
    seg = jnp.asarray(_segments())
    want = tpu.splash(q, k, v, seg, True, block=BLOCK, interpret=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fn = jax.jit(lambda q, k, v, s: tpu.attention(q, k, v, s, True, block=BLOCK, interpret=True))
        text = fn.lower(q, k, v, seg).as_text()
        got = fn(q, k, v, seg)
    assert "shard_map" in text or "sdy.manual_computation" in text
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_block_sizes():
    assert tpu.block_size(2048) == 1024 and tpu.block_size(2048, 512) == 512
    assert tpu.block_size(384) == 128 and tpu.block_size(128) == 128
    assert tpu.supported(2048) and not tpu.supported(64)
    with pytest.raises(ValueError, match="multiple of 128"):
        tpu.block_size(200)
