"""Our (config, params) -> a Hugging Face folder: config.json, safetensors weights, tokenizer.

Weights are streamed tensor by tensor into safetensors files (sharded with an index above
`shard_bytes`), so the export holds the parameters plus one tensor at a time.
- causal models: plain `LlamaForCausalLM` (model_type llama);
- bidirectional encoders: native `eurobert` folders (`EuroBertForMaskedLM`, and fine-tuned
  heads as `EuroBertForSequenceClassification` / `EuroBertForTokenClassification`), loaded with
  no remote code;
- the one thing EuroBERT cannot express, a fine-tuned *linear* sequence-classification head
  (or `last` pooling), keeps the remote-code format: a Llama config with `auto_map` and
  `modeling_bidir.py`.
A whole export is written into a temporary sibling folder and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile

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


@contextlib.contextmanager
def staged_folder(out_dir: str, overwrite: bool = False):
    """Yields a temporary folder beside `out_dir` that becomes `out_dir` when the block ends
    without an error (else it is removed). Refuses a non-empty `out_dir` unless `overwrite`;
    refuses a file at `out_dir` always."""
    from mlm_vs_clm.convert import ConversionError

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConversionError(f"export-hf: --out {out_dir!r} is a file")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConversionError(f"export-hf: --out {out_dir!r} is not empty; choose a new folder or pass --overwrite")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from other users
    try:
        yield tmp
        old = None
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))
        os.rename(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def _write_config(out_dir: str, config: dict) -> None:
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


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
    """Writes config.json and the weights of a pretrained model (LM head included) into
    `out_dir`: LlamaForCausalLM or EuroBertForMaskedLM. Returns the config."""
    os.makedirs(out_dir, exist_ok=True)
    config = hf_config(model_cfg, tokens or {}, mask_mode, max_positions, dtype)
    dims = Dims.of(model_cfg)
    write_safetensors(out_dir, iter_hf_tensors(params, dims), hf_shapes(dims), dtype, shard_bytes)
    _write_config(out_dir, config)
    return config


def write_sentence_transformers(out_dir: str, hidden_size: int, max_seq_length: int) -> None:
    """modules.json, sentence_bert_config.json and 1_Pooling/config.json: `SentenceTransformer(out_dir)`
    = the encoder (AutoModel) + mean pooling over the non-padding tokens (specials included,
    as our fine-tuning pools)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    with open(os.path.join(out_dir, "modules.json"), "w") as f:
        json.dump(modules, f, indent=2)
    with open(os.path.join(out_dir, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": int(max_seq_length), "do_lower_case": False}, f, indent=2)
    os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    pooling = {"word_embedding_dimension": int(hidden_size), **{f"pooling_mode_{m}": m == "mean_tokens" for m in modes},
               "include_prompt": True}
    with open(os.path.join(out_dir, "1_Pooling", "config.json"), "w") as f:
        json.dump(pooling, f, indent=2)


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
    overwrite: bool = False,
    sentence_transformers: bool = True,
) -> dict:
    """Our checkpoint (run or step directory) -> a Hugging Face folder; returns its config.
    Encoders also get the sentence-transformers files unless `sentence_transformers` is False."""
    from mlm_vs_clm import checkpoint
    from mlm_vs_clm.convert.hf_tokenizer import write_hf_tokenizer

    from mlm_vs_clm.convert import ConversionError

    source, target = os.path.realpath(checkpoint_path), os.path.realpath(out_dir)
    if os.path.commonpath([source, target]) == target:
        raise ConversionError(f"export-hf: --out {out_dir!r} holds the checkpoint itself; choose another folder")
    with staged_folder(out_dir, overwrite) as tmp:  # refuses a non-empty --out before loading anything
        step_dir = checkpoint.resolve_step_dir(checkpoint_path)
        if "finetuned" in checkpoint.read_config(step_dir):
            from mlm_vs_clm.convert.finetuned import export_finetuned_checkpoint

            return export_finetuned_checkpoint(step_dir, tmp, dtype, shard_bytes)
        model = checkpoint.load_checkpoint(step_dir)
        if mask_mode == "auto":
            mask_mode = auto_mask_mode(model.config, model.step_dir)
        seq_len = int(model.config.train.seq_len)
        config = export_params(model.params, model.model_config, tmp, mask_mode, tokens=dict(model.config.tokens),
                               max_positions=seq_len, dtype=dtype, shard_bytes=shard_bytes)
        if model.tokenizer is not None:
            write_hf_tokenizer(model.tokenizer, tmp, causal=mask_mode == "causal")
        if mask_mode == "bidirectional" and sentence_transformers:
            write_sentence_transformers(tmp, model.model_config.hidden_size, seq_len)
    return config
