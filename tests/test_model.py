import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm_vs_clm.config import load_config
from mlm_vs_clm.model import LanguageModel, ModelConfig, count_params, init_params
from tests.helpers import accum_tol, packed_batch, tiny_config


@pytest.fixture(scope="module")
def model_and_params():
    cfg = ModelConfig.from_config(tiny_config().model)
    params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(0)))
    return LanguageModel(cfg), params


def _logits(mp, batch, mode):
    model, params = mp
    return np.asarray(
        model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"], mode)
    )


def test_causal_output_ignores_later_tokens(model_and_params):
    b = packed_batch(batch=2, segments=(32,), pad_tail=False)
    changed = {k: v.copy() for k, v in b.items()}
    changed["tokens"][:, 20:] = 7
    a, c = _logits(model_and_params, b, "causal"), _logits(model_and_params, changed, "causal")
    np.testing.assert_allclose(a[:, :20], c[:, :20], atol=1e-5)
    assert np.abs(a[:, 20:] - c[:, 20:]).max() > 1e-3


def test_bidirectional_output_sees_later_tokens(model_and_params):
    b = packed_batch(batch=2, segments=(32,), pad_tail=False)
    changed = {k: v.copy() for k, v in b.items()}
    changed["tokens"][:, 20:] = 7
    a, c = _logits(model_and_params, b, "bidirectional"), _logits(model_and_params, changed, "bidirectional")
    assert np.abs(a[:, :20] - c[:, :20]).max() > 1e-3


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_segments_never_see_each_other(model_and_params, mode):
    b = packed_batch(batch=2, segments=(12, 14))
    changed = {k: v.copy() for k, v in b.items()}
    changed["tokens"][:, 12:26] = 9  # rewrite segment 2 entirely
    changed["tokens"][:, 26:] = 11  # and the padding
    a, c = _logits(model_and_params, b, mode), _logits(model_and_params, changed, mode)
    np.testing.assert_allclose(a[:, :12], c[:, :12], atol=1e-5)
    # a packed segment gives the same output as the same segment alone in its row
    alone = {k: v.copy() for k, v in b.items()}
    alone["segment_ids"][:, 12:] = 0
    np.testing.assert_allclose(_logits(model_and_params, alone, mode)[:, :12], a[:, :12], atol=1e-5)


def test_scan_and_unrolled_layers_agree():
    c = tiny_config()
    cfg = ModelConfig.from_config(c.model)
    unrolled = ModelConfig.from_config({**c.model.to_dict(), "scan_layers": False, "remat_policy": "full"})
    p = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(1)))
    layers = p["encoder"]["layers"]
    p2 = {"lm_head": p["lm_head"], "encoder": {k: v for k, v in p["encoder"].items() if k != "layers"}}
    for i in range(cfg.num_layers):
        p2["encoder"][f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
    b = packed_batch(batch=2)
    a = LanguageModel(cfg).apply({"params": p}, b["tokens"], b["segment_ids"], b["positions"], "causal")
    u = LanguageModel(unrolled).apply({"params": p2}, b["tokens"], b["segment_ids"], b["positions"], "causal")
    # two programs (scan vs unrolled) may order f32 sums differently; the longest sums per layer
    # are over D, the ffn and the keys, then the head over D
    cfg_n = cfg.num_layers * (cfg.hidden_size + cfg.ffn_size + b["tokens"].shape[1]) + cfg.hidden_size
    np.testing.assert_allclose(np.asarray(a), np.asarray(u), rtol=0,
                               atol=accum_tol(cfg_n) * np.abs(np.asarray(u)).max())


def test_every_parameter_has_logical_axes():
    cfg = ModelConfig.from_config(tiny_config().model)
    boxed = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == len(x.value.shape)


@pytest.mark.parametrize("preset,expected", [("210m", 211.8e6), ("610m", 607.8e6), ("1b", 1188e6)])
def test_paper_parameter_counts(preset, expected):
    # PAPER.md's counts hold with the Llama-3 vocabulary (128,256 rows) ...
    cfg = ModelConfig.from_config(load_config(f"configs/pretrain.py:{preset}", {"model.vocab_size": 128256}).model)
    abstract = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
    assert abs(count_params(abstract) - expected) / expected < 0.01
    # ... the presets size the embedding to their 32,000-piece tokenizer: every row trains
    config = load_config(f"configs/pretrain.py:{preset}")
    assert config.model.vocab_size == 32000 == config.data.tokenizer_vocab_size
    trained = ModelConfig.from_config(config.model)
    abstract = jax.eval_shape(lambda r: init_params(trained, r), jax.random.PRNGKey(0))
    assert count_params(abstract) == pytest.approx(expected - (128256 - 32000) * cfg.hidden_size, rel=0.01)


def test_1b_blocks_alone():
    cfg = ModelConfig.from_config(load_config("configs/pretrain.py:1b").model)
    abstract = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
    blocks = sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(abstract)["encoder"]["layers"]))
    assert abs(blocks - 966e6) / 966e6 < 0.01


