"""`python -m mlm_vs_clm.data.tokenizer`: train a sentencepiece tokenizer on a data source
(see mlm_vs_clm/data/tokenizer/__init__.py)."""

from __future__ import annotations

import os
import sys

from absl import app, flags

from mlm_vs_clm.config import flags_parser
from mlm_vs_clm.data import sources
from mlm_vs_clm.data.tokenizer import MODEL_FILE, TokenizerError, train_tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "Data source: path, glob, tfds:NAME[:SPLIT] or demo.")
flags.DEFINE_integer("vocab_size", None, "Pieces of the tokenizer.")
flags.DEFINE_string("out", None, "Output directory (gets spiece.model).")
flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "sentencepiece model type.")
flags.DEFINE_string("text_field", "text", "JSONL field / Parquet column / TFDS feature.")
flags.DEFINE_enum("text_mode", "file", list(sources.TEXT_MODES), "Plain text: one document per file, or blocks.")
flags.DEFINE_bool("exact", False, "Fail unless exactly vocab_size pieces are reached.")
flags.DEFINE_integer("max_chars", 200_000_000, "Train on at most this much text.")
flags.mark_flags_as_required(["input", "vocab_size", "out"])


def main(argv) -> int:
    del argv
    f = FLAGS
    try:
        source = sources.open_source(f.input, f.text_field, f.text_mode)
        tok = train_tokenizer(sources.sample_texts(source, f.max_chars), f.vocab_size, f.out, f.model_type, f.exact)
    except (sources.SourceError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(f.out, MODEL_FILE)} ({tok.vocab_size} pieces, special ids {tok.special_ids})")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=flags_parser())
