"""Our (config, params) -> a Hugging Face folder: config.json, safetensors weights, modeling file.

Weights are streamed tensor by tensor into safetensors files (sharded with an index above
`shard_bytes`), so the export holds the parameters plus one tensor at a time. Causal models
load as plain `LlamaForCausalLM`; bidirectional encoders get `modeling_bidir.py` and an
`auto_map` for AutoModel / AutoModelForMaskedLM / AutoModelForSequenceClassification /
AutoModelForTokenClassification (with `trust_remote_code=True`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct

import ml_dtypes
import numpy as np

from mlm_vs_clm.convert.params import Dims, hf_shapes, iter_hf_tensors

DEFAULT_SHARD_BYTES = 5 * 1024**3
MODELING_FILE = "modeling_bidir.py"
_DTYPES = {  # name -> (numpy dtype, safetensors code)
    "float32": (np.dtype(np.float32), "F32"),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16"),
    "float16": (np.dtype(np.float16), "F16"),
}
BIDIR_AUTO_MAP = {
    "AutoModel": "modeling_bidir.BidirLlamaModel",
    "AutoModelForMaskedLM": "modeling_bidir.BidirLlamaForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_bidir.BidirLlamaForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_bidir.BidirLlamaForTokenClassification",
}


def hf_config(model_cfg, tokens, mask_mode: str, max_positions: int = 2048, dtype: str = "float32") -> dict:
    """A LlamaConfig dict (rope in the transformers-4 spelling, which transformers 5 also reads)
    plus `is_causal` and `mask_token_id`."""
    if mask_mode not in ("causal", "bidirectional"):
        raise ValueError(f"export-hf: mask_mode must be 'causal' or 'bidirectional', got {mask_mode!r}")
    causal = mask_mode == "causal"
    rope_scaling = None
    if model_cfg.rope_scaling == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": model_cfg.rope_scaling_factor,
            "low_freq_factor": model_cfg.rope_low_freq_factor,
            "high_freq_factor": model_cfg.rope_high_freq_factor,
            "original_max_position_embeddings": model_cfg.rope_original_max_position,
        }
        max_positions = max(max_positions, int(model_cfg.rope_original_max_position * model_cfg.rope_scaling_factor))
    elif model_cfg.rope_scaling:
        raise ValueError(f"export-hf: unsupported model.rope_scaling {model_cfg.rope_scaling!r}")
    config = {
        "architectures": ["LlamaForCausalLM" if causal else "BidirLlamaForMaskedLM"],
        "model_type": "llama",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.hidden_size,
        "intermediate_size": model_cfg.ffn_size,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_heads,
        "num_key_value_heads": model_cfg.num_kv_heads,
        "head_dim": model_cfg.hidden_size // model_cfg.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(max_positions),
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_theta": model_cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": model_cfg.init_std,
        "torch_dtype": dtype,
        "use_cache": causal,
        "is_causal": causal,
        "bos_token_id": tokens.get("bos_id"),
        "eos_token_id": tokens.get("eos_id"),
        "pad_token_id": tokens.get("pad_id"),
        "mask_token_id": tokens.get("mask_id"),
    }
    if not causal:
        config["auto_map"] = dict(BIDIR_AUTO_MAP)
        config["classifier_pooling"] = "mean"
    return config


def _plan_shards(shapes: dict, itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Greedy split of tensor names (in order) into shards of at most shard_bytes (a larger
    tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        n = math.prod(shape) * itemsize
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        shards.append(current)
    return shards


def _header(names, shapes, code, itemsize) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        n = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # 8-byte aligned data section


def write_safetensors(out_dir, tensors, shapes: dict, dtype="float32", shard_bytes=DEFAULT_SHARD_BYTES) -> list[str]:
    """Streams `tensors` ((name, array) in the order of `shapes`) into safetensors file(s).

    Returns the file names written; more than one adds model.safetensors.index.json.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"export-hf: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    np_dtype, code = _DTYPES[dtype]
    shards = _plan_shards(shapes, np_dtype.itemsize, shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    tensors = iter(tensors)
    weight_map = {}
    for file_name, shard in zip(names, shards):
        header = _header(shard, shapes, code, np_dtype.itemsize)
        with open(os.path.join(out_dir, file_name), "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for expected in shard:
                name, array = next(tensors)
                if name != expected or tuple(array.shape) != tuple(shapes[name]):
                    raise RuntimeError(f"export-hf: tensor order mismatch at {name} (expected {expected})")
                f.write(np.ascontiguousarray(array.astype(np_dtype, copy=False)).reshape(-1).view(np.uint8).data)
                weight_map[name] = file_name
    if len(names) > 1:
        total = sum(math.prod(s) for s in shapes.values()) * np_dtype.itemsize
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def export_params(
    params,
    model_cfg,
    out_dir: str,
    mask_mode: str,
    tokens: dict | None = None,
    max_positions: int = 2048,
    dtype: str = "float32",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict:
    """Writes config.json, the weights and (bidirectional) the modeling file; returns the config."""
    os.makedirs(out_dir, exist_ok=True)
    config = hf_config(model_cfg, tokens or {}, mask_mode, max_positions, dtype)
    dims = Dims.of(model_cfg)
    write_safetensors(out_dir, iter_hf_tensors(params, dims), hf_shapes(dims), dtype, shard_bytes)
    if mask_mode == "bidirectional":
        shutil.copyfile(os.path.join(os.path.dirname(__file__), MODELING_FILE), os.path.join(out_dir, MODELING_FILE))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return config


def trained_mask_mode(config, step: int) -> str:
    """The attention mask of the objective that trained the checkpoint's last step."""
    from mlm_vs_clm import schedules

    schedule = schedules.objective_schedule(config.objective, config.train.steps, config.mlm.mask_ratio)
    return schedule(max(step - 1, 0)).mask_mode


def auto_mask_mode(config, step_dir: str) -> str:
    """--mask_mode=auto: the mask of the objective that trained the last step; at step 0 (no
    step of ours trained it: an import) the attention recorded from the source model."""
    from mlm_vs_clm.convert import ConversionError

    step = int(os.path.basename(os.path.normpath(step_dir)))
    if step > 0:
        return trained_mask_mode(config, step)
    recorded = config.get("imported_from", {}).get("mask_mode", "")
    if not recorded:
        raise ConversionError(
            f"export-hf: {step_dir} is step 0 (never trained) and records no source attention; "
            "pass --mask_mode=causal or --mask_mode=bidirectional"
        )
    return recorded


def export_checkpoint(
    checkpoint_path: str,
    out_dir: str,
    mask_mode: str = "auto",
    dtype: str = "float32",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict:
    """Our checkpoint (run or step directory) -> a Hugging Face folder; returns its config."""
    from mlm_vs_clm import checkpoint
    from mlm_vs_clm.convert import ConversionError
    from mlm_vs_clm.convert.hf_tokenizer import write_hf_tokenizer

    if os.path.exists(os.path.join(out_dir, "config.json")):
        raise ConversionError(f"export-hf: {out_dir!r} already holds an export; choose a new --out")
    model = checkpoint.load_checkpoint(checkpoint_path)
    if mask_mode == "auto":
        mask_mode = auto_mask_mode(model.config, model.step_dir)
    config = export_params(
        model.params,
        model.model_config,
        out_dir,
        mask_mode,
        tokens=dict(model.config.tokens),
        max_positions=int(model.config.train.seq_len),
        dtype=dtype,
        shard_bytes=shard_bytes,
    )
    if model.tokenizer is not None:
        write_hf_tokenizer(model.tokenizer, out_dir)
    return config
