import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mlm_vs_clm import objectives, schedules
from mlm_vs_clm.model import LanguageModel, ModelConfig, init_params
from mlm_vs_clm.step import mask_rng
from tests.helpers import EPS16, accum_tol, packed_batch, tiny_config


def _head(model, params):
    return objectives.Head(params["lm_head"]["kernel"], model.cfg.dtype)


def _draw(batch, ratio=0.4, step=0, seed=0, replacement="mask"):
    c = tiny_config()
    return objectives.draw_mask(mask_rng(seed, step), batch, ratio, c.tokens, c.model.vocab_size, replacement)


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.4, 0.5])
def test_mask_fraction_matches_ratio(ratio):
    b = packed_batch(batch=16, length=128, segments=(60, 50))
    m = _draw(b, ratio)
    eligible = (b["segment_ids"] > 0) & (b["tokens"] > 4)
    frac = m.selected.sum() / eligible.sum()
    assert abs(float(frac) - ratio) < 0.01
    assert int(m.selected.sum()) == int(m.valid.sum())


def test_special_and_pad_tokens_never_selected():
    b = packed_batch(batch=16, length=64, segments=(30, 20))
    b["tokens"][:, 5] = 3  # eos, special
    b["tokens"][:, 6] = 4  # mask token, special
    for step in range(5):
        m = np.asarray(_draw(b, 0.5, step=step).selected)
        assert not m[b["segment_ids"] == 0].any()
        assert not m[:, [0, 5, 6, 30]].any()


def test_masks_depend_on_seed_and_step_only():
    b = packed_batch()
    a, a2 = _draw(b, step=3), _draw(b, step=3)
    np.testing.assert_array_equal(a.selected, a2.selected)
    assert (np.asarray(a.selected) != np.asarray(_draw(b, step=4).selected)).any()
    assert (np.asarray(a.selected) != np.asarray(_draw(b, step=3, seed=1).selected)).any()


def test_replacement_policies():
    b = packed_batch(batch=32, length=128, segments=(128,), pad_tail=False)
    m = _draw(b, 0.5)
    sel = np.asarray(m.selected)
    assert (np.asarray(m.inputs)[sel] == 4).all()
    np.testing.assert_array_equal(np.asarray(m.inputs)[~sel], b["tokens"][~sel])
    m = _draw(b, 0.5, replacement="80_10_10")
    sel = np.asarray(m.selected)
    inp = np.asarray(m.inputs)[sel]
    frac_mask = (inp == 4).mean()
    frac_kept = (inp == b["tokens"][sel]).mean()
    assert 0.75 < frac_mask < 0.85 and 0.07 < frac_kept < 0.14
    with pytest.raises(ValueError, match="replacement"):
        _draw(b, 0.5, replacement="bogus")


@pytest.mark.parametrize("special_ids,vocab_size", [
    ((0, 1, 2, 3, 4), 256),  # this project's tokenizers: the lowest ids
    (tuple(range(128000, 128256)), 128256),  # Llama-3: bos/eos/reserved ids at the top
    ((50256, 50257), 50258),  # GPT-2 with a mask token appended last
])
def test_random_replacement_tokens_are_non_special_and_in_the_vocabulary(special_ids, vocab_size):
    B, L = 32, 128
    tokens = np.random.default_rng(0).integers(0, vocab_size, (B, L))
    filler = min(set(range(10)) - set(special_ids))
    tokens = np.where(np.isin(tokens, special_ids), filler, tokens).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones((B, L), np.int32),
             "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1))}
    tok = ml_collections.ConfigDict(dict(mask_id=special_ids[-1], special_ids=special_ids))
    m = objectives.draw_mask(mask_rng(0, 0), batch, 0.5, tok, vocab_size, "80_10_10")
    inputs, sel = np.asarray(m.inputs), np.asarray(m.selected)
    randomised = sel & (inputs != tok.mask_id) & (inputs != tokens)
    assert randomised.sum() > 0.07 * sel.sum()
    drawn = inputs[randomised]
    assert ((drawn >= 0) & (drawn < vocab_size)).all() and not np.isin(drawn, special_ids).any()


