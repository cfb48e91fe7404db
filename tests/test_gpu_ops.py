"""cuDNN packed-layout attention (mlm_vs_clm/kernels/gpu.py), checked on a CPU.

The cuDNN kernel itself runs only on a GPU (tools/perf/gpu_attention.py checks it there). Here:
the segment description against numpy, the call into jax's cuDNN module traced with its device
checks stubbed, and the glue (padding, fallback, the model's plumbing) with a stand-in kernel that
computes attention per segment and leaves NaN wherever cuDNN leaves a buffer unwritten.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm_vs_clm import bench, model
from mlm_vs_clm.kernels import cpu as cpu_kernels
from mlm_vs_clm.kernels import gpu as gpu_ops
from tests.helpers import tiny_config


def _segments(batch=4, length=256, seed=3):
    return bench.synthetic_batch(batch, length, 100, seed=seed)["segment_ids"]


def test_packed_segments_match_numpy():
    seg = _segments()
    p = gpu_ops.packed_segments(jnp.asarray(seg), 8)
    assert p.lengths_BxM.shape == (4, 8) and p.offsets_BxM1.shape == (4, 9)
    assert bool(p.fits)
    for b, row in enumerate(seg):
        ids = [i for i in np.unique(row) if i > 0]
        for m in range(8):
            if m + 1 in ids:
                where = np.nonzero(row == m + 1)[0]
                assert p.lengths_BxM[b, m] == len(where) and p.offsets_BxM1[b, m] == where[0]
            else:
                assert p.lengths_BxM[b, m] == -1 and p.offsets_BxM1[b, m] == -1
        assert p.offsets_BxM1[b, 8] == -1
    np.testing.assert_array_equal(p.valid_BxL, seg > 0)


def test_packed_segments_need_two_slots():
    with pytest.raises(ValueError, match="attention_max_segments must be >= 2"):
        gpu_ops.packed_segments(jnp.ones((1, 8), jnp.int32), 1)


def test_packed_segments_fit_only_what_they_describe():
    seg = _segments()
    assert seg.max() > 2
    assert not bool(gpu_ops.packed_segments(jnp.asarray(seg), 2).fits)  # a row over the bound
    split = np.array([[1, 1, 2, 2, 1, 1, 0, 0]], np.int32)  # segment 1 in two runs
    assert not bool(gpu_ops.packed_segments(jnp.asarray(split), 8).fits)
    ok = np.array([[1, 1, 2, 2, 3, 3, 0, 0]], np.int32)
    assert bool(gpu_ops.packed_segments(jnp.asarray(ok), 8).fits)


def test_kernel_call_takes_the_packed_layout(monkeypatch):
    """Traced on a CPU with the device checks stubbed: the call jax's cuDNN module receives."""
    cudnn = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    packed = gpu_ops.packed_segments(jnp.asarray(_segments(2, 256)), 8)
    q = jnp.ones((2, 256, 4, 64), jnp.bfloat16)
    kv = jnp.ones((2, 256, 2, 64), jnp.bfloat16)
    for causal, mask_type in ((True, "PADDING_CAUSAL"), (False, "PADDING")):
        def f(q, k, v, causal=causal):
            return gpu_ops.cudnn_packed_kernel(q, k, v, packed, causal).astype(jnp.float32).sum()

        text = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, kv, kv))
        assert f"mask_type=MaskType.{mask_type}" in text
        assert "i32[2,8]" in text and "i32[2,9]" in text  # lengths [B, M], offsets [B, M + 1]
        assert "variadic_args=(False, False)" in text  # no bias, so no bias gradient
        assert "scale=0.125" in text and "dot_product_attention_bwd_wrapper" in text


def _stand_in_kernel(q, k, v, packed, causal):
    """Attention inside the segments that `packed` describes (built from its offsets and lengths
    alone), NaN outside every segment in the output and in dq, dk, dv."""
    L = q.shape[1]
    pos = jnp.arange(L)
    start, length = packed.offsets_BxM1[:, :-1, None], packed.lengths_BxM[:, :, None]
    inside_BxMxL = (pos >= start) & (pos < start + length) & (length > 0)
    seg_BxL = jnp.where(inside_BxMxL.any(1), jnp.argmax(inside_BxMxL, axis=1), -1)
    covered = (seg_BxL >= 0)[:, :, None, None]
    mask = ((seg_BxL[:, :, None] == seg_BxL[:, None, :]) & (seg_BxL[:, None, :] >= 0))[:, None]

    # mask and coverage enter as arguments (a custom VJP must not close over traced values).
    attend = lambda q, k, v, mask: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                                                implementation="xla")

    @jax.custom_vjp
    def kernel(q, k, v, mask, covered):
        return jnp.where(covered, attend(q, k, v, mask), jnp.nan)

    def fwd(q, k, v, mask, covered):
        return kernel(q, k, v, mask, covered), (q, k, v, mask, covered)

    def bwd(res, g):
        q, k, v, mask, covered = res
        _, vjp = jax.vjp(lambda *a: attend(*a, mask), q, k, v)
        grads = tuple(jnp.where(covered, d, jnp.nan) for d in vjp(jnp.where(covered, g, 0)))
        return (*grads, np.zeros(mask.shape, jax.dtypes.float0), np.zeros(covered.shape, jax.dtypes.float0))

    kernel.defvjp(fwd, bwd)
    return kernel(q, k, v, mask, covered)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(gpu_ops, "cudnn_packed_kernel", _stand_in_kernel)
    monkeypatch.setattr(gpu_ops, "DENSE_IMPL", "xla")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("max_segments", [8, 2])  # 2: the dense fallback
