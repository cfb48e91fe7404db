"""Checkpoints: orbax CheckpointManager under RUN/checkpoints/ with three items per step:
`state` (the TrainState), `data` (the grain iterator state) and `config` (JSON).

Also the read side that other tools use: `load_checkpoint(PATH)` for a trained model and
`load_params(PATH, target)` for `init_from` (CLM -> MLM continuation).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mlm_vs_clm import logs
from mlm_vs_clm.model import LanguageModel, ModelConfig

logs.quiet_library_noise()  # orbax's "Metadata file does not exist" on every restore

CKPT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and the reason."""


def disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it wraps (orbax and tensorstore re-raise the OSError of a full
    disk as other types, in chains and groups), is a full disk."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return False


def _config_dict(config) -> dict:
    return json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(d)


class Checkpointer:
    """Saves and restores one run's checkpoints (every process calls every method)."""

    def __init__(self, workdir: str, keep: int = 3, keep_steps=(), async_save: bool = True):
        self.workdir = workdir
        self.directory = os.path.join(os.path.abspath(workdir), CKPT_DIR)
        policies = [ocp.checkpoint_managers.LatestN(n=max(1, keep))]
        if keep_steps:
            policies.append(ocp.checkpoint_managers.CustomSteps(steps=[int(s) for s in keep_steps]))
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        )
        self.manager = self._new_manager(options)
        self._options = options
        self._in_flight = None  # the step of the save that may still be running
        self._orphans = logs.orphaned_callbacks()  # a failed save's writes end after its error

    def _failed(self, step, error: Exception) -> Exception:
        """A full disk as one line (the error to raise); any other error as it is."""
        if disk_full(error):
            return CheckpointError(f"checkpoint at step {step}: no space left on device ({self.directory}); the "
                                   "previous checkpoint is intact")
        return error

    def _new_manager(self, options):
        return ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iter=None, config=None, force: bool = False) -> bool:
        """Start an (asynchronous) save of `state` at `step`; a non-finite state is refused."""
        if not bool(jax.jit(_all_finite)(state.params)):
            raise CheckpointError(f"refusing to save step {step}: the parameters are not finite")
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None and hasattr(data_iter, "get_state"):
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(_config_dict(config))
        self.wait()  # the previous save's error (a full disk) is its own step's
        self._in_flight = step
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 - a full disk is one line, the rest as it is
            self._orphans.settle(failed=True)
            raise self._failed(step, e) from e

    def wait(self):
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - as in save()
            self._orphans.settle(failed=True)
            raise self._failed(self._in_flight, e) from e
        self._orphans.settle(failed=False)

    def close(self):
        try:
            self.wait()
        finally:
            self.manager.close()

    def restore_latest(self, abstract_state, data_iter=None, data_state_portable: bool = True, config=None):
        """(step, state) from the newest checkpoint that restores; (None, None) if there is none.

        A checkpoint that fails to restore (a truncated or corrupt file) is moved aside to
        RUN/checkpoints_corrupt/ with a warning naming it, and the previous one is tried.
        Nothing is deleted. A checkpoint that is readable but does not fit this run (another
        architecture: its parameter shapes differ; or a data-iterator state this pipeline
        cannot take) stops the run with a CheckpointError naming the difference, and every
        checkpoint stays where it is. With `data_state_portable` (every process iterates the
        same global stream) a checkpoint also resumes under another process count.
        """
        for step in reversed(self.steps()):
            mismatch = self._mismatch(step, abstract_state.params, config)
            if mismatch:
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} does not fit this config ({mismatch}); resume with the "
                    "run's own config (saved in that checkpoint's config/metadata) or use a new --workdir"
                )
            data_dir = os.path.join(self.directory, str(step), "data")
            own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
            other = sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) if os.path.isdir(data_dir) else []
            wants_data = data_iter is not None and hasattr(data_iter, "set_state")
            if wants_data and other and not os.path.isfile(own) and not data_state_portable:
                raise CheckpointError(
                    f"checkpoint {step} was written by {len(other)} processes with data.shard_by_process=True; "
                    "resume it with the same number of processes"
                )
            try:
                state = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))["state"]
                if not bool(jax.jit(_all_finite)(state.params)):
                    raise CheckpointError("non-finite parameters")
            except Exception as e:  # noqa: BLE001 - the state does not restore: not usable
                self._orphans.settle(failed=True)
                self._move_aside(step, e)
                continue
            if wants_data and other:
                try:
                    if os.path.isfile(own):
                        self.manager.restore(step, args=ocp.args.Composite(
                            data=grain.checkpoint.CheckpointRestore(data_iter)))
                    else:
                        # Saved by another number of processes: every process iterates the same
                        # global stream (data.shard_by_process=False), so any process's state fits.
                        with open(os.path.join(data_dir, other[0])) as f:
                            data_iter.set_state(json.load(f))
                except Exception as e:  # noqa: BLE001 - a data pipeline changed since the save
                    self._orphans.settle(failed=True)
                    reason = str(e).splitlines()[0][:200] if str(e) else ""
                    raise CheckpointError(
                        f"checkpoint {step} in {self.directory}: the data iterator's saved state does not fit this "
                        f"run's data pipeline ({type(e).__name__}: {reason}); resume with the run's own data settings"
                    ) from e
            return step, state
        return None, None

    def _mismatch(self, step: int, abstract_params, config) -> str | None:
        """Why the readable checkpoint at `step` cannot hold these parameters, or None (also when
        its metadata cannot be read: restoring it then decides whether it is corrupt)."""
        step_dir = os.path.join(self.directory, str(step))
        try:
            meta = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "state"))
            tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
            saved = {jax.tree_util.keystr(p): tuple(v.shape)
                     for p, v in jax.tree_util.tree_flatten_with_path(tree["params"])[0]}
        except Exception:  # noqa: BLE001 - unreadable metadata: leave it to the restore
            return None
        wanted = {jax.tree_util.keystr(p): tuple(v.shape)
                  for p, v in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
        if saved == wanted:
            return None
        differences = []
        saved_config = os.path.join(step_dir, "config", "metadata")
        if config is not None and os.path.isfile(saved_config):
            from mlm_vs_clm.model import ARCHITECTURE_KEYS

            with open(saved_config) as f:
                saved_model = json.load(f).get("model", {})
            for key in (*ARCHITECTURE_KEYS, "scan_layers"):
                if key in saved_model and saved_model[key] != config.model.get(key):
                    differences.append(f"model.{key} is {saved_model[key]!r} there, {config.model.get(key)!r} here")
        if not differences:
            names = sorted(set(saved) ^ set(wanted))
            names += sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
            differences.append(f"its parameters differ: {', '.join(names[:3])}" + (", ..." if len(names) > 3 else ""))
        return "; ".join(differences)

    def _move_aside(self, step: int, error: Exception):
        src = os.path.join(self.directory, str(step))
        dst_root = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR)
        dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
        logging.warning(
            "checkpoint %s cannot be restored (%s: %s); moved to %s, using the previous one",
            src, type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "", dst,
        )
        print(f"warning: checkpoint {src} is unusable ({type(error).__name__}); moved to {dst}", flush=True)
        if jax.process_index() == 0:
            os.makedirs(dst_root, exist_ok=True)
            shutil.move(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"move_aside_{step}")
        self.manager.close()
        self.manager = self._new_manager(self._options)


