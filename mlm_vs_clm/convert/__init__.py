"""Hugging Face conversion: `python -m mlm_vs_clm.convert export-hf|import-hf` (see docs/convert.md).

params.py      our param tree <-> Llama state dict, tensor by tensor
hf_import.py   Hugging Face Llama folder -> our checkpoint
hf_export.py   our checkpoint -> Hugging Face folder (streamed safetensors)
hf_tokenizer.py  tokenizers in both directions (mask token added on import)
modeling_bidir.py  the bidirectional encoder classes written into exported folders
"""


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message names the field or file at fault."""
