"""Data: document sources, tokenizers, the demo corpus and the grain pipeline of packed rows."""

from mlm_vs_clm.data.tokenizer import (
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "train_tokenizer"]
