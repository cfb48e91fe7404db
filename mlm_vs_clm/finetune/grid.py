"""The evaluation grid: checkpoints x tasks x learning rates x seeds, resumable.

Every finished run is appended to DIR/results.json at once (keyed by task, checkpoint,
learning rate and seed; the command line names a checkpoint by its absolute step directory,
so a run directory that has trained further is a new checkpoint); a rerun skips the keys it
finds there. Runs under other names (a results.json that named a checkpoint by the path as
given) stay in the file and are not reused. A checkpoint is loaded only if one of its runs is
still missing. The config is stored beside the runs, and a rerun whose result-affecting
settings (every key but RERUN_FREE_KEYS) differ from it is refused.

With `save_models` (the default), the best run so far of each (task, checkpoint) by validation
score (a run marked diverged included: its parameters are what it learnt) keeps its parameters
in DIR/models/TASK/CHECKPOINT-NAME/, a run directory that
`python -m mlm_vs_clm.convert export-hf` takes (classification and token classification heads
fine-tuned with bidirectional attention; other heads have no Hugging Face class and are not
saved). A better run replaces it; the replacement is written beside it and renamed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from mlm_vs_clm import checkpoint, sharding
from mlm_vs_clm.config import ConfigError
from mlm_vs_clm.convert import ConversionError
from mlm_vs_clm.convert.finetuned import finetuned_format, save_finetuned
from mlm_vs_clm.finetune import heads, report, runner
from mlm_vs_clm.finetune.tasks import featurize
from mlm_vs_clm.model import MASK_MODES, ModelConfig


@dataclasses.dataclass
class Checkpoint:
    """A named checkpoint; `load()` -> (ModelConfig, params with an 'encoder' subtree, tokenizer)."""

    name: str
    load: Callable


def checkpoint_paths(ft) -> list:
    paths = [ft.checkpoint] if ft.checkpoint else []
    extra = [ft.checkpoints] if isinstance(ft.checkpoints, str) else list(ft.checkpoints)
    for entry in extra:  # `--config.checkpoints=A,B` arrives as ('A,B',)
        for p in str(entry).strip("()").split(","):
            p = p.strip().strip("'\"")
            if p and p not in paths:
                paths.append(p)
    return paths


def _number_list(ft, key, cast):
    value = ft[key]
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    try:
        out = [cast(v) for v in value]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config: {key} must be a list of numbers, got {ft[key]!r}") from e
    if not out:
        raise ConfigError(f"config: {key} is empty")
    return out


def validate(ft) -> None:
    """Raise ConfigError (one line naming the key) for an invalid fine-tuning config."""
    ft.learning_rates = tuple(_number_list(ft, "learning_rates", float))
    ft.seeds = tuple(_number_list(ft, "seeds", int))
    if any(lr <= 0 for lr in ft.learning_rates):
        raise ConfigError(f"config: learning_rates must be positive, got {ft.learning_rates}")
    positive = ("batch_size", "eval_batch_size", "steps", "eval_every", "max_len", "query_max_len", "max_answer_tokens")
    for key in positive:
        if int(ft[key]) <= 0:
            raise ConfigError(f"config: {key} must be positive, got {ft[key]}")
    for key in ("token_classification_epochs", "token_classification_min_steps", "max_eval_examples",
                "max_train_examples", "chance_margin"):
        if ft[key] < 0:
            raise ConfigError(f"config: {key} must be >= 0, got {ft[key]}")
    if ft.attention not in MASK_MODES:
        raise ConfigError(f"config: attention must be one of {MASK_MODES}, got {ft.attention!r}")
    if ft.pooling not in heads.POOLINGS:
        raise ConfigError(f"config: pooling must be one of {heads.POOLINGS}, got {ft.pooling!r}")
    if ft.get("head", "linear") not in heads.HEADS:
        raise ConfigError(f"config: head must be one of {heads.HEADS}, got {ft.head!r}")
    if ft.attention == "causal" and ft.pooling == "first":
        raise ConfigError("config: pooling='first' with attention='causal' pools a token that sees only itself (the "
                          "same vector for every input): use pooling=mean or pooling=last")
    if not 0.0 <= ft.warmup_fraction < 1.0:
        raise ConfigError(f"config: warmup_fraction must be in [0, 1), got {ft.warmup_fraction}")
    if ft.retrieval_temperature <= 0:
        raise ConfigError(f"config: retrieval_temperature must be positive, got {ft.retrieval_temperature}")
    if ft.dtype not in ("", "float32", "bfloat16"):
        raise ConfigError(f"config: dtype must be '', 'float32' or 'bfloat16', got {ft.dtype!r}")
    try:
        mesh_sizes = sharding.mesh_shape(ft.mesh, jax.device_count())
    except ValueError as e:
        raise ConfigError(f"config: {e}") from e
    dp = mesh_sizes[0] * mesh_sizes[1]
    for key in ("batch_size", "eval_batch_size"):
        if ft[key] % dp:
            raise ConfigError(f"config: {key}={ft[key]} is not divisible by the {dp} data-parallel devices (mesh)")


def task_names(ft, known) -> list:
    names = [n.strip() for n in str(ft.tasks).split(",") if n.strip()] or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"config: tasks has unknown task(s) {unknown} for suite {ft.suite} (one of {list(known)})")
    return names


# Keys a rerun in the same workdir may change: the grid's axes (each run records its own task,
# checkpoint, learning rate and seed) and how the grid is executed. Every other key changes results.
RERUN_FREE_KEYS = ("learning_rates", "seeds", "checkpoint", "checkpoints", "tasks", "progress", "mesh", "save_models")


def _result_settings(config: dict) -> dict:
    """Dotted key -> value (as JSON stores it) of every result-affecting key."""
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif f"{prefix}{k}".split(".")[0] not in RERUN_FREE_KEYS:
                flat[prefix + k] = v

    walk(json.loads(json.dumps(config)), "")
    flat.setdefault("head", "linear")  # results stored before the head was a key used the linear head
    return flat


def check_workdir(ft, workdir: str) -> None:
    """Raise ConfigError if DIR/results.json was made with other result-affecting settings
    (its finished runs would be reused as if made with these). A results.json without a stored
    config (an older one) is accepted."""
    stored = report.load_config(workdir)
    if not stored:
        return
    old, new = _result_settings(stored), _result_settings(ft.to_dict())
    changed = sorted(k for k in old.keys() | new.keys() if k not in old or k not in new or old[k] != new[k])
    if changed:
        def show(settings):
            return ", ".join(f"{k}={settings.get(k, '(unset)')}" for k in changed)

        raise ConfigError(
            f"{os.path.join(workdir, report.RESULTS_JSON)} was made with {show(old)}; this config has "
            f"{show(new)}: use a new --workdir"
        )


def _with_dtype(model_cfg: ModelConfig, dtype: str) -> ModelConfig:
    return dataclasses.replace(model_cfg, dtype=dtype) if dtype else model_cfg


def run_grid(ft, checkpoints: list, tasks: list, workdir: str, mesh=None, progress=None) -> list:
    """Run every missing (task, checkpoint, lr, seed) and return all runs of the grid."""
    check_workdir(ft, workdir)
    mesh = mesh or sharding.make_mesh(ft.mesh)
    runs = report.load_runs(workdir)
    done = {report.run_key(r["task"], r["checkpoint"], r["lr"], r["seed"]) for r in runs}
    grid = [(t, c, lr, s) for c in checkpoints for t in tasks for lr in ft.learning_rates for s in ft.seeds]
    missing = [g for g in grid if report.run_key(g[0].name, g[1].name, g[2], g[3]) not in done]
    bar = progress(total=len(grid), initial=len(grid) - len(missing)) if progress else None
    config_json = ft.to_dict()
    for ckpt in checkpoints:
        todo = [g for g in missing if g[1] is ckpt]
        if not todo:
            continue
        model_cfg, params, tokenizer = ckpt.load()
        if tokenizer is None:
            raise ValueError(f"checkpoint {ckpt.name}: no tokenizer saved with it; fine-tuning needs one")
        model_cfg = _with_dtype(model_cfg, ft.dtype)
        for task in tasks:
            task_todo = [g for g in todo if g[0] is task]
            if not task_todo:
                continue
            t0 = time.time()
            features = featurize(task, tokenizer, ft.max_len, ft.query_max_len)
            setup = runner.build(model_cfg, task, ft, mesh)
            encoder = runner.place_encoder(setup, params["encoder"])
            logging.info("finetune: %s on %s featurised in %.1fs", task.name, ckpt.name, time.time() - t0)
            for _, _, lr, seed in task_todo:
                result = runner.run(setup, encoder, task, features, lr, seed)
                runs.append(
                    {
                        "task": task.name,
                        "checkpoint": ckpt.name,
                        "lr": lr,
                        "seed": seed,
                        "metric": task.metric,
                        "best_validation": result.best_validation,
                        "best_step": result.best_step,
                        "test": result.test,
                        "test_metrics": result.test_metrics,
                        "diverged": result.diverged,
                        "reason": result.reason,
                        "history": result.history,
                    }
                )
                report.save_runs(workdir, runs, config_json)
                if ft.get("save_models", False):
                    _keep_if_best(ft, workdir, runs, task, ckpt, result, tokenizer)
                if bar is not None:
                    score = result.test if result.test is None else round(result.test, 2)
                    bar.set_postfix_str(f"{task.name} lr={lr:g} seed={seed} -> {score}")
                    bar.update(1)
            del encoder
    if bar is not None:
        bar.close()
    in_grid = {report.run_key(t.name, c.name, lr, s) for t, c, lr, s in grid}
    return [r for r in runs if report.run_key(r["task"], r["checkpoint"], r["lr"], r["seed"]) in in_grid]


def model_dir(workdir: str, task_name: str, checkpoint_name: str) -> str:
    """Where the best run of (task, checkpoint) keeps its parameters."""
    slug = "_".join(p for p in os.path.normpath(checkpoint_name).split(os.sep)[-3:] if p and p != "checkpoints")
    return os.path.join(workdir, "models", task_name, slug or "checkpoint")


def _keep_if_best(ft, workdir: str, runs: list, task, ckpt, result, tokenizer) -> None:
    """Save `result`'s parameters if it is the best run of (task, checkpoint) by validation score."""
    if result.params is None or result.best_validation is None:
        return  # a run with no validation score has no best parameters
    try:
        finetuned_format(task.kind, ft.pooling, ft.get("head", "linear"), ft.attention)
    except ConversionError:
        return  # a head with no Hugging Face class: nothing to export, so nothing kept
    scores = [r["best_validation"] for r in runs if r["task"] == task.name and r["checkpoint"] == ckpt.name
              and r["best_validation"] is not None]
    if result.best_validation < max(scores):
        return
    if not os.path.isdir(ckpt.name):
        return  # a checkpoint not read from a folder has no config to save with the model
    pretrain_config = checkpoint.read_config(checkpoint.resolve_step_dir(ckpt.name))
    target = model_dir(workdir, task.name, ckpt.name)
    fresh, old = f"{target}.tmp", f"{target}.old"
    for leftover in (fresh, old):
        if os.path.exists(leftover):
            shutil.rmtree(leftover)
    params = jax.tree.map(np.asarray, result.params)
    save_finetuned(fresh, pretrain_config, params, task.kind, ft.pooling, ft.get("head", "linear"), ft.attention,
                   labels=list(task.labels), tokenizer=tokenizer)
    if os.path.exists(target):
        os.rename(target, old)
    os.rename(fresh, target)
    if os.path.exists(old):
        shutil.rmtree(old)

