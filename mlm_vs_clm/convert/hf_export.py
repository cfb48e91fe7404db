"""Our (config, params) -> a Hugging Face folder: config.json, safetensors weights, tokenizer.

Weights are streamed tensor by tensor into safetensors files (sharded with an index above
`shard_bytes`; the format is in hf_format.py), so the export holds the parameters plus one tensor at a time.
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
import os
import shutil
import tempfile

from mlm_vs_clm import checkpoint, schedules
from mlm_vs_clm.convert import ConversionError
from mlm_vs_clm.convert.finetuned import export_finetuned_checkpoint
from mlm_vs_clm.convert.hf_format import DEFAULT_SHARD_BYTES, hf_config, write_config, write_safetensors
from mlm_vs_clm.convert.hf_tokenizer import write_hf_tokenizer
from mlm_vs_clm.convert.params import Dims, hf_shapes, iter_hf_tensors


@contextlib.contextmanager
def staged_folder(out_dir: str, overwrite: bool = False):
    """Yields a temporary folder beside `out_dir` that becomes `out_dir` when the block ends
    without an error (else it is removed). Refuses a non-empty `out_dir` unless `overwrite`;
    refuses a file at `out_dir` always."""
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
    write_config(out_dir, config)
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
    schedule = schedules.objective_schedule(config.objective, config.train.steps, config.mlm.mask_ratio)
    return schedule(max(step - 1, 0)).mask_mode


def auto_mask_mode(config, step_dir: str) -> str:
    """--mask_mode=auto: the mask of the objective that trained the last step; at step 0 (no
    step of ours trained it: an import) the attention recorded from the source model."""
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
    source, target = os.path.realpath(checkpoint_path), os.path.realpath(out_dir)
    if os.path.commonpath([source, target]) == target:
        raise ConversionError(f"export-hf: --out {out_dir!r} holds the checkpoint itself; choose another folder")
    with staged_folder(out_dir, overwrite) as tmp:  # refuses a non-empty --out before loading anything
        step_dir = checkpoint.resolve_step_dir(checkpoint_path)
        if "finetuned" in checkpoint.read_config(step_dir):
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