def test_no_involuntary_full_rematerialization_on_a_3d_mesh(capfd):
    """The embedding lookup must not force XLA to replicate activations (2x2x2 mesh)."""
    from mlm_vs_clm import sharding, step, train_state
    from mlm_vs_clm.schedules import Objective
    from tests.helpers import packed_batch, tiny_config

    config = tiny_config("clm", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    setup = train_state.build(config, sharding.make_mesh(config.mesh, jax.devices()))
    state = train_state.init_state(setup, 0)
    batch = {k: jax.device_put(v, sharding.batch_sharding(setup.mesh)) for k, v in packed_batch().items()}
    jax.config.update("jax_enable_compilation_cache", False)  # a cache hit would skip the partitioner
    try:
        capfd.readouterr()
        for obj in (Objective("clm"), Objective("mlm", 0.4)):
            state, _ = step.compiled_train_step(setup, obj)(state, batch)
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_cpu_matmul_accumulates_in_f32_and_keeps_f32_kernel_gradients():
    # The CPU path for 16-bit compute (cpu_ops.matmul): bf16 operands, f32 accumulation, the
    # kernel's gradient as an f32 product of the bf16 operands (never rounded to bf16).
    from mlm_vs_clm.kernels import cpu as cpu_ops

    k = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(k[0], (64, 48)).astype(jnp.bfloat16)
    kernel = jax.random.normal(k[1], (48, 40), jnp.float32)
    dy = jax.random.normal(k[2], (64, 40)).astype(jnp.bfloat16)
    matmul = cpu_ops.matmul("bfloat16", "float32")
    y, vjp = jax.vjp(matmul, x, kernel)
    dx, dkernel = vjp(dy)
    assert (y.dtype, dx.dtype, dkernel.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    x32, kb32, dy32 = x.astype(jnp.float32), kernel.astype(jnp.bfloat16).astype(jnp.float32), dy.astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), x32 @ kb32, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dx, np.float32), dy32 @ kb32.T, rtol=1e-2, atol=1e-2)
    # f32-exact: a bf16-rounded gradient would be off by ~2^-9 relative. Against an f64 reference
    # the f32 sum of 64 exact bf16 x bf16 products is within 64*eps32*sum|x dy| (about 8e-6 relative).
    x64, dy64 = np.asarray(x32, np.float64), np.asarray(dy32, np.float64)
    err = np.abs(np.asarray(dkernel, np.float64) - x64.T @ dy64)
    assert (err <= accum_tol(x64.shape[0]) * (np.abs(x64).T @ np.abs(dy64))).all(), err.max()
    assert np.max(np.abs(np.asarray(dkernel) - np.asarray((x32.T @ dy32).astype(jnp.bfloat16), np.float32))) > 1e-3


