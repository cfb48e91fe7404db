"""Loading and validating configs outside of absl flags (tests, sweeps, notebooks)."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the reason."""


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """`configs/pretrain.py:tiny,clm` (relative to the repo root or the cwd) -> ConfigDict.

    `overrides` maps dotted keys to values: {"train.steps": 10}.
    """
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        path = os.path.join(REPO_ROOT, path)
    if not os.path.exists(path):
        raise ConfigError(f"config: file {spec.partition(':')[0]!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"_mlm_vs_clm_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for key, value in (overrides or {}).items():
        set_key(config, key, value)
    return config


def set_key(config, dotted: str, value) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
        if p not in node:
            raise ConfigError(f"config: unknown key {dotted!r}")
        node = node[p]
    if leaf not in node:
        raise ConfigError(f"config: unknown key {dotted!r}")
    node[leaf] = value