def test_attention_matches_dense_mask(stand_in, causal, max_segments):
    seg = jnp.asarray(_segments())
    mask, valid = model.attention_mask(seg), (seg > 0)[:, :, None, None]
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (4, 256, 4, 16))
    k, v = (jax.random.normal(key, (4, 256, 2, 16)) for key in ks[1:3])
    w = jax.random.normal(ks[3], q.shape) * valid
    packed = gpu_ops.packed_segments(seg, max_segments)

    def ours(q, k, v):
        o = gpu_ops.attention(q, k, v, mask, packed, causal)
        return jnp.sum(o * w), o

    def ref(q, k, v):
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla") * valid
        return jnp.sum(o * w), o

    (_, o), grads = jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, o_ref), grads_ref = jax.value_and_grad(ref, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert bool(packed.fits) == (max_segments == 8)
    np.testing.assert_allclose(o, o_ref, atol=1e-5)
    assert float(jnp.abs(jnp.where(valid, 0, o)).max()) == 0.0  # padding comes out as zeros
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_model_with_packed_attention_matches_xla(stand_in):
    """The model's plumbing (segments computed once, broadcast through the scanned, rematerialised
    layers): the loss and gradients equal those of XLA's attention with the dense mask."""
    batch = bench.synthetic_batch(2, 64, tiny_config().model.vocab_size, seed=1)
    assert (batch["segment_ids"] == 0).any() and batch["segment_ids"].max() > 1
    grads = {}
    for impl in ("xla", "cudnn_packed"):
        c = tiny_config()
        c.model.attention_impl, c.model.remat_policy, c.model.attention_max_segments = impl, "dots_no_batch", 4
        cfg = model.ModelConfig.from_config(c.model)
        params = nn.meta.unbox(model.init_params(cfg, jax.random.PRNGKey(0)))
        lm = model.LanguageModel(cfg)
        valid = batch["segment_ids"] > 0

        def loss(p, lm=lm, valid=valid):
            logits = lm.apply({"params": p}, batch["tokens"], batch["segment_ids"], batch["positions"], "causal")
            return jnp.sum(jnp.where(valid[..., None], logits, 0) ** 2) / valid.sum()

        grads[impl] = jax.value_and_grad(loss)(params)
    (l_xla, g_xla), (l_packed, g_packed) = grads["xla"], grads["cudnn_packed"]
    assert np.isfinite(l_xla) and all(np.isfinite(g).all() for g in jax.tree.leaves(g_xla))
    np.testing.assert_allclose(l_packed, l_xla, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g_packed, g_xla)


def test_resolve_attention_by_device_and_dtype(monkeypatch):
    def resolve(dtype, impl="", capability=None, cpu=False):
        monkeypatch.setattr(gpu_ops, "cuda_compute_capability", lambda: capability)
        monkeypatch.setattr(cpu_kernels, "wanted", lambda d: cpu and jnp.dtype(d).itemsize == 2)
        return model.resolve_attention(model.ModelConfig(8, 8, 1, 1, 1, 8, dtype=dtype, attention_impl=impl))

    assert resolve("float32") == "default"
    assert resolve("bfloat16", cpu=True) == "cpu_ops"
    assert resolve("float32", cpu=True) == "default"
    assert resolve("float32", "cudnn_packed") == "cudnn_packed"
    assert resolve("bfloat16", "xla", capability=(9, 0)) == "xla"
    assert resolve("bfloat16", capability=(9, 0)) == "cudnn_packed"
    monkeypatch.setattr(gpu_ops, "packed_layout_available", lambda: False)
    assert resolve("bfloat16", capability=(9, 0)) == "cudnn"  # a jax without the packed layout
    monkeypatch.undo()
    assert resolve("bfloat16", capability=(8, 0)) == "cudnn"
    assert resolve("bfloat16", capability=(7, 5)) == "default"
    assert resolve("float32", capability=(9, 0)) == "default"


def test_sharded_train_steps_with_packed_attention_match_xla(stand_in):
    """Train steps on a 2x2x2 (data, fsdp, tensor) mesh: the packed path's glue (segments from
    batch-sharded ids, the per-layer cond) gives XLA attention's losses, CLM and MLM."""
    from mlm_vs_clm import sharding, step, train_state
    from mlm_vs_clm.schedules import Objective
    from tests.helpers import packed_batch

    batch = packed_batch(segments=(12, 8, 6))
    losses = {}
    for impl in ("xla", "cudnn_packed"):
        c = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.attention_impl": impl,
                           "model.attention_max_segments": 4})
        setup = train_state.build(c, sharding.make_mesh(c.mesh, jax.devices()[:8]))
        state = train_state.init_state(setup, c.seed)
        losses[impl] = []
        for obj in (Objective("clm"), Objective("mlm", 0.4), Objective("clm")):
            state, metrics = step.compiled_train_step(setup, obj)(state, batch)
            losses[impl].append(float(metrics["loss"]))
    assert all(np.isfinite(losses["cudnn_packed"]))
    np.testing.assert_allclose(losses["cudnn_packed"], losses["xla"], rtol=1e-5)
