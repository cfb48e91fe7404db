"""The train state, the optimizer, and the sharded initialisation of both.

The state shardings come from `jax.eval_shape` of the initialiser plus the logical-axis rules,
so nothing is allocated before its sharding is known.
"""

from __future__ import annotations

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mlm_vs_clm import schedules, sharding
from mlm_vs_clm.model import LanguageModel, ModelConfig, init_params


class TrainState(struct.PyTreeNode):
    step: jnp.ndarray  # int32 scalar: number of updates applied (skipped steps included)
    params: dict
    opt_state: optax.OptState
    bad_steps: jnp.ndarray  # int32: consecutive non-finite steps (reset by a good one)
    skipped_steps: jnp.ndarray  # int32: non-finite steps skipped in total


def _decay_mask(params):
    """Weight decay on matrices only: never on norm scales (a project choice; PAPER.md says nothing of it)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path), params)


def make_optimizer(config, lr_schedule) -> optax.GradientTransformation:
    o = config.optimizer
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
        optax.adamw(lr_schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=_decay_mask),
    )


@dataclasses.dataclass(eq=False)  # hashed by identity: jitted steps are cached per Setup
class Setup:
    """Everything derived from a config and a mesh; allocates nothing."""

    config: object
    mesh: jax.sharding.Mesh
    model: LanguageModel
    tx: optax.GradientTransformation
    lr_schedule: object
    objective_schedule: schedules.ObjectiveSchedule
    state_shardings: TrainState
    abstract_state: TrainState

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical-axis rules that tracing the model needs."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.rules(self.config)):
            yield


def build(config, mesh) -> Setup:
    """Model, optimizer, schedules and state shardings for `config` on `mesh` (allocates nothing)."""
    model_cfg = ModelConfig.from_config(config.model)
    model = LanguageModel(model_cfg)
    obj_schedule = schedules.objective_schedule(config.objective, config.train.steps, config.mlm.mask_ratio)
    lr = schedules.learning_rate_schedule(config.optimizer, config.train.steps, obj_schedule.switch_steps)
    tx = make_optimizer(config, lr)
    rules = sharding.rules(config)

    boxed = jax.eval_shape(lambda r: init_params(model_cfg, r), jax.random.PRNGKey(0))
    param_specs = nn.get_partition_spec(boxed)
    params_abs = nn.meta.unbox(boxed)
    opt_abs = jax.eval_shape(tx.init, params_abs)
    opt_specs = optax.tree_map_params(
        tx, lambda _, spec: spec, opt_abs, param_specs, transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(step=scalar, params=params_abs, opt_state=opt_abs, bad_steps=scalar, skipped_steps=scalar)
    specs = TrainState(step=P(), params=param_specs, opt_state=opt_specs, bad_steps=P(), skipped_steps=P())
    shardings = jax.tree.map(
        lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules)),
        specs,
        is_leaf=lambda x: isinstance(x, P),
    )
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return Setup(config, mesh, model, tx, lr, obj_schedule, shardings, abstract)


def init_state(setup: Setup, seed: int) -> TrainState:
    """A fresh state, initialised directly into its shardings."""
    model_cfg = setup.model.cfg

    def init(rng):
        params = nn.meta.unbox(init_params(model_cfg, rng))
        zero = jnp.zeros((), jnp.int32)
        return TrainState(zero, params, setup.tx.init(params), zero, zero)

    with setup.context():
        return jax.jit(init, out_shardings=setup.state_shardings)(jax.random.PRNGKey(seed))


def fresh_state_from_params(setup: Setup, params) -> TrainState:
    """Step 0, fresh optimizer state, the given (already sharded) parameters."""

    def init(p):
        zero = jnp.zeros((), jnp.int32)
        return TrainState(zero, p, setup.tx.init(p), zero, zero)

    with setup.context():
        return jax.jit(init, out_shardings=setup.state_shardings)(params)