def test_random_non_special_is_uniform_over_exactly_the_non_special_ids():
    special = (0, 3, 4, 9, 15, 99)  # 99 lies outside the vocabulary: ignored
    ids = np.asarray(objectives.random_non_special(jax.random.PRNGKey(0), (200_000,), special, 16))
    allowed = sorted(set(range(16)) - set(special))
    counts = np.bincount(ids, minlength=16)
    assert counts[list(special[:-1])].sum() == 0 and ids.max() < 16
    assert np.abs(counts[allowed] / len(ids) - 1 / len(allowed)).max() < 0.005
    with pytest.raises(ValueError, match="tokens.special_ids"):
        objectives.random_non_special(jax.random.PRNGKey(0), (4,), tuple(range(8)), 8)


def test_sparse_and_dense_heads_give_the_same_loss():
    c = tiny_config()
    cfg = ModelConfig.from_config(c.model)
    model = LanguageModel(cfg)
    params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(0)))
    enc = lambda t, s, p, m: model.apply({"params": params}, t, s, p, m, method=model.encode)  # noqa: E731
    head = _head(model, params)
    b = packed_batch()
    m = _draw(b, 0.4)
    sparse = objectives.mlm_loss(enc, head, b, m, True, 8)
    dense = objectives.mlm_loss(enc, head, b, m, False, 8)
    # f32 sums in different orders: logits over D, logsumexp over V, the loss over the tokens
    rtol = accum_tol(cfg.hidden_size + cfg.vocab_size + b["tokens"].size)
    np.testing.assert_allclose(sparse.loss, dense.loss, rtol=rtol)
    assert float(sparse.count) == float(dense.count) == float(m.selected.sum())
    # chunking does not change the result
    one_chunk = objectives.mlm_loss(enc, head, b, m, True, 10_000)
    np.testing.assert_allclose(sparse.loss, one_chunk.loss, rtol=rtol)


def test_clm_targets_stay_inside_segments_and_skip_padding():
    b = packed_batch(batch=1, length=32, segments=(20, 10))
    targets, weights = objectives.clm_targets(b)
    w = np.asarray(weights)[0]
    assert w[:19].all() and not w[19]  # last token of segment 1 has no target
    assert w[20:29].all() and not w[29]
    assert not w[30:].any()  # padding is never a target
    np.testing.assert_array_equal(np.asarray(targets)[0, :19], b["tokens"][0, 1:20])


def test_clm_loss_matches_full_logits_reference():
    c = tiny_config()
    cfg = ModelConfig.from_config(c.model)
    model = LanguageModel(cfg)
    params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(2)))
    b = packed_batch(batch=2)
    enc = lambda t, s, p, m: model.apply({"params": params}, t, s, p, m, method=model.encode)  # noqa: E731
    head = _head(model, params)
    got = objectives.clm_loss(enc, head, b, chunk_size=7)
    logits = model.apply({"params": params}, b["tokens"], b["segment_ids"], b["positions"], "causal")
    targets, weights = objectives.clm_targets(b)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    ref = -(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights).sum()
    # f32 sums in different orders: logits over D, logsumexp over V, the loss over the tokens
    np.testing.assert_allclose(got.loss, ref, rtol=accum_tol(cfg.hidden_size + cfg.vocab_size + b["tokens"].size))


def test_objective_schedule_presets_and_switch_step():
    s = schedules.objective_schedule("clm50_mlm40", 40)
    assert [s(i).name for i in (0, 19, 20, 39)] == ["clm", "clm", "mlm40", "mlm40"]
    assert s.switch_steps == (20,)
    s = schedules.objective_schedule("clm25_mlm30", 1000)
    assert s(249).kind == "clm" and s(250) == schedules.Objective("mlm", 0.3)
    s = schedules.objective_schedule("clm+mlm30@100+mlm40@75%", 1000)
    assert [s(i).name for i in (99, 100, 749, 750)] == ["clm", "mlm30", "mlm30", "mlm40"]
    assert schedules.objective_schedule("mlm", 10, 0.2)(0).mask_ratio == 0.2
    for bad in ["mlm", "bogus", "clm_mlm40", "mlm0", "clm100_mlm40", "clm+mlm40@x"]:
        if bad == "mlm":
            continue
        with pytest.raises(ValueError, match="objective"):
            schedules.objective_schedule(bad, 100)
    with pytest.raises(ValueError, match="not before the end"):
        schedules.objective_schedule("clm+mlm40@500", 100)


