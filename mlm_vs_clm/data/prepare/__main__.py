"""`python -m mlm_vs_clm.data.prepare`: prepare a corpus once (see mlm_vs_clm/data/prepare/__init__.py)."""

from __future__ import annotations

import os
import sys

from absl import app, flags

from mlm_vs_clm.config import flags_parser
from mlm_vs_clm.data.prepare import prepare
from mlm_vs_clm.data.sources import SourceError
from mlm_vs_clm.data.tokenizer import TokenizerError

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "Anything data.source takes (paths, globs, tfds:NAME, demo).")
flags.DEFINE_string("tokenizer", None, "A tokenizer folder (python -m mlm_vs_clm.data.tokenizer).")
flags.DEFINE_integer("seq_len", None, "Row length of the packed rows.")
flags.DEFINE_string("out", None, "Output folder: shards, manifest.json, the tokenizer's copy.")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "Worker processes (default: all cores).")
flags.DEFINE_integer("seed", 0, "Seed of the two-level document shuffle.")
flags.DEFINE_string("text_field", "text", "JSONL field / Parquet column / TFDS feature.")
flags.DEFINE_string("text_mode", "file", "Plain text: 'file' (one document per file) or 'blocks'.")
flags.DEFINE_float("shard_mb", 128.0, "Source text per shard (the memory of one worker).")
flags.DEFINE_integer("heldout_every", 64, "Hold out every Nth document of a shard (0: none).")
flags.DEFINE_integer("heldout_docs", 32, "At most this many held-out documents per shard.")
flags.DEFINE_enum("runner", "local", ["local", "beam"],
                  "Who runs the shards: 'local' (--workers processes) or 'beam' (Apache Beam, the [beam] extra).")
flags.DEFINE_string("beam_options", "", "With --runner=beam: Beam pipeline options, passed through "
                    "(e.g. '--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp'); "
                    "default: DirectRunner, on this machine.")
flags.mark_flags_as_required(["source", "tokenizer", "seq_len", "out"])


def main(argv) -> int:
    del argv
    f = FLAGS
    try:
        prepare(f.source, f.tokenizer, f.seq_len, f.out, f.workers, f.seed, f.text_field, f.text_mode,
                f.shard_mb, f.heldout_every, f.heldout_docs, runner=f.runner, beam_options=f.beam_options)
    except (SourceError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=flags_parser())