def test_bf16_compute_on_cpu_tracks_the_f32_model():
    # The same tiny model in bf16 compute (f32 master weights): loss and gradients close to f32's.
    from mlm_vs_clm import objectives

    base = tiny_config()
    b = packed_batch(batch=2, length=64, segments=(24, 30))

    def loss_and_grads(dtype):
        c = tiny_config()
        c.model.dtype = dtype
        cfg = ModelConfig.from_config(c.model)
        model = LanguageModel(cfg)
        params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(0)))

        def loss(p):
            h = model.apply({"params": p}, b["tokens"], b["segment_ids"], b["positions"], "causal", method=model.encode)
            head = objectives.Head(p["lm_head"]["kernel"], jnp.dtype(dtype))
            t = jnp.roll(jnp.asarray(b["tokens"]), -1, axis=1)
            s = objectives.chunked_cross_entropy(head, h, t, jnp.asarray(b["segment_ids"] > 0, jnp.float32), 16)
            return s.loss / s.count

        return jax.value_and_grad(loss)(params)

    l32, g32 = loss_and_grads("float32")
    l16, g16 = loss_and_grads("bfloat16")
    assert base.model.dtype == "float32" and abs(float(l16) - float(l32)) < 2e-2 * abs(float(l32))
    for a, c in zip(jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g16)):
        assert c.dtype == jnp.float32
        assert float(jnp.linalg.norm(a - c)) <= 0.1 * float(jnp.linalg.norm(a)) + 1e-6


@pytest.mark.parametrize("causal", [True, False])
def test_cpu_attention_matches_the_library_forward_and_backward(causal):
    # cpu_ops.attention against jax.nn.dot_product_attention on packed rows (segments, padding),
    # in f32 (tight) and bf16 (loose); rows of padding have zero gradient in both.
    from mlm_vs_clm.kernels import cpu as cpu_ops
    from mlm_vs_clm.model import attention_mask

    b = packed_batch(batch=2, length=32, segments=(12, 14))
    mask = attention_mask(jnp.asarray(b["segment_ids"]))
    full = mask & jnp.tril(jnp.ones((32, 32), bool)) if causal else mask
    k = jax.random.split(jax.random.PRNGKey(5), 4)
    q, kk, v, dout = (jax.random.normal(k[i], (2, 32, 4, 16)) for i in range(4))
    dout = dout * (b["segment_ids"] > 0)[:, :, None, None]  # as the loss: nothing flows from padding

    def lib(q, kk, v):
        return jax.nn.dot_product_attention(q, kk, v, mask=mask, is_causal=causal)

    ref, ref_vjp = jax.vjp(lib, q, kk, v)
    ref_grads = ref_vjp(dout)
    # f32: sums over the head dim (scores, dP) and over the keys (output, dK, dV), on both sides;
    # bf16: inputs and output rounded to 8 bits (eps16 = 2^-7), a few roundings deep: ~6 eps16.
    for dtype, tol in ((jnp.float32, accum_tol(16 + 32)), (jnp.bfloat16, 5e-2)):
        args = [x.astype(dtype) for x in (q, kk, v)]
        out, vjp = jax.vjp(lambda q, kk, v: cpu_ops.attention(q, kk, v, full), *args)
        grads = vjp(dout.astype(dtype))
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
        valid = (b["segment_ids"] > 0)[:, :, None, None]
        np.testing.assert_allclose(np.asarray(out, np.float32) * valid, np.asarray(ref) * valid, atol=tol, rtol=tol)
        for g, r in zip(grads, ref_grads):
            scale = float(jnp.max(jnp.abs(r)))
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("shape,axes", [((128, 64), (1, 0)), ((24, 40), (1, 0)), ((7, 5), (1, 0)), ((16, 5), (1, 0)),
                                        ((2, 32, 3, 4), (0, 2, 1, 3)), ((2, 3, 16, 24), (0, 1, 3, 2)),
                                        ((2, 5, 3, 4), (0, 2, 1, 3))])
def test_standalone_transpose_is_a_transpose(shape, axes):
    # block-wise (matrices whose sides divide into blocks of 8 or more), else pad and slice; any dtype
    from mlm_vs_clm.kernels.cpu import standalone_transpose

    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.int32):
        got = jax.jit(lambda x: standalone_transpose(x, axes))(x.astype(dtype))
        np.testing.assert_array_equal(np.asarray(got), np.transpose(np.asarray(x.astype(dtype)), axes))


