import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlm_vs_clm import sharding, step, train_state
from mlm_vs_clm.schedules import Objective
from tests.helpers import accum_tol, packed_batch, tiny_config


def _run(config, devices, batch, objectives_):
    mesh = sharding.make_mesh(config.mesh, devices)
    setup = train_state.build(config, mesh)
    state = train_state.init_state(setup, config.seed)
    losses = []
    for obj in objectives_:
        state, metrics = step.compiled_train_step(setup, obj)(state, batch)
        losses.append(float(metrics["loss"]))
    return setup, state, losses


def _loss_rtol(config, batch):
    """Two programs summing in different orders (f32): per layer over D, the ffn and the keys, then the
    head over D and V, and the mean over the batch's tokens."""
    m = config.model
    return accum_tol(m.num_layers * (m.hidden_size + m.ffn_size + batch["tokens"].shape[1]) + m.vocab_size
                     + batch["tokens"].size)


def test_sharded_step_matches_single_device():
    batch = packed_batch()
    objs = [Objective("clm"), Objective("mlm", 0.4), Objective("mlm", 0.4)]
    c1 = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
    _, s1, l1 = _run(c1, jax.devices()[:1], batch, objs)
    c8 = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    setup8, s8, l8 = _run(c8, jax.devices()[:8], batch, objs)
    np.testing.assert_allclose(l1, l8, rtol=_loss_rtol(c1, batch))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6), s1.params, s8.params)
    # parameters really are sharded on the 2x2x2 mesh
    q = s8.params["encoder"]["layers"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape[1] == q.shape[1] // 2


@pytest.mark.parametrize("replacement", ["mask", "80_10_10"])
def test_gradient_accumulation_matches_one_big_batch(replacement):
    """The same seed, step and batch give the same masked tokens, loss, gradients and update for
    every train.grad_accum_steps (the MLM mask is drawn for the whole batch, then split)."""
    batch = packed_batch(batch=8)
    objs = [Objective("mlm", 0.4), Objective("clm"), Objective("mlm", 0.2)]
    runs = {}
    for accum in (1, 2, 4):
        config = tiny_config(**{"train.grad_accum_steps": accum, "mlm.replacement": replacement})
        setup = train_state.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
        state = train_state.init_state(setup, config.seed)
        metrics = []
        for obj in objs:
            state, m = step.compiled_train_step(setup, obj)(state, batch)
            metrics.append({k: float(m[k]) for k in ("loss", "grad_norm", "accuracy", "predicted_tokens")})
        runs[accum] = (metrics, state.params)
    for accum in (2, 4):
        for one, acc in zip(runs[1][0], runs[accum][0]):
            assert one["predicted_tokens"] == acc["predicted_tokens"]
            np.testing.assert_allclose([one["loss"], one["grad_norm"], one["accuracy"]],
                                       [acc["loss"], acc["grad_norm"], acc["accuracy"]], rtol=_loss_rtol(config, batch))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6),
                     runs[1][1], runs[accum][1])


@pytest.mark.parametrize("objective", ["clm", "mlm40", "clm50_mlm40"])
def test_loss_falls_on_a_repeated_batch(objective):
    config = tiny_config(objective, **{"train.steps": 30, "optimizer.learning_rate": 3e-3})
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    setup = train_state.build(config, mesh)
    state = train_state.init_state(setup, 0)
    batch = packed_batch()
    history = []
    for i in range(config.train.steps):
        obj = setup.objective_schedule(i)
        state, m = step.compiled_train_step(setup, obj)(state, batch)
        history.append((obj.name, float(m["loss"])))
    names = [n for n, _ in history]
    if objective == "clm50_mlm40":
        assert names[:15] == ["clm"] * 15 and names[15:] == ["mlm40"] * 15
        phases = [[l for n, l in history if n == k] for k in ("clm", "mlm40")]
    else:
        phases = [[l for _, l in history]]
    for losses in phases:
        assert losses[-1] < losses[0] - 0.3, losses
    # one compiled program per objective: switching back and forth does not recompile
    for obj in setup.objective_schedule.distinct():
        assert step._jitted_train_step(setup, obj)._cache_size() == 1


def test_non_finite_update_is_skipped():
    config = tiny_config("clm")
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    setup = train_state.build(config, mesh)
    state = train_state.init_state(setup, 0)
    before = jax.tree.map(np.asarray, state.params)
    bad = jax.tree.map(lambda x: x, state)
    poisoned = dict(bad.params)
    poisoned["lm_head"] = {"kernel": bad.params["lm_head"]["kernel"] * np.nan}
    bad = bad.replace(params=poisoned)
    bad_np = jax.tree.map(np.asarray, bad)
    new, m = step.compiled_train_step(setup, Objective("clm"))(bad, packed_batch())
    assert not bool(m["finite"]) and int(new.bad_steps) == 1 and int(new.skipped_steps) == 1
    assert int(new.step) == 1
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        new.params["encoder"],
        before["encoder"],
    )
    # parameters (NaN head included) and optimizer state (moments, Adam's count) exactly as they
    # were; only the learning-rate schedule's count moved on with the step
    same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), b)  # noqa: E731
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    schedules_of = lambda o: [x for x in jax.tree.leaves(o, is_leaf=is_schedule) if is_schedule(x)]  # noqa: E731
    assert [int(x.count) for x in schedules_of(new.opt_state)] == [int(new.step)]
    assert [int(x.count) for x in schedules_of(bad_np.opt_state)] == [0]
    unscheduled = lambda o: jax.tree.map(lambda x: x._replace(count=0) if is_schedule(x) else x, o,  # noqa: E731
                                         is_leaf=is_schedule)
    jax.tree.map(same, (new.params, unscheduled(new.opt_state)), (bad_np.params, unscheduled(bad_np.opt_state)))
    # a good step afterwards updates and resets the streak
    skipped_opt = jax.tree.map(np.asarray, new.opt_state)
    good = new.replace(params=jax.tree.map(jnp.asarray, before))
    after, m = step.compiled_train_step(setup, Objective("clm"))(good, packed_batch())
    assert bool(m["finite"]) and int(after.bad_steps) == 0 and int(after.skipped_steps) == 1
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), after.opt_state, skipped_opt)
    assert all(jax.tree.leaves(changed))  # moments and counts moved
    # the update of step 1 used the rate of step 1, as logged, not the rate of step 0 (the skip)
    assert float(m["learning_rate"]) == float(setup.lr_schedule(1)) > 0
    assert [int(x.count) for x in schedules_of(after.opt_state)] == [int(after.step)] == [2]
