"""Config validation before anything is compiled: one ConfigError naming the key and reason."""

from __future__ import annotations

import math
import os

from mlm_vs_clm import schedules, sharding
from mlm_vs_clm.config import ConfigError
from mlm_vs_clm.model import ATTENTION_IMPLS, REMAT_POLICIES, ROPE_SCALINGS


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
    _require(int(m.get("attention_max_segments", 2)) >= 2, "model.attention_max_segments",
             f"must be >= 2 (cuDNN reads a bound of 1 as unpacked rows), got {m.get('attention_max_segments')}")
    _require(0.0 < config.mlm.mask_ratio < 1.0, "mlm.mask_ratio", f"must be in (0, 1), got {config.mlm.mask_ratio}")
    _require(config.mlm.replacement in ("mask", "80_10_10"), "mlm.replacement",
             f"unknown policy {config.mlm.replacement!r} ('mask' or '80_10_10')")
    _require(t.steps > 0, "train.steps", f"must be positive, got {t.steps}")
    _require(t.seq_len > 1, "train.seq_len", f"must be > 1, got {t.seq_len}")
    _require(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    for key in ("log_every", "eval_every", "checkpoint_every", "eval_batches", "max_bad_steps", "keep"):
        _require(int(t[key]) > 0, f"train.{key}", f"must be positive, got {t[key]}")
    _require(o.schedule in ("wsd", "cosine", "constant"), "optimizer.schedule",
             f"unknown schedule {o.schedule!r} (wsd, cosine, constant)")
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
    dp = shape[0] * shape[1]
    _require(t.batch_size > 0, "train.batch_size", f"must be positive, got {t.batch_size}")
    _require(t.batch_size % (dp * t.grad_accum_steps) == 0, "train.batch_size",
             f"{t.batch_size} is not divisible by data-parallel size {dp} x grad_accum_steps {t.grad_accum_steps}")
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
