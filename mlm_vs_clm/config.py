"""Configs: loading them outside of absl flags (tests, sweeps, notebooks), and validating them
before anything is compiled (one ConfigError naming the key and the reason)."""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from mlm_vs_clm import objectives, schedules, sharding
from mlm_vs_clm.kernels.ops import EMBED_GRAD_F32
from mlm_vs_clm.model import ATTENTION_IMPLS, REMAT_POLICIES, ROPE_SCALINGS

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


def unknown_override(argv, config, name: str = "config") -> str | None:
    """The first `--NAME.KEY=VALUE` of `argv` whose KEY is not in `config`, as the line to print:
    `unknown config key train.stepz (did you mean train.steps?)`; None when every key exists."""
    known = _dotted_keys(config)
    for arg in argv[1:]:
        if not arg.startswith(f"--{name}."):
            continue
        key = arg[len(name) + 3 :].partition("=")[0]
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
        return f"unknown config key {key}" + (f" (did you mean {close[0]}?)" if close else "")
    return None


def _dotted_keys(config, prefix: str = "") -> set[str]:
    out = set()
    for k, v in config.items():
        out.add(prefix + k)
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            out |= _dotted_keys(v, f"{prefix}{k}.")
    return out


def quiet_library_info(argv=None) -> None:
    """absl verbosity WARNING unless the command line sets one (--verbosity / -v): the INFO
    lines libraries log (libtpu's missing backend, orbax's checkpoint reads) say nothing a user
    can act on. The commands call this first in main()."""
    argv = sys.argv[1:] if argv is None else argv
    if not any(a.startswith(("--verbosity", "-v")) for a in argv):
        from absl import logging

        logging.set_verbosity(logging.WARNING)


def flags_parser(prefix: str = "error: ", name: str = "config"):
    """An absl `flags_parser` for commands with a config flag: a bad flag, config file or override
    prints one line (`error: unknown config key train.stepz (did you mean train.steps?)`) and
    exits with status 2, instead of absl's traceback or usage text."""

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # noqa: BLE001 - a bad flag or config: one line, exit 2
            config = _config_of(argv, name)
            msg = unknown_override(argv, config, name) if config is not None else None
            if msg is None:
                lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
                msg = lines[-1] if lines else type(e).__name__
            print(f"{prefix}{msg}", file=sys.stderr)
            sys.exit(2)

    return parse


def define_config_flag(default: str, help_text: str, prefix: str = "error: ", name: str = "config") -> None:
    """config_flags.DEFINE_config_file with a default config: absl loads it, with the command
    line's overrides, as the flag is defined, so a bad override is reported here, as one line
    (exit 2) like flags_parser does."""
    try:
        config_flags.DEFINE_config_file(name, default, help_text)
    except Exception as e:  # noqa: BLE001 - a bad override of the default config: one line, exit 2
        try:
            msg = unknown_override(sys.argv, load_config(default), name)
        except Exception:  # noqa: BLE001 - the default itself does not load: absl's message says why
            msg = None
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        print(f"{prefix}{msg or (lines[-1] if lines else type(e).__name__)}", file=sys.stderr)
        sys.exit(2)


def _config_of(argv, name: str):
    """The config that the `--NAME=SPEC` of `argv` (else the flag's default) names, or None."""
    flag = flags.FLAGS[name] if name in flags.FLAGS else None
    if flag is not None and isinstance(flag.value, ml_collections.ConfigDict):
        return flag.value
    spec = (flag.default_as_str or "").strip("'\"") if flag is not None else None
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith(f"--{name}="):
            spec = arg.partition("=")[2]
        elif arg == f"--{name}" and i + 1 < len(argv):
            spec = argv[i + 1]
    if not isinstance(spec, str) or not spec:
        return None
    try:
        return load_config(spec)
    except Exception:  # noqa: BLE001 - a config that does not load: absl's own message says why
        return None


def _require(cond: bool, key: str, reason: str):
    if not cond:
        raise ConfigError(f"{key}: {reason}")


