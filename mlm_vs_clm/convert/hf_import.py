"""Hugging Face Llama or EuroBERT checkpoint -> our (config, params): config checks and lazy
weight reading.

Supported: model_type 'llama' (Llama 3.x, SmolLM, TinyLlama, our own exports) and 'eurobert'
(native, or with the hub's `auto_map`: bidirectional encoders), grouped-query
attention, tied or untied embeddings, rope theta and 'llama3' rope scaling, weights in
safetensors (one file or sharded with an index). Anything else is refused with a
`ConversionError` naming the unsupported field.
"""

from __future__ import annotations

import json
import os
import tempfile

import ml_collections
import numpy as np

from mlm_vs_clm import checkpoint
from mlm_vs_clm.config import load_config
from mlm_vs_clm.convert import ConversionError
from mlm_vs_clm.convert.hf_tokenizer import import_hf_tokenizer
from mlm_vs_clm.convert.params import Dims, params_from_hf

SUPPORTED_MODEL_TYPES = ("llama", "eurobert")


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"import-hf: no config.json in {hf_dir!r}")
    with open(path) as f:
        return json.load(f)


def _rope_fields(hf: dict) -> dict:
    """rope_theta / rope_scaling (transformers 4) or rope_parameters (transformers 5)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    fields = {"rope_theta": float(theta), "rope_scaling": ""}
    if kind == "llama3":
        try:
            fields.update(
                rope_scaling="llama3",
                rope_scaling_factor=float(rope["factor"]),
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_position=int(rope["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ConversionError(f"import-hf: rope scaling 'llama3' is missing the field {e.args[0]!r}") from None
    elif kind != "default":
        raise ConversionError(f"import-hf: unsupported rope scaling type {kind!r} (supported: none, 'llama3')")
    return fields


def model_fields_from_hf(hf: dict) -> dict:
    """Our model.* fields from a Hugging Face config dict; refuses what our model cannot express."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"import-hf: unsupported model_type {model_type!r} (supported: 'llama', 'eurobert')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConversionError(f"import-hf: unsupported {key}=true (our blocks have no biases)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"import-hf: unsupported hidden_act {act!r} (only 'silu')")
    try:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        fields = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            ffn_size=int(hf["intermediate_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        )
    except KeyError as e:
        raise ConversionError(f"import-hf: config.json has no {e.args[0]!r}") from None
    if hidden % heads:
        raise ConversionError(f"import-hf: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    head_dim = hf.get("head_dim")
    if head_dim not in (None, hidden // heads):
        raise ConversionError(
            f"import-hf: unsupported head_dim {head_dim} "
            f"(our model uses hidden_size / num_attention_heads = {hidden // heads})"
        )
    if heads % fields["num_kv_heads"]:
        raise ConversionError(f"import-hf: num_attention_heads {heads} is not a multiple of num_key_value_heads")
    fields.update(_rope_fields(hf))
    return fields


def source_mask_mode(hf: dict) -> str:
    """The attention the Hugging Face model uses, from its architecture: 'bidirectional' for
    EuroBERT (model_type or class) and masked-LM classes, else what an explicit `is_causal`
    says (our remote-code encoders say false), 'causal' for transformers' own Llama classes
    (model_type llama, no `auto_map`), and '' (unknown) for other remote code."""
    archs = [a for a in (hf.get("architectures") or []) if isinstance(a, str)]
    if hf.get("model_type") == "eurobert" or any(a.startswith("EuroBert") or a.endswith("ForMaskedLM") for a in archs):
        return "bidirectional"
    if isinstance(hf.get("is_causal"), bool):
        return "causal" if hf["is_causal"] else "bidirectional"
    if hf.get("auto_map"):
        return ""
    return "causal"


class HFWeights:
    """Lazy reader over model.safetensors or a sharded model.safetensors.index.json."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open  # the `hf` extra: only an import from Hugging Face reads it

        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            found = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth"))]
            why = f" (found {found[0]!r}: re-save it with safe_serialization=True)" if found else ""
            raise ConversionError(f"import-hf: no model.safetensors in {hf_dir!r}{why}")
        self._handles = {name: safe_open(os.path.join(hf_dir, name), framework="pt") for name in files}
        self._where = {key: name for name, h in self._handles.items() for key in h.keys()}
        # Weights saved from a bare LlamaModel have no 'model.' prefix.
        self._prefix = "" if "model.embed_tokens.weight" in self._where else "model."
        if "embed_tokens.weight" not in self._where and self._prefix == "model.":
            raise ConversionError("import-hf: the weights have no model.embed_tokens.weight")
        self.used: set[str] = set()

    def _key(self, name: str) -> str:
        if self._prefix and name.startswith("model."):
            return name[len("model.") :]
        return name

    def __contains__(self, name: str) -> bool:
        return self._key(name) in self._where

    def __call__(self, name: str) -> np.ndarray:
        import torch  # the `hf` extra, heavy: safetensors hands out torch tensors (bf16 included)

        key = self._key(name)
        if key not in self._where:
            raise ConversionError(f"import-hf: the weights have no tensor {name!r}")
        self.used.add(key)
        return self._handles[self._where[key]].get_tensor(key).to(torch.float32).numpy()

    def unused(self) -> list[str]:
        return sorted(k for k in self._where if k not in self.used and not k.endswith("rotary_emb.inv_freq"))


def load_hf_params(hf_dir: str, hf: dict, scan_layers: bool = True) -> dict:
    """Our param tree (float32 numpy) from a Hugging Face directory whose config passed checks."""
    fields = model_fields_from_hf(hf)
    names = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size")
    dims = Dims(**{k: fields[k] for k in names})
    weights = HFWeights(hf_dir)
    tied = bool(hf.get("tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in weights:
        raise ConversionError("import-hf: no lm_head.weight and tie_word_embeddings is false")
    params = params_from_hf(weights, dims, scan_layers=scan_layers, tied=tied)
    if tied and "lm_head.weight" in weights:
        weights.used.add("lm_head.weight")
    extra = weights.unused()
    if extra:
        raise ConversionError(f"import-hf: unsupported tensor {extra[0]!r} ({len(extra)} unexpected tensors)")
    return params


def _grow_vocab(params: dict) -> dict:
    """One more vocabulary row: the mean input embedding, and the mean output-head column."""
    embedding_VxD = params["encoder"]["embed"]["embedding"]
    head_DxV = params["lm_head"]["kernel"]
    params["encoder"]["embed"]["embedding"] = np.concatenate([embedding_VxD, embedding_VxD.mean(0, keepdims=True)], 0)
    params["lm_head"]["kernel"] = np.concatenate([head_DxV, head_DxV.mean(1, keepdims=True)], 1)
    return params


def convert_hf(hf_dir: str, tokenizer_dir: str, scan_layers: bool = True,
               base_config: str = "configs/pretrain.py:tiny"):
    """A Hugging Face Llama folder -> (config, params, tokenizer), all in memory; the tokenizer
    (with a mask token) is written to `tokenizer_dir`. The config is `base_config` with model.*
    and tokens.* taken from the checkpoint, and `imported_from` (the folder, its architectures
    and its attention: what `export-hf --mask_mode=auto` uses for an untrained import)."""
    hf = read_hf_config(hf_dir)
    fields = model_fields_from_hf(hf)
    vocab_before = fields["vocab_size"]
    tokenizer, grew, mask_how = import_hf_tokenizer(hf_dir, tokenizer_dir, fields["vocab_size"])
    params = load_hf_params(hf_dir, hf, scan_layers=scan_layers)
    if grew:
        params = _grow_vocab(params)
        fields["vocab_size"] += 1
    config = load_config(base_config)
    for key, value in fields.items():
        config.model[key] = value
    config.model.scan_layers = scan_layers
    config.model.dtype = config.model.param_dtype = "float32"
    for role in ("pad", "unk", "bos", "eos", "mask"):
        config.tokens[f"{role}_id"] = getattr(tokenizer, f"{role}_id")
    config.tokens.special_ids = tuple(int(i) for i in tokenizer.special_ids)
    config.data.tokenizer = os.path.abspath(tokenizer_dir)
    config.data.tokenizer_vocab_size = tokenizer.vocab_size
    config.imported_from = ml_collections.ConfigDict(
        dict(
            hf=os.path.abspath(hf_dir),
            architectures=",".join(hf.get("architectures") or []),
            mask_mode=source_mask_mode(hf),
            model_type=str(hf.get("model_type")),
            mask_token=mask_how,
            vocab_size=vocab_before,
        )
    )
    return config, params, tokenizer


def describe_import(config) -> str:
    """One line: what the import chose (attention, mask token, vocabulary, pad/eos ids)."""
    src, tokens = config.imported_from, config.tokens
    grew = int(config.model.vocab_size) - int(src.get("vocab_size", config.model.vocab_size))
    size = config.model.vocab_size
    vocab = f"vocabulary grew {src.vocab_size} -> {size}" if grew else f"vocabulary {size}"
    return (f"{src.model_type} ({src.architectures or 'no architectures'}): {src.mask_mode or 'unknown'} attention; "
            f"mask token id {tokens.mask_id} ({src.mask_token}); {vocab}; "
            f"pad id {tokens.pad_id}, eos id {tokens.eos_id}, bos id {tokens.bos_id}")


def init_from_flags(config, out: str) -> list[str]:
    """The train flags that start a run from the imported checkpoint at `out` (the run takes
    the checkpoint's architecture, token ids and tokenizer itself: `init_from_architecture`)."""
    del config
    return [f"--config.init_from={out}"]


def import_hf(hf_dir: str, out: str, scan_layers: bool = True, base_config: str = "configs/pretrain.py:tiny"):
    """Writes a params-only checkpoint (run directory `out`) that `--config.init_from` and
    `load_checkpoint` accept; returns (its step directory, its config)."""
    source, target = os.path.realpath(hf_dir), os.path.realpath(out)
    if os.path.commonpath([source, target]) == source:
        raise ConversionError(f"import-hf: --out {out!r} is inside --hf {hf_dir!r}; choose a folder outside the source")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConversionError(f"import-hf: --out {out!r} is not an empty folder; choose a new --out")
    with tempfile.TemporaryDirectory() as tmp:
        config, params, tokenizer = convert_hf(hf_dir, os.path.join(tmp, "tokenizer"), scan_layers, base_config)
        config.data.tokenizer = os.path.abspath(os.path.join(out, "tokenizer"))
        return checkpoint.save_params_checkpoint(out, config, params, tokenizer), config