def test_only_16_bit_models_on_a_cpu_take_the_cpu_ops_paths():
    from mlm_vs_clm.kernels import cpu as cpu_ops

    assert jax.default_backend() == "cpu"
    assert cpu_ops.wanted("bfloat16") and cpu_ops.wanted(jnp.float16)
    assert not cpu_ops.wanted("float32")
    # an f32 model's step is plain autodiff: no custom_vjp in its jaxpr
    cfg = ModelConfig.from_config(tiny_config().model)
    model, params = LanguageModel(cfg), nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(0)))
    b = packed_batch(batch=2)

    def loss(p):
        return jnp.sum(model.apply({"params": p}, b["tokens"], b["segment_ids"], b["positions"], "causal") ** 2)

    assert "custom_vjp" not in str(jax.make_jaxpr(jax.grad(loss))(params))


def test_rope_rotation_as_a_product_matches_the_halves():
    # cpu_ops.rotate_half (16-bit models on a CPU) against slices and a concatenation
    from mlm_vs_clm.kernels import cpu as cpu_ops
    from mlm_vs_clm.model import apply_rope

    x = jax.random.normal(jax.random.PRNGKey(7), (2, 8, 4, 16))
    half = jnp.concatenate([-x[..., 8:], x[..., :8]], axis=-1)
    np.testing.assert_array_equal(np.asarray(cpu_ops.rotate_half(x)), np.asarray(half))
    xb = x.astype(jnp.bfloat16)
    assert cpu_ops.rotate_half(xb).dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(cpu_ops.rotate_half(xb), np.float32),
                                  np.asarray(half.astype(jnp.bfloat16), np.float32))
    # backward: the transpose of the rotation
    g = jax.random.normal(jax.random.PRNGKey(8), x.shape)
    _, vjp = jax.vjp(cpu_ops.rotate_half, x)
    _, vjp_ref = jax.vjp(lambda x: jnp.concatenate([-x[..., 8:], x[..., :8]], axis=-1), x)
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]))
    cos, sin = jnp.cos(x[:, :, 0]), jnp.sin(x[:, :, 1])
    expected = apply_rope(x, cos, sin)  # f32: the halves
    got = apply_rope(xb, cos, sin)  # bf16 on a CPU: the product
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected), atol=3e-2, rtol=3e-2)


def test_embedding_gradient_sums_in_f32():
    """A bf16 table's gradient is summed in f32 (one rounding), also for a token that fills most
    positions (the mask token of MLM): equal to the f32 sum of the bf16 cotangents, rounded once."""
    from mlm_vs_clm import model

    table = jax.random.normal(jax.random.PRNGKey(0), (50, 8)).astype(jnp.bfloat16)
    tokens = jnp.asarray(np.where(np.random.RandomState(0).rand(4, 64) < 0.6, 4,
                                  np.random.RandomState(1).randint(0, 50, (4, 64))), jnp.int32)
    g = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 8))
    ours = jax.grad(lambda t: (model.embedding_lookup(t, tokens).astype(jnp.float32) * g).sum())(table)
    g16 = g.astype(jnp.bfloat16).astype(jnp.float32)  # the cotangent reaches the lookup in bf16
    exact = jax.grad(lambda t: (jnp.take(t, tokens, axis=0) * g16).sum())(table.astype(jnp.float32))
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(exact.astype(jnp.bfloat16), np.float32))
    np.testing.assert_array_equal(model.embedding_lookup(table, tokens), jnp.take(table, tokens, axis=0))
    # the bf16 model takes it (by default off CPUs; forced here): its scatter-add runs in f32
    cfg = ModelConfig.from_config(tiny_config().model)
    cfg = dataclasses.replace(cfg, dtype="bfloat16", embed_grad_f32="on")
    params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(0)))
    b = packed_batch(batch=2, segments=(32,), pad_tail=False)
    loss = lambda p: LanguageModel(cfg).apply({"params": p}, b["tokens"], b["segment_ids"], b["positions"],
                                              "causal").astype(jnp.float32).sum()
    scatters = [e for e in jax.make_jaxpr(jax.grad(loss))(params).jaxpr.eqns if e.primitive.name == "scatter-add"]
    assert scatters and all(e.outvars[0].aval.dtype == jnp.float32 for e in scatters)
