"""`python -m mlm_vs_clm.bench.data_path`: the prepared-corpus benchmarks (see __init__.py beside it)."""

from __future__ import annotations

import json
import os
import shutil
import sys

from absl import app, flags

from mlm_vs_clm.bench.data_path import (
    launch_equality,
    loader_rows_per_second,
    memory,
    prepare_rates,
    write_synthetic_corpus,
)
from mlm_vs_clm.config import flags_parser

FLAGS = flags.FLAGS
flags.DEFINE_string("dir", "/tmp/prepare_bench", "Scratch folder for the synthetic corpora.")
flags.DEFINE_integer("loader_rows", 8192, "Rows of the synthetic prepared corpus the loader reads.")
flags.DEFINE_integer("batch", 2304, "Global batch (rows per step).")
flags.DEFINE_float("seconds", 5.0, "How long each loader measurement runs.")
flags.DEFINE_integer("seq_len", 2048, "Row length.")
flags.DEFINE_string("processes", "1,8,64", "Simulated process counts of the loader.")
flags.DEFINE_string("text_mb", "8,64", "Sizes of the synthetic text corpora for prepare, in MB.")
flags.DEFINE_integer("vocab", 8000, "Pieces of the tokenizer trained for prepare.")
flags.DEFINE_float("shard_mb", 4.0, "prepare's --shard_mb.")
flags.DEFINE_enum("skip", "", ["", "loader", "prepare", "both"], "Skip the loader, prepare, or both measurements.")
flags.DEFINE_string("memory_mb", "", "Demo-text corpus sizes (MB) of the memory runs, e.g. 512,4096 (empty: not run).")
flags.DEFINE_integer("memory_batch", 256, "Global batch of the memory runs' loader process.")
flags.DEFINE_string("launch", "", "Process counts for the launch/local.sh equality run, e.g. 1,2,4 (empty: not run).")


def main(argv) -> int:
    del argv
    f = FLAGS
    os.makedirs(f.dir, exist_ok=True)
    if f.skip not in ("loader", "both"):
        corpus = os.path.join(f.dir, "rows")
        shutil.rmtree(corpus, ignore_errors=True)
        write_synthetic_corpus(corpus, f.loader_rows, f.seq_len)
        for procs in [int(x) for x in f.processes.split(",")]:
            print(json.dumps({"loader": loader_rows_per_second(corpus, procs, f.batch, f.seconds, f.seq_len)}),
                  flush=True)
    if f.skip not in ("prepare", "both"):
        prepare_rates(f.dir, [float(x) for x in f.text_mb.split(",")], f.vocab, f.seq_len, f.shard_mb)
    if f.memory_mb:
        memory(f.dir, [float(x) for x in f.memory_mb.split(",")], f.vocab, f.seq_len, f.shard_mb, f.memory_batch,
               f.seconds)
    if f.launch:
        launch_equality(f.dir, [int(x) for x in f.launch.split(",")])
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=flags_parser())
