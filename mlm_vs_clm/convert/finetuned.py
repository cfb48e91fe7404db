"""Fine-tuned models (see finetune/heads.py) -> Hugging Face classifiers.

| fine-tuned                                         | exported as                              |
| token classification                               | EuroBertForTokenClassification (native)  |
| classification, head 'eurobert', pooling mean/first | EuroBertForSequenceClassification (native) |
| classification, head 'linear' (or pooling 'last')   | remote code: modeling_bidir.py           |

A fine-tuned checkpoint is a params-only run directory (`save_finetuned`) whose config has
`finetuned` (kind, pooling, head, attention, labels) and whose params are the FinetuneModel
tree {'encoder', 'head'[, 'head_dense']}; `export-hf --checkpoint=` takes it like any other.
"""

from __future__ import annotations

import os
import shutil

import flax.linen as nn
import jax
import numpy as np

from mlm_vs_clm import checkpoint
from mlm_vs_clm.convert import ConversionError
from mlm_vs_clm.convert.hf_format import DEFAULT_SHARD_BYTES, MODELING_FILE, hf_config, write_config, write_safetensors
from mlm_vs_clm.convert.hf_tokenizer import write_hf_tokenizer
from mlm_vs_clm.convert.params import Dims, hf_shapes, iter_hf_tensors
from mlm_vs_clm.data.tokenizer import load_tokenizer
from mlm_vs_clm.finetune.heads import FinetuneModel, init_head
from mlm_vs_clm.model import ModelConfig

# our pooling -> EuroBERT's classifier_pooling ('last' has no EuroBERT counterpart)
EUROBERT_POOLING = {"mean": "mean", "first": "bos"}


def _dense_tensors(prefix: str, dense: dict):
    """Our Dense {'kernel' [D, C], 'bias' [C]} -> (name, array) of a torch Linear."""
    yield f"{prefix}.weight", np.ascontiguousarray(np.asarray(dense["kernel"], np.float32).T)
    yield f"{prefix}.bias", np.ascontiguousarray(np.asarray(dense["bias"], np.float32))


def finetuned_format(kind: str, pooling: str = "mean", head: str = "linear", attention: str = "bidirectional") -> str:
    """Which Hugging Face class a fine-tuned model exports as (or a ConversionError saying why
    it cannot): 'EuroBertForSequenceClassification', 'EuroBertForTokenClassification' or
    'remote' (a linear sequence-classification head, or `last` pooling: modeling_bidir.py)."""
    if attention != "bidirectional":
        raise ConversionError(
            f"export-hf: a head fine-tuned with {attention!r} attention has no Hugging Face encoder class")
    if kind == "token_classification":
        return "EuroBertForTokenClassification"
    if kind != "classification":
        raise ConversionError(
            f"export-hf: fine-tuned {kind!r} heads are not exported (classification and token_classification are)")
    if head == "eurobert":
        if pooling not in EUROBERT_POOLING:
            raise ConversionError(
                f"export-hf: the eurobert head with {pooling!r} pooling has no Hugging Face class (use mean or first)")
        return "EuroBertForSequenceClassification"
    if head != "linear":
        raise ConversionError(f"export-hf: unknown fine-tuning head {head!r}")
    return "remote"


