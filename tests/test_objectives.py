import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from mlm_vs_clm import objectives, schedules
from mlm_vs_clm.model import LanguageModel, ModelConfig, init_params
from mlm_vs_clm.step import mask_rng
from tests.helpers import packed_batch, tiny_config


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


def test_sparse_and_dense_heads_give_the_same_loss():
    c = tiny_config()
    cfg = ModelConfig.from_config(c.model)
    model = LanguageModel(cfg)
    params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(0)))
    enc = lambda t, s, p, m: model.apply({"params": params}, t, s, p, m, method=model.encode)  # noqa: E731
    head = lambda h: model.apply({"params": params}, h, method=model.head)  # noqa: E731
    b = packed_batch()
    m = _draw(b, 0.4)
    sparse = objectives.mlm_loss(enc, head, b, m, True, 8)
    dense = objectives.mlm_loss(enc, head, b, m, False, 8)
    np.testing.assert_allclose(sparse.loss, dense.loss, rtol=1e-5)
    assert float(sparse.count) == float(dense.count) == float(m.selected.sum())
    # chunking does not change the result
    one_chunk = objectives.mlm_loss(enc, head, b, m, True, 10_000)
    np.testing.assert_allclose(sparse.loss, one_chunk.loss, rtol=1e-5)


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
    head = lambda h: model.apply({"params": params}, h, method=model.head)  # noqa: E731
    got = objectives.clm_loss(enc, head, b, chunk_size=7)
    logits = model.apply({"params": params}, b["tokens"], b["segment_ids"], b["positions"], "causal")
    targets, weights = objectives.clm_targets(b)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    ref = -(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights).sum()
    np.testing.assert_allclose(got.loss, ref, rtol=1e-5)


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
