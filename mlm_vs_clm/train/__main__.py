"""`python -m mlm_vs_clm.train --config=configs/pretrain.py:tiny,clm50_mlm40 --workdir=DIR`: the
pretraining command over `mlm_vs_clm.train.train` (exit status 2: a bad flag, config or data
source; 1: a checkpoint or training failure)."""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mlm_vs_clm import distributed
from mlm_vs_clm import train as train_lib
from mlm_vs_clm.checkpoint import CheckpointError
from mlm_vs_clm.config import ConfigError
from mlm_vs_clm.data.errors import SourceError
from mlm_vs_clm.data.tokenizer import TokenizerError
from mlm_vs_clm.kernels import host_memory

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:tiny,clm50_mlm40.")
flags.DEFINE_string("workdir", None, "Run directory: metrics, checkpoints, TensorBoard events.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "Index of this process, 0 .. num_processes - 1.")
flags.DEFINE_integer(
    "distributed_timeout", None, "Seconds to wait for every process to reach the coordinator (default 300)."
)
flags.DEFINE_integer(
    "collective_timeout", None, "Seconds a cross-process collective may wait before failing (default: XLA's)."
)


def _parse_flags(argv):
    try:
        return FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - a bad flag or config: one line, exit 2
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    del argv
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)  # library INFO chatter off unless asked for
    if FLAGS.config is None or not FLAGS.workdir:
        print("error: --config and --workdir are required", file=sys.stderr)
        sys.exit(2)
    try:
        host_memory.keep_mapped()  # before the backend starts its threads (MLM_VS_CLM_HOST_MEMORY)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    distributed.initialize(  # multi-host start-up, before any other JAX call
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed_timeout,
        collective_timeout_s=FLAGS.collective_timeout,
    )
    distributed.enable_compilation_cache()
    try:
        train_lib.train(FLAGS.config, FLAGS.workdir)
    except (ConfigError, SourceError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (CheckpointError, train_lib.TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
