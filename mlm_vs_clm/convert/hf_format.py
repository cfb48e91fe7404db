"""The Hugging Face folder format an export writes: config.json (transformers-5 spellings) and
safetensors weights streamed tensor by tensor (sharded with an index above `shard_bytes`).
Shared by the pretrained-model export (hf_export.py) and the fine-tuned one (finetuned.py).
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

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


def _rope_parameters(model_cfg) -> tuple[dict, int | None]:
    """transformers-5 `rope_parameters` and the max position it implies (or None)."""
    rope = {"rope_type": "default", "rope_theta": float(model_cfg.rope_theta)}
    if model_cfg.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=model_cfg.rope_scaling_factor,
            low_freq_factor=model_cfg.rope_low_freq_factor,
            high_freq_factor=model_cfg.rope_high_freq_factor,
            original_max_position_embeddings=model_cfg.rope_original_max_position,
        )
        return rope, int(model_cfg.rope_original_max_position * model_cfg.rope_scaling_factor)
    if model_cfg.rope_scaling:
        raise ValueError(f"export-hf: unsupported model.rope_scaling {model_cfg.rope_scaling!r}")
    return rope, None


def hf_config(model_cfg, tokens, mask_mode: str, max_positions: int = 2048, dtype: str = "float32",
              architecture: str = "") -> dict:
    """The config.json of an export (transformers-5 spellings: `rope_parameters`, `dtype`).

    causal: a LlamaConfig for LlamaForCausalLM. bidirectional: a EuroBertConfig
    (`architecture` defaults to EuroBertForMaskedLM). `architecture` = 'remote': a LlamaConfig
    with `is_causal: false` and the `auto_map` of modeling_bidir.py."""
    if mask_mode not in ("causal", "bidirectional"):
        raise ValueError(f"export-hf: mask_mode must be 'causal' or 'bidirectional', got {mask_mode!r}")
    causal = mask_mode == "causal"
    rope, implied = _rope_parameters(model_cfg)
    config = {
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.hidden_size,
        "intermediate_size": model_cfg.ffn_size,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_heads,
        "num_key_value_heads": model_cfg.num_kv_heads,
        "head_dim": model_cfg.hidden_size // model_cfg.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max(int(max_positions), implied or 0),
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_parameters": rope,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": model_cfg.init_std,
        "dtype": dtype,
        "use_cache": causal,
        "bos_token_id": tokens.get("bos_id"),
        "eos_token_id": tokens.get("eos_id"),
        "pad_token_id": tokens.get("pad_id"),
        "mask_token_id": tokens.get("mask_id"),
    }
    if causal:
        config.update(architectures=["LlamaForCausalLM"], model_type="llama", is_causal=True)
    elif architecture == "remote":
        config.update(architectures=["BidirLlamaForSequenceClassification"], model_type="llama", is_causal=False,
                      auto_map=dict(BIDIR_AUTO_MAP), classifier_pooling="mean")
    else:
        config.update(architectures=[architecture or "EuroBertForMaskedLM"], model_type="eurobert",
                      classifier_pooling="mean")
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


def write_config(out_dir: str, config: dict) -> None:
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