def test_learning_rate_schedules():
    c = tiny_config()
    o = c.optimizer
    o.warmup_fraction, o.decay_fraction, o.learning_rate = 0.1, 0.2, 1.0
    lr = schedules.learning_rate_schedule(o, 100)
    assert float(lr(0)) == 0.0 and abs(float(lr(10)) - 1.0) < 1e-6 and float(lr(50)) == 1.0
    assert float(lr(90)) < 0.6 and float(lr(100)) < 1e-6
    o.rewarmup_at_switch, o.rewarmup_fraction = True, 0.05
    lr = schedules.learning_rate_schedule(o, 100, (50,))
    assert float(lr(49)) == 1.0 and float(lr(50)) < 0.3 and abs(float(lr(55)) - 1.0) < 1e-6
    o.schedule = "cosine"
    lr = schedules.learning_rate_schedule(o, 100)
    assert float(lr(100)) < 1e-6 and float(lr(10)) > 0.99


def _reference_chunked(head, h_BxNxD, targets_BxN, weights_BxN, chunk):
    """The plain autodiff version: each chunk's logits under jax.checkpoint (recomputed in the
    backward pass), a Python loop over chunks, the last one ragged."""
    loss = correct = 0.0
    for a in range(0, h_BxNxD.shape[1], chunk):
        def f(hp, h, t, w):
            logits = _logits(head._replace(kernel_DxV=hp), h).astype(jnp.float32)
            lse = jax.nn.logsumexp(logits, -1)
            tl = jnp.take_along_axis(logits, t[..., None], -1)[..., 0]
            hits = (jnp.argmax(logits, -1) == t).astype(jnp.float32)
            return jnp.sum((lse - tl) * w), jnp.sum(hits * w)

        l, c = jax.checkpoint(f)(head.kernel_DxV, h_BxNxD[:, a : a + chunk], targets_BxN[:, a : a + chunk],
                                 weights_BxN[:, a : a + chunk])
        loss, correct = loss + l, correct + c
    return loss, correct


def _dense_reference(head, h_BxNxD, targets_BxN, weights_BxN):
    logp = jax.nn.log_softmax(_logits(head, h_BxNxD).astype(jnp.float32))
    return -jnp.sum(jnp.take_along_axis(logp, targets_BxN[..., None], -1)[..., 0] * weights_BxN)


def _linear_head(kernel_DxV, dtype):
    return objectives.Head(kernel_DxV, dtype)


def _logits(head, h):
    return h.astype(head.dtype) @ head.kernel_DxV.astype(head.dtype)


@pytest.mark.parametrize("chunk", [7, 8, 32, 1000])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_custom_vjp_cross_entropy_matches_autodiff_and_dense(chunk, dtype):
    B, N, D, V = 3, 30, 16, 97  # 30 = 4 x 7 + 2: a ragged last chunk
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    h = jax.random.normal(k[0], (B, N, D)).astype(dtype)
    kernel = jax.random.normal(k[1], (D, V)) * 0.3
    targets = jax.random.randint(k[2], (B, N), 0, V)
    weights = (jax.random.uniform(k[3], (B, N)) < 0.7).astype(jnp.float32).at[:, -3:].set(0.0)  # padding

    def ours(kern, hh, w, scale):
        s = objectives.chunked_cross_entropy(_linear_head(kern, dtype), hh, targets, w, chunk)
        return scale * s.loss, s

    def ref(kern, hh, w, scale):
        loss, correct = _reference_chunked(_linear_head(kern, dtype), hh, targets, w, chunk)
        return scale * loss, correct

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))  # noqa: E731
    (l1, sums), g1 = grad(ours)(kernel, h, weights, 2.5)
    (l2, correct2), g2 = grad(ref)(kernel, h, weights, 2.5)
    # f32: sums over D (logits), V (logsumexp, dh) and B*N (loss, dkernel), differently ordered.
    # bf16: each side rounds logits and cotangents to bf16 and its output once more: one output
    # ulp (eps16 relative) either side, and the inputs' rounding as eps16-relative errors of the
    # largest entry (the gradients are sums with cancellation).
    n = D + V + B * N
    tol = accum_tol(n) if dtype == "float32" else 2 * EPS16
    np.testing.assert_allclose(l1, l2, rtol=tol)
    assert float(sums.correct) == float(correct2) and float(sums.count) == float(weights.sum())
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())
    # weight-0 positions get no gradient
    assert not np.asarray(g1[1], np.float32)[weights == 0].any()
    # the non-chunked dense reference, values and gradients (f32)
    if dtype == "float32":
        dense = lambda kern, hh, w: _dense_reference(_linear_head(kern, dtype), hh, targets, w)  # noqa: E731
        l3, g3 = jax.value_and_grad(dense, argnums=(0, 1, 2))(kernel, h, weights)
        np.testing.assert_allclose(l1, 2.5 * l3, rtol=tol)
        for a, b in zip(g1, g3):
            np.testing.assert_allclose(a, 2.5 * b, rtol=tol, atol=tol * np.abs(2.5 * b).max())


