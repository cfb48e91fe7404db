"""The pure train and eval steps: `train_step(state, batch) -> (state, metrics)`.

One jitted function per objective (CLM, MLM-r): the schedule picks which one runs, so a
switch costs no recompilation after the first step of each objective. MLM masks are drawn
inside the step from fold_in(seed, step), so a resumed run draws the same masks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mlm_vs_clm import objectives, sharding
from mlm_vs_clm.schedules import Objective
from mlm_vs_clm.train_state import Setup, TrainState

MASK_STREAM = 1  # fold_in constant that separates MLM mask draws from other randomness
EVAL_MASK_SEED = 20250701  # validation masks: the same for every run
# The validation mask policy, fixed for every run whatever its training config (mlm.mask_ratio,
# mlm.replacement), so that runs are scored on the same inputs: 40 % of the tokens selected,
# every selected token replaced by the mask token (the study's trainer's default policy).
VALIDATION_MASK_RATIO = 0.4
VALIDATION_REPLACEMENT = "mask"


def mask_rng(seed: int, step):
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), MASK_STREAM), step)


def _loss_sums(setup: Setup, objective: Objective, params, batch, masking) -> objectives.LossSums:
    model = setup.model

    def encode(tokens, seg, pos, mask_mode):
        return model.apply({"params": params}, tokens, seg, pos, mask_mode, method=model.encode)

    head = objectives.Head(params["lm_head"]["kernel"], model.cfg.dtype)  # LanguageModel.head: h @ kernel
    return objectives.objective_loss(objective, encode, head, batch, masking, setup.config)


def train_step(setup: Setup, objective: Objective, state: TrainState, batch) -> tuple[TrainState, dict]:
    """One optimizer update on `batch` (split into `train.grad_accum_steps` micro-batches)."""
    accum = setup.config.train.grad_accum_steps
    # One mask for the whole batch, split with it: the masked tokens (and so the loss and the
    # update) do not depend on grad_accum_steps.
    masking = objectives.objective_masking(objective, batch, mask_rng(setup.config.seed, state.step), setup.config)

    def grads_of(micro, micro_masking):
        def f(p):
            sums = _loss_sums(setup, objective, p, micro, micro_masking)
            return sums.loss, sums

        (_, sums), g = jax.value_and_grad(f, has_aux=True)(state.params)
        return g, sums

    if accum == 1:
        grads, sums = grads_of(batch, masking)
    else:
        # [B, ...] -> [accum, B/accum, ...]: row i of micro-batch j is row j + accum * i, so every
        # micro-batch keeps the batch sharding of its rows. The mask's rows are split alike.
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, accum, *x.shape[1:]), 0, 1), (batch, masking))

        def body(carry, xs):
            g, sums = grads_of(*xs)
            return jax.tree.map(jnp.add, carry, (g, sums)), None

        zeros = (
            jax.tree.map(jnp.zeros_like, state.params),
            objectives.LossSums(jnp.float32(0), jnp.float32(0), jnp.float32(0)),
        )
        (grads, sums), _ = jax.lax.scan(body, zeros, micro)

    count = jnp.maximum(sums.count, 1.0)
    loss = sums.loss / count
    # One pass over the gradients; a non-finite gradient gives a non-finite norm, so this is
    # also the finite check.
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32) / count)) for g in jax.tree.leaves(grads)))
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
        mean_grads = jax.tree.map(lambda g: g / count, grads)  # exact mean over every predicted token
        updates, new_opt = setup.tx.update(mean_grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    # A non-finite step leaves the parameters and the optimizer state as they were: one branch,
    # not a select on every leaf of the state (on 2 CPU cores the selects cost half the update).
    # Only the learning-rate schedule's step count moves on, so that the rate stays a function
    # of the step (the logged one, and where warmups and the objective switch fall).
    new_params, new_opt = jax.lax.cond(ok, update, lambda p, o: (p, _advance_schedules(o)), state.params,
                                       state.opt_state)
    new_state = TrainState(
        step=state.step + 1,
        params=new_params,
        opt_state=new_opt,
        bad_steps=jnp.where(ok, 0, state.bad_steps + 1),
        skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32),
    )
    metrics = {
        "loss": loss,
        "accuracy": sums.correct / count,
        "grad_norm": grad_norm,
        "learning_rate": setup.lr_schedule(state.step),
        "predicted_tokens": sums.count,
        "finite": ok,
        "bad_steps": new_state.bad_steps,
        "skipped_steps": new_state.skipped_steps,
    }
    return new_state, metrics


def _advance_schedules(opt_state):
    """The optimizer state with every schedule's step count advanced by one (Adam's own count,
    which corrects its moments' bias, stays: no moment was updated)."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    return jax.tree.map(lambda x: x._replace(count=x.count + 1) if is_schedule(x) else x, opt_state,
                        is_leaf=is_schedule)


def eval_step(setup: Setup, objective: Objective, params, batch, step_for_masks) -> objectives.LossSums:
    """Loss sums of `objective` on `batch`. Validation masks come from a fixed stream that does
    not depend on the run's seed, and with the fixed policy VALIDATION_REPLACEMENT (not the run's
    mlm.replacement), so every run is scored on the same masked inputs."""
    rng = jax.random.fold_in(jax.random.PRNGKey(EVAL_MASK_SEED), step_for_masks)
    masking = None
    if objective.kind == "mlm":
        cfg = setup.config
        masking = objectives.draw_mask(rng, batch, objective.mask_ratio, cfg.tokens, cfg.model.vocab_size,
                                       VALIDATION_REPLACEMENT)
    return _loss_sums(setup, objective, params, batch, masking)


def batch_shardings(mesh) -> dict:
    s = sharding.batch_sharding(mesh)
    return {"tokens": s, "segment_ids": s, "positions": s}


@functools.cache
def _jitted_train_step(setup: Setup, objective: Objective):
    return jax.jit(
        functools.partial(train_step, setup, objective),
        in_shardings=(setup.state_shardings, batch_shardings(setup.mesh)),
        out_shardings=(setup.state_shardings, NamedSharding(setup.mesh, P())),
        donate_argnums=(0,),
    )


@functools.cache
def _jitted_eval_step(setup: Setup, objective: Objective):
    return jax.jit(
        functools.partial(eval_step, setup, objective),
        in_shardings=(setup.state_shardings.params, batch_shardings(setup.mesh), NamedSharding(setup.mesh, P())),
        out_shardings=NamedSharding(setup.mesh, P()),
    )


def _in_context(setup: Setup, fn):
    def call(*args):
        with setup.context():
            return fn(*args)

    call.lower = lambda *args: _lower(setup, fn, args)
    return call


def _lower(setup, fn, args):
    with setup.context():
        return fn.lower(*args)


def compiled_train_step(setup: Setup, objective: Objective):
    """The jitted `(state, batch) -> (state, metrics)` for one objective (compiled on first call)."""
    return _in_context(setup, _jitted_train_step(setup, objective))


def compiled_eval_step(setup: Setup, objective: Objective):
    """The jitted `(params, batch, index) -> LossSums` for one objective."""
    return _in_context(setup, _jitted_eval_step(setup, objective))