def validate(config, num_devices: int, resuming: bool = False) -> None:
    """`resuming`: the run resumes from checkpoints of its own (an init_from source is then not
    read, and need not exist any more)."""
    m, t, o = config.model, config.train, config.optimizer
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size"):
        _require(int(m[key]) > 0, f"model.{key}", f"must be positive, got {m[key]}")
    _require(m.hidden_size % m.num_heads == 0, "model.num_heads",
             f"{m.num_heads} heads do not divide hidden_size {m.hidden_size}")
    _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
             f"{m.num_kv_heads} kv heads do not divide num_heads {m.num_heads}")
    _require((m.hidden_size // m.num_heads) % 2 == 0, "model.hidden_size", "head dimension must be even (rotary)")
    _require(m.remat_policy in REMAT_POLICIES, "model.remat_policy",
             f"unknown policy {m.remat_policy!r} (one of {', '.join(REMAT_POLICIES)})")
    _require(m.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"unsupported dtype {m.dtype!r}")
    _require(m.get("rope_scaling", "") in ROPE_SCALINGS, "model.rope_scaling",
             f"unknown scaling {m.get('rope_scaling')!r} (one of {', '.join(map(repr, ROPE_SCALINGS))})")
    _require(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
             f"unknown implementation {m.attention_impl!r} (one of {', '.join(map(repr, ATTENTION_IMPLS))})")
    _require(m.get("embed_grad_f32", "auto") in EMBED_GRAD_F32, "model.embed_grad_f32",
             f"unknown setting {m.get('embed_grad_f32')!r} (one of {', '.join(EMBED_GRAD_F32)})")
    _require(int(m.get("attention_max_segments", 2)) >= 2, "model.attention_max_segments",
             f"must be >= 2 (cuDNN reads a bound of 1 as unpacked rows), got {m.get('attention_max_segments')}")
    _require(0.0 < config.mlm.mask_ratio < 1.0, "mlm.mask_ratio", f"must be in (0, 1), got {config.mlm.mask_ratio}")
    _require(config.mlm.replacement in objectives.REPLACEMENTS, "mlm.replacement",
             f"unknown policy {config.mlm.replacement!r} (one of {', '.join(objectives.REPLACEMENTS)})")
    _require(t.steps > 0, "train.steps", f"must be positive, got {t.steps}")
    _require(t.seq_len > 1, "train.seq_len", f"must be > 1, got {t.seq_len}")
    _require(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    for key in ("log_every", "eval_every", "checkpoint_every", "eval_batches", "max_bad_steps", "keep"):
        _require(int(t[key]) > 0, f"train.{key}", f"must be positive, got {t[key]}")
    _require(o.schedule in schedules.LR_SCHEDULES, "optimizer.schedule",
             f"unknown schedule {o.schedule!r} ({', '.join(schedules.LR_SCHEDULES)})")
    _require(o.learning_rate > 0, "optimizer.learning_rate", "must be positive")
    _require(0 <= o.warmup_fraction < 1 and 0 <= o.decay_fraction <= 1, "optimizer.warmup_fraction",
             "warmup and decay fractions must be in [0, 1)")
    _require(o.schedule != "wsd" or o.warmup_fraction + o.decay_fraction <= 1, "optimizer.decay_fraction",
             f"warmup_fraction {o.warmup_fraction} + decay_fraction {o.decay_fraction} exceed 1: the decay "
             "would not reach its floor by train.steps")
    try:
        schedules.objective_schedule(config.objective, t.steps, config.mlm.mask_ratio)
    except ValueError as e:
        raise ConfigError(str(e).replace("objective:", "objective:", 1)) from None
    try:
        shape = sharding.mesh_shape(config.mesh, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(t.batch_size > 0, "train.batch_size", f"must be positive, got {t.batch_size}")
    try:
        sharding.check_batch_split(config, shape[0] * shape[1])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_parameter_sharding(config, shape)
    tok = config.tokens
    _require(0 <= tok.mask_id < m.vocab_size, "tokens.mask_id", f"{tok.mask_id} is outside the vocabulary")
    n_special = len({int(i) for i in tok.special_ids if 0 <= int(i) < m.vocab_size})
    _require(n_special < m.vocab_size, "tokens.special_ids",
             f"every id of the {m.vocab_size}-token vocabulary is special (MLM has no token to draw)")
    if config.init_from and not resuming:
        _require(os.path.exists(config.init_from), "init_from", f"{config.init_from} does not exist")
    for s in t.keep_steps:
        _require(0 < int(s) <= t.steps, "train.keep_steps", f"step {s} is outside 1..{t.steps}")


def _check_parameter_sharding(config, shape) -> None:
    """Every parameter dimension divides over the mesh axes that `mesh.rules` shard it on (a jitted
    function's parameters cannot be split unevenly): e.g. model.hidden_size ('embed') over fsdp."""
    m = config.model
    dims = {  # logical axis of a parameter dimension -> (config key, size)
        "vocab": ("model.vocab_size", m.vocab_size),
        "embed": ("model.hidden_size", m.hidden_size),
        "norm": ("model.hidden_size", m.hidden_size),
        "heads": ("model.num_heads", m.num_heads),
        "kv_heads": ("model.num_kv_heads", m.num_kv_heads),
        "head_dim": ("model.hidden_size", m.hidden_size // m.num_heads),
        "mlp": ("model.ffn_size", m.ffn_size),
    }
    if m.scan_layers:
        dims["layers"] = ("model.num_layers", m.num_layers)
    sizes = dict(zip(sharding.MESH_AXES, shape))
    seen = set()
    for name, axes in sharding.rules(config):  # the first rule of a name is the one applied
        if name not in dims or name in seen:
            continue
        seen.add(name)
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        n = math.prod(sizes.get(a, 1) for a in axes)
        key, size = dims[name]
        what = f"head dimension {size}" if name == "head_dim" else str(size)
        _require(int(size) % n == 0, key, f"{what} is not divisible by {' x '.join(f'mesh.{a}' for a in axes)}={n} "
                 f"(the parameters' {name!r} axis is sharded over it)")