def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


# ---------------------------------------------------------------------------- read side


def resolve_step_dir(path: str) -> str:
    """A run directory (its newest step), a checkpoints/ directory, or a step directory."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if os.path.isdir(os.path.join(path, "state")):
        return path
    root = os.path.join(path, CKPT_DIR) if os.path.isdir(os.path.join(path, CKPT_DIR)) else path
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, "state")))
    if not steps:
        raise CheckpointError(f"no checkpoint found under {path}")
    return os.path.join(root, str(steps[-1]))


def run_dir_of(step_dir: str) -> str:
    return os.path.dirname(os.path.dirname(step_dir))


def read_config(step_dir: str) -> ml_collections.ConfigDict:
    for candidate in (os.path.join(step_dir, "config", "metadata"), os.path.join(run_dir_of(step_dir), "config.json")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return config_from_dict(json.load(f))
    raise CheckpointError(f"checkpoint {step_dir} has no config (config/metadata or ../../config.json)")


def load_params(path: str, target_params) -> tuple[Any, list[str]]:
    """Restore parameters from a checkpoint onto `target_params` (abstract, with shardings).

    Returns (params, names missing from the checkpoint). Shape or dtype mismatches raise a
    CheckpointError listing every offending name.
    """
    step_dir = resolve_step_dir(path)
    state_dir = os.path.join(step_dir, "state")
    meta = ocp.PyTreeCheckpointer().metadata(state_dir)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    if "params" not in tree:
        raise CheckpointError(f"checkpoint {step_dir} has no 'params' in its state")
    saved = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree["params"])[0]}
    wanted = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(target_params)[0]}
    missing = sorted(set(wanted) - set(saved))
    wrong = [
        f"{k} (checkpoint {tuple(saved[k].shape)}, model {tuple(wanted[k].shape)})"
        for k in sorted(set(wanted) & set(saved))
        if tuple(saved[k].shape) != tuple(wanted[k].shape)
    ]
    if wrong:
        raise CheckpointError(f"checkpoint {step_dir} does not fit the model: " + "; ".join(wrong))
    present = _subtree(target_params, set(saved))
    restore_args = ocp.checkpoint_utils.construct_restore_args({"params": present})
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir,
        args=ocp.args.PyTreeRestore(item={"params": present}, restore_args=restore_args, partial_restore=True),
    )
    return restored["params"], missing


def _subtree(tree, keep_keys: set[str]):
    """The part of a nested dict whose leaf key strings are in keep_keys."""

    def walk(node, prefix):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                sub = walk(v, prefix + f"['{k}']")
                if sub is not None:
                    out[k] = sub
            return out or None
        return node if prefix in keep_keys else None

    return walk(tree, "") or {}


def save_params_checkpoint(path: str, config, params, tokenizer=None) -> str:
    """Write a params-only checkpoint (e.g. an imported model) as a run directory at `path`:
    PATH/checkpoints/0/{state,config}, PATH/config.json and PATH/tokenizer/."""
    os.makedirs(path, exist_ok=True)
    ckpt = Checkpointer(path, keep=1, async_save=False)
    if ckpt.steps():
        raise CheckpointError(f"{path} already holds checkpoints; choose a new output directory")
    state = {"step": np.zeros((), np.int32), "params": params}
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(_config_dict(config))}
    ckpt.manager.save(0, args=ocp.args.Composite(**items))
    ckpt.close()
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, "tokenizer"))
    return os.path.join(path, CKPT_DIR, "0")


class TrainedModel:
    """A trained model on one device: `tokenizer`, `params`, `config`, `logits`, `hidden`."""

    def __init__(self, config, params, tokenizer, step_dir):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.step_dir = step_dir
        self.model_config = ModelConfig.from_config(config.model)
        self.model = LanguageModel(self.model_config)
        self._apply = jax.jit(self._forward, static_argnames=("mask_mode", "hidden"))

    def _forward(self, params, tokens, segment_ids, positions, mask_mode, hidden):
        method = self.model.encode if hidden else self.model.__call__
        out = self.model.apply({"params": params}, tokens, segment_ids, positions, mask_mode, method=method)
        return out.astype(jnp.float32)

    def _inputs(self, tokens_BxL):
        tokens = np.asarray(tokens_BxL, np.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        B, L = tokens.shape
        return tokens, np.ones((B, L), np.int32), np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))

    def logits(self, tokens_BxL, mask_mode: str = "bidirectional") -> np.ndarray:
        """float32 [B, L, vocab]; every row is one full segment (no padding)."""
        return np.asarray(self._apply(self.params, *self._inputs(tokens_BxL), mask_mode=mask_mode, hidden=False))

    def hidden(self, tokens_BxL, mask_mode: str = "bidirectional") -> np.ndarray:
        """float32 [B, L, hidden]: the encoder's final hidden states."""
        return np.asarray(self._apply(self.params, *self._inputs(tokens_BxL), mask_mode=mask_mode, hidden=True))


def load_checkpoint(path: str) -> TrainedModel:
    """A run directory (newest step) or a step directory -> TrainedModel on one device."""
    step_dir = resolve_step_dir(path)
    config = read_config(step_dir)
    model_cfg = ModelConfig.from_config(config.model)
    from mlm_vs_clm.model import init_params

    device = jax.devices()[0]
    single = jax.sharding.SingleDeviceSharding(device)
    abstract = nn.meta.unbox(jax.eval_shape(lambda r: init_params(model_cfg, r), jax.random.PRNGKey(0)))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single), abstract)
    params, missing = load_params(step_dir, target)
    if missing:
        raise CheckpointError(f"checkpoint {step_dir} lacks parameters: {', '.join(missing)}")
    tokenizer = None
    tok_dir = os.path.join(run_dir_of(step_dir), "tokenizer")
    if os.path.isdir(tok_dir):
        from mlm_vs_clm.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok_dir)
    return TrainedModel(config, params, tokenizer, step_dir)
