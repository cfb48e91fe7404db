"""Pretraining, the library: `train(config, workdir)` (the command is train/__main__.py:
`python -m mlm_vs_clm.train --config=configs/pretrain.py:tiny,clm50_mlm40 --workdir=DIR`).

Start-up order: resume from DIR's newest valid checkpoint, else `init_from` (parameters of
another run: CLM -> MLM continuation), else from scratch. Running the same command again
resumes. SIGTERM saves a checkpoint at the current step and exits 0; during start-up (before
the first step) it stops with nothing to save.

A run folder has one owner: the first process holds DIR/.lock (mlm_vs_clm/runlock.py) and a
second one stops with a RunLockError naming it. The folder is checked before anything is built
(a file, under a file, read-only: a WorkdirError); a finished run on a read-only folder reports
its results without writing. A run that fails leaves no empty folder it created behind.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mlm_vs_clm import checkpoint as ckpt_lib
from mlm_vs_clm import logs, runlock, sharding, train_state
from mlm_vs_clm import step as step_lib
from mlm_vs_clm.config import ConfigError, validate


class TrainingError(RuntimeError):
    pass


_sigterm = [False]  # set by the signal handler: a plain flag (an Event's lock could deadlock there)


def _on_sigterm(signum, frame):
    _sigterm[0] = True


def install_sigterm_handler() -> None:
    """From now on SIGTERM only sets a flag that start-up and the training loop read (the
    command installs it first thing; `train` again, for library callers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


class _StoppedBeforeFirstStep(Exception):
    pass


def _check_startup_stop(what: str) -> None:
    """A SIGTERM during start-up stops the run before its first step (single process: with
    several, the loop's agreement saves the same step everywhere instead)."""
    if _sigterm[0] and jax.process_count() == 1:
        raise _StoppedBeforeFirstStep(what)


class _Preemption:
    """Turns SIGTERM into a flag that the loop checks after each step.

    With several processes, a signal may reach only some of them, or reach them at different
    steps; `agreed()` is True on every process at the same step once any process has seen one,
    so that all of them save that step together (the save is collective) and stop. The flags
    are gathered on the devices after each step and read one step later, when that gather has
    long finished: the host never waits for the step it has just dispatched."""

    def __init__(self, mesh):
        self._mesh = mesh
        self._pending = None
        install_sigterm_handler()

    @property
    def requested(self) -> bool:
        return _sigterm[0]

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        previous, self._pending = self._pending, _any_process(self.requested, self._mesh)
        return previous is not None and bool(previous)


@jax.jit
def _any(flags):
    return jnp.any(flags > 0)


def _any_process(flag: bool, mesh):
    """Whether any process's `flag` is set, as a device scalar (not fetched)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    flags = jax.make_array_from_process_local_data(sharding, np.full((local,), int(flag), np.int32), (mesh.size,))
    with jax.set_mesh(mesh):
        return _any(flags)


def _to_global(batch_np: dict, mesh) -> dict:
    s = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(s, np.asarray(v)) for k, v in batch_np.items()}


def initial_state(setup, checkpointer, data_iter, config):
    """(state, start_step, how): resume, else init_from, else scratch."""
    portable = not config.data.get("shard_by_process", False)
    step, state = checkpointer.restore_latest(setup.abstract_state, data_iter, data_state_portable=portable,
                                              config=config)
    if state is not None:
        return state, step, f"resumed from step {step}"
    if config.init_from:
        params, missing = ckpt_lib.load_params(config.init_from, setup.abstract_state.params)
        if missing and not config.init_from_allow_missing:
            raise ckpt_lib.CheckpointError(
                f"init_from {config.init_from} lacks parameters: {', '.join(missing)} "
                "(set init_from_allow_missing=True to initialise them fresh)"
            )
        if missing:
            fresh = train_state.init_state(setup, config.seed).params
            params = _fill_missing(params, fresh)
            logging.warning("init_from: freshly initialised %s", ", ".join(missing))
            print(f"init_from: freshly initialised {', '.join(missing)}")
        return train_state.fresh_state_from_params(setup, params), 0, f"initialised from {config.init_from}"
    return train_state.init_state(setup, config.seed), 0, "started from scratch"


def _has_checkpoints(workdir: str) -> bool:
    try:
        ckpt_lib.resolve_step_dir(workdir)
    except ckpt_lib.CheckpointError:
        return False
    return True


def adopt_architecture(config, source: str, what: str = "init_from") -> None:
    """The source checkpoint's architecture, special token ids and tokenizer, into `config`."""
    from mlm_vs_clm.model import ARCHITECTURE_KEYS

    try:
        step_dir = ckpt_lib.resolve_step_dir(source)
        src = ckpt_lib.read_config(step_dir)
    except ckpt_lib.CheckpointError as e:
        raise ConfigError(f"{what}: {e}") from e
    changed = []
    for key in ARCHITECTURE_KEYS:
        if key in src.model and config.model[key] != src.model[key]:
            changed.append(f"model.{key}={src.model[key]}")
            config.model[key] = src.model[key]
    for key in ("pad_id", "unk_id", "bos_id", "eos_id", "mask_id", "special_ids"):
        value = src.tokens.get(key)
        if isinstance(value, list):
            value = tuple(value)
        if value is not None and config.tokens[key] != value:
            config.tokens[key] = value
    tokenizer_dir = os.path.join(ckpt_lib.run_dir_of(step_dir), "tokenizer")
    if not config.data.tokenizer and os.path.isdir(tokenizer_dir):
        config.data.tokenizer = tokenizer_dir
        changed.append(f"data.tokenizer={tokenizer_dir}")
    if changed:
        print(f"{what}: using the {'source' if what == 'init_from' else 'run'} checkpoint's {', '.join(changed)} "
              "(init_from_architecture=False keeps the config's own)", flush=True)


def _fill_missing(partial, fresh):
    """`partial` (restored parameters) completed with the `fresh` ones it lacks."""
    if isinstance(fresh, dict):
        return {k: _fill_missing((partial or {}).get(k), v) for k, v in fresh.items()}
    return fresh if partial is None else partial


def evaluate(setup, params, val_batches, config) -> dict:
    """val_{mlm,clm}_{loss,accuracy} on the fixed validation rows, whatever the objective. The
    MLM masks are fixed too: step.VALIDATION_MASK_RATIO (40 %) with step.VALIDATION_REPLACEMENT
    ('mask'), independent of the run's mlm.mask_ratio and mlm.replacement, so every run is scored
    on the same inputs."""
    from mlm_vs_clm.schedules import Objective

    out = {}
    for name, obj in (("mlm", Objective("mlm", step_lib.VALIDATION_MASK_RATIO)), ("clm", Objective("clm"))):
        fn = step_lib.compiled_eval_step(setup, obj)
        loss = correct = count = 0.0
        for i, b in enumerate(val_batches):
            sums = jax.device_get(fn(params, b, np.int32(i)))
            loss, correct, count = loss + float(sums.loss), correct + float(sums.correct), count + float(sums.count)
        out[f"val_{name}_loss"] = loss / max(count, 1.0)
        out[f"val_{name}_accuracy"] = correct / max(count, 1.0)
    return out


def _finished_step_dir(workdir: str, steps: int) -> str | None:
    """The run's checkpoint at its last step, if it has one (orbax renames a step folder into
    place only when complete)."""
    step_dir = os.path.join(workdir, ckpt_lib.CKPT_DIR, str(steps))
    return step_dir if os.path.isdir(os.path.join(step_dir, "state")) else None


def _last_records(workdir: str, step: int) -> dict:
    """The last training record and the last evaluation up to `step` from metrics.jsonl, merged."""
    last: dict = {}
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= step:
                    last.update(record)
    except OSError:
        pass
    return last


def _print_done(step: int, tokens_per_step: int, last: dict, directory: str) -> None:
    summary = [f"{k} {last[k]:.4f}" for k in ("loss", "val_mlm_loss", "val_clm_loss") if k in last]
    print(", ".join([f"done: step {step}", f"{step * tokens_per_step:,} tokens", *summary])
          + f"; checkpoints in {directory}", flush=True)


def train(config, workdir: str, devices=None) -> dict:
    """Runs (or resumes) one pretraining run on `devices` (default: all); returns the last record."""
    install_sigterm_handler()
    problem = runlock.workdir_problem(workdir)
    t = config.train
    if problem and "read-only" in problem and _finished_step_dir(workdir, t.steps):
        last = _last_records(workdir, t.steps)  # finished: report it, write nothing
        _print_done(t.steps, t.batch_size * t.seq_len, last, os.path.join(os.path.abspath(workdir), ckpt_lib.CKPT_DIR))
        return last
    if problem:
        raise runlock.WorkdirError(problem)
    created = runlock.make_workdir(workdir)
    lock = runlock.RunLock(workdir, jax.process_index())
    try:
        return _train(config, workdir, devices)
    except _StoppedBeforeFirstStep as e:
        print(f"stopped: SIGTERM during start-up ({e}), before the first step; nothing to save", flush=True)
        lock.undo(created)
        return {}
    except BaseException:
        lock.undo(created)
        raise
    finally:
        lock.release()
        _sigterm[0] = False  # handled: a library caller's next run starts afresh


def _train(config, workdir: str, devices=None) -> dict:
    from mlm_vs_clm.data import pipeline

    devices = list(devices) if devices is not None else jax.devices()
    if config.mesh.get("layout"):
        sharding.apply_mesh_layout(config, config.mesh.layout, len(devices), config.mesh.devices_per_node or None)
    # A continuation run that has checkpoints of its own resumes from them: its architecture is
    # the one it saved, and its init_from source is no longer needed (it may have moved).
    resuming = bool(config.init_from) and _has_checkpoints(workdir)
    if config.init_from and config.get("init_from_architecture", False):
        adopt_architecture(config, workdir if resuming else config.init_from, "resume" if resuming else "init_from")
    validate(config, len(devices), resuming=resuming)
    _check_startup_stop("config")
    tokenizer = pipeline.prepare_tokenizer(config, workdir)
    _apply_tokenizer(config, tokenizer)
    _check_startup_stop("tokenizer")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))

    mesh = sharding.make_mesh(config.mesh, devices)
    setup = train_state.build(config, mesh)
    data_iter = pipeline.train_iterator(config, tokenizer, jax.process_index(), jax.process_count())
    rows = config.train.batch_size // jax.process_count()  # validation batches are global
    val_batches = [
        _to_global({k: v[jax.process_index() * rows : (jax.process_index() + 1) * rows] for k, v in b.items()}, mesh)
        for b in pipeline.validation_batches(config, tokenizer, config.train.eval_batches)
    ]
    _check_startup_stop("data")
    t = config.train
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=t.keep, keep_steps=tuple(t.keep_steps))
    try:
        state, start, how = initial_state(setup, checkpointer, data_iter, config)
        _check_startup_stop("restore")
    except BaseException:
        checkpointer.close()
        raise
    print(f"{how}; {t.steps} steps of {t.batch_size}x{t.seq_len} tokens, objective {config.objective}, "
          f"mesh {dict(mesh.shape)}", flush=True)
    writer = logs.MetricsWriter(workdir, start, t.steps, progress=t.progress)
    preemption = _Preemption(mesh)
    tokens_per_step = t.batch_size * t.seq_len
    pending, last, t_last = None, {}, time.time()
    failed = True  # an error on the way out is reported, not one of closing after it

    def flush(pending):
        nonlocal t_last, last
        step, obj, metrics = pending
        m = jax.device_get(metrics)
        if int(m["bad_steps"]) >= t.max_bad_steps:
            raise TrainingError(
                f"{int(m['bad_steps'])} consecutive non-finite steps at step {step} (train.max_bad_steps="
                f"{t.max_bad_steps}); the last good checkpoint is kept under {checkpointer.directory}"
            )
        if step % t.log_every == 0 or step == t.steps:
            now = time.time()
            steps_done = t.log_every if step % t.log_every == 0 else step % t.log_every
            record = {"step": step, "objective": obj.name, "loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
                      "learning_rate": float(m["learning_rate"]), "grad_norm": float(m["grad_norm"]),
                      "tokens_per_second": steps_done * tokens_per_step / max(now - t_last, 1e-9),
                      "tokens_seen": step * tokens_per_step, "skipped_steps": int(m["skipped_steps"])}
            t_last = now
            writer.write(record)
            writer.progress(step, obj=obj.name, loss=f"{record['loss']:.3f}",
                            tok_s=f"{record['tokens_per_second']:.0f}")
            last = record

    try:
        for step in range(start, t.steps):
            objective = setup.objective_schedule(step)
            batch = _to_global(next(data_iter), mesh)
            state, metrics = step_lib.compiled_train_step(setup, objective)(state, batch)
            if pending is not None:
                flush(pending)  # the previous step's metrics, read while this step runs
            pending = (step + 1, objective, metrics)
            done = step + 1
            if done % t.eval_every == 0 or done == t.steps:
                flush(pending)
                pending = None
                record = {"step": done, **evaluate(setup, state.params, val_batches, config)}
                writer.write(record)
                last = {**last, **record}
            stop = preemption.agreed()
            if done % t.checkpoint_every == 0 or done == t.steps or stop or done in t.keep_steps:
                if pending is not None:
                    flush(pending)
                    pending = None
                checkpointer.save(done, state, data_iter, config, force=True)
            if stop:
                checkpointer.wait()
                print(f"preempted: checkpoint saved at step {done}", flush=True)
                break
        if pending is not None:
            flush(pending)
        failed = False
    finally:  # pending asynchronous saves complete even when the run stops on an error
        for close in (checkpointer.close, writer.close):
            try:
                close()
            except Exception:
                if not failed:
                    raise
                logging.warning("closing after an error failed too", exc_info=True)
    if not last:  # a finished run rerun: nothing trained, report what it had
        last = _last_records(workdir, int(state.step))
    _print_done(int(state.step), tokens_per_step, last, checkpointer.directory)
    return last


def _apply_tokenizer(config, tokenizer):
    """The model's vocabulary and special ids come from the tokenizer."""
    if tokenizer is None:
        return
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    if tokenizer.mask_id is None:
        raise ConfigError("data.tokenizer: the tokenizer has no mask token")
    config.tokens.pad_id = tokenizer.pad_id
    config.tokens.mask_id = tokenizer.mask_id
    for role in ("unk", "bos", "eos"):
        config.tokens[f"{role}_id"] = getattr(tokenizer, f"{role}_id")
    config.tokens.special_ids = tuple(int(i) for i in tokenizer.special_ids)