@pytest.mark.parametrize("sparse", [True, False])
def test_mlm_and_clm_gradients_match_the_dense_reference(sparse):
    c = tiny_config()
    cfg = ModelConfig.from_config(c.model)
    model = LanguageModel(cfg)
    params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(1)))
    b = jax.tree.map(jnp.asarray, packed_batch())
    m = _draw(b, 0.4)

    def ours(p, kind):
        enc = lambda t, s, pos, mode: model.apply({"params": p}, t, s, pos, mode, method=model.encode)  # noqa: E731
        if kind == "clm":
            return objectives.clm_loss(enc, _head(model, p), b, chunk_size=7).loss
        return objectives.mlm_loss(enc, _head(model, p), b, m, sparse, 5).loss

    def dense(p, kind):
        mode = "causal" if kind == "clm" else "bidirectional"
        inputs = b["tokens"] if kind == "clm" else m.inputs
        logits = model.apply({"params": p}, inputs, b["segment_ids"], b["positions"], mode)
        if kind == "clm":
            targets, weights = objectives.clm_targets(b)
        else:
            targets, weights = b["tokens"], m.selected.astype(jnp.float32)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights).sum()

    for kind in ("clm", "mlm"):
        l1, g1 = jax.jit(jax.value_and_grad(ours), static_argnums=1)(params, kind)
        l2, g2 = jax.value_and_grad(dense)(params, kind)
        # f32, differently ordered: per layer sums over D, the ffn and the keys; the head over D and
        # V; the loss and the weight gradients over the tokens. Gradients go back through every layer.
        n = cfg.num_layers * (cfg.hidden_size + cfg.ffn_size + b["tokens"].shape[1]) + cfg.vocab_size + b["tokens"].size
        np.testing.assert_allclose(l1, l2, rtol=accum_tol(n))
        tol = accum_tol(n)
        jax.tree.map(lambda a, b, tol=tol: np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max()),
                     g1, g2)


def test_custom_vjp_cross_entropy_is_sharding_friendly():
    # batch over 4 devices, vocab over 2: same sums and gradients as on one device
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    B, N, D, V = 8, 20, 16, 64
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    h = jax.random.normal(k[0], (B, N, D))
    kernel = jax.random.normal(k[1], (D, V)) * 0.3
    targets = jax.random.randint(k[2], (B, N), 0, V)
    weights = jnp.ones((B, N)).at[:, -4:].set(0.0)

    def f(kern, hh):
        return objectives.chunked_cross_entropy(_linear_head(kern, "float32"), hh, targets, weights, 6).loss

    want = jax.value_and_grad(f, argnums=(0, 1))(kernel, h)
    S = jax.sharding.NamedSharding
    P = jax.sharding.PartitionSpec
    kern_s, h_s = jax.device_put(kernel, S(mesh, P(None, "tensor"))), jax.device_put(h, S(mesh, P("data")))
    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(kern_s, h_s)
    tol = accum_tol(D + V + B * N)  # f32 sums over D, V and the B*N positions, split across devices
    np.testing.assert_allclose(got[0], want[0], rtol=tol)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())
    # the gradients come out sharded like their inputs: no gather of the batch or the head
    assert got[1][1].sharding.is_equivalent_to(h_s.sharding, 3)
    assert got[1][0].sharding.is_equivalent_to(kern_s.sharding, 2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_is_the_models_head_and_bad_targets_give_nan(dtype):
    cfg = ModelConfig.from_config(tiny_config(**{"model.dtype": dtype}).model)
    model = LanguageModel(cfg)
    params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(4)))
    h = jax.random.normal(jax.random.PRNGKey(5), (2, 6, cfg.hidden_size)).astype(dtype)
    want = model.apply({"params": params}, h, method=model.head)
    got = _logits(_head(model, params), h)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    targets = jnp.full((2, 6), cfg.vocab_size + 3)  # out of range: NaN, so the step is skipped
    s = objectives.chunked_cross_entropy(_head(model, params), h, targets, jnp.ones((2, 6)), 4)
    assert np.isnan(float(s.loss))
