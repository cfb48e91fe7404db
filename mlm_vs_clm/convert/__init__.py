"""Hugging Face conversion: `python -m mlm_vs_clm.convert export-hf|import-hf` (see docs/convert.md).

params.py      our param tree <-> Llama state dict, tensor by tensor
hf_import.py   Hugging Face Llama or EuroBERT folder -> our checkpoint
hf_export.py   our checkpoint -> Hugging Face folder (streamed safetensors): LlamaForCausalLM,
               native EuroBERT (masked LM, fine-tuned heads), sentence-transformers files
hf_tokenizer.py  tokenizers in both directions (mask token added on import)
hf_format.py   the folder format both exports write: config.json, streamed (sharded) safetensors
finetuned.py   fine-tuned checkpoints -> Hugging Face classifiers
modeling_bidir.py  remote-code encoder classes, only for fine-tuned linear classification heads
"""


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message names the field or file at fault."""