def export_finetuned(
    params,
    model_cfg,
    out_dir: str,
    kind: str,
    pooling: str = "mean",
    head: str = "linear",
    attention: str = "bidirectional",
    tokens: dict | None = None,
    max_positions: int = 2048,
    dtype: str = "float32",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    labels: list[str] | None = None,
) -> dict:
    """A fine-tuned tree ({'encoder', 'head'[, 'head_dense']}, see finetune/heads.py) -> the
    matching Hugging Face classifier in `out_dir`; returns its config."""
    arch = finetuned_format(kind, pooling, head, attention)
    num_labels = int(np.asarray(params["head"]["bias"]).shape[0])
    dims = Dims.of(model_cfg)
    config = hf_config(model_cfg, tokens or {}, "bidirectional", max_positions, dtype, architecture=arch)
    labels = list(labels) if labels else [f"LABEL_{i}" for i in range(num_labels)]
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    config["label2id"] = {name: i for i, name in enumerate(labels)}
    D, C = dims.hidden_size, num_labels

    def tensors():
        yield from iter_hf_tensors(params, dims, with_head=False)
        if arch == "EuroBertForSequenceClassification":
            yield from _dense_tensors("dense", params["head_dense"])
            yield from _dense_tensors("classifier", params["head"])
        elif arch == "EuroBertForTokenClassification":
            yield from _dense_tensors("classifier", params["head"])
        else:
            yield from _dense_tensors("score", params["head"])

    shapes = hf_shapes(dims, with_head=False)
    if arch == "EuroBertForSequenceClassification":
        shapes.update({"dense.weight": (D, D), "dense.bias": (D,),
                       "classifier.weight": (C, D), "classifier.bias": (C,)})
        config["classifier_pooling"] = EUROBERT_POOLING[pooling]
    elif arch == "EuroBertForTokenClassification":
        shapes.update({"classifier.weight": (C, D), "classifier.bias": (C,)})
    else:
        shapes.update({"score.weight": (C, D), "score.bias": (C,)})
        config["classifier_pooling"] = pooling
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(out_dir, tensors(), shapes, dtype, shard_bytes)
    if arch == "remote":
        shutil.copyfile(os.path.join(os.path.dirname(__file__), MODELING_FILE), os.path.join(out_dir, MODELING_FILE))
    write_config(out_dir, config)
    return config


def save_finetuned(path: str, config, params, kind: str, pooling: str = "mean", head: str = "linear",
                   attention: str = "bidirectional", labels=None, tokenizer=None) -> str:
    """Writes a fine-tuned model as a params-only run directory that `export-hf` takes;
    `config` is the pretraining config (its model.* and tokens.*). Returns the step directory."""
    finetuned_format(kind, pooling, head, attention)  # refuse what cannot be exported, before writing
    config = config.copy_and_resolve_references()
    num_labels = int(np.asarray(params["head"]["bias"]).shape[0])
    config.finetuned = dict(kind=kind, pooling=pooling, head=head, attention=attention, num_labels=num_labels,
                            labels=",".join(labels) if labels else "")
    return checkpoint.save_params_checkpoint(path, config, params, tokenizer)


def _finetune_model(config):
    f = config.finetuned
    return FinetuneModel(ModelConfig.from_config(config.model), f.kind, int(f.num_labels), f.pooling, f.attention,
                         f.head)


def load_finetuned(step_dir: str):
    """(config, params as numpy, tokenizer or None) of a checkpoint written by `save_finetuned`."""
    config = checkpoint.read_config(step_dir)
    model = _finetune_model(config)
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = nn.meta.unbox(jax.eval_shape(lambda r: init_head(model, r), jax.random.PRNGKey(0)))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single), abstract)
    params, missing = checkpoint.load_params(step_dir, target)
    if missing:
        raise ConversionError(f"export-hf: fine-tuned checkpoint {step_dir} lacks {', '.join(missing)}")
    tokenizer = None
    tok_dir = os.path.join(checkpoint.run_dir_of(step_dir), "tokenizer")
    if os.path.isdir(tok_dir):
        tokenizer = load_tokenizer(tok_dir)
    return config, jax.tree.map(np.asarray, params), tokenizer


def export_finetuned_checkpoint(step_dir: str, out_dir: str, dtype: str = "float32",
                                shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    config, params, tokenizer = load_finetuned(step_dir)
    f = config.finetuned
    hf = export_finetuned(params, ModelConfig.from_config(config.model), out_dir, f.kind, f.pooling, f.head,
                          f.attention, tokens=dict(config.tokens), max_positions=int(config.train.seq_len),
                          dtype=dtype, shard_bytes=shard_bytes, labels=[x for x in f.labels.split(",") if x] or None)
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, out_dir)
    return hf
