"""`python -m mlm_vs_clm.train --config=configs/pretrain.py:tiny,clm50_mlm40 --workdir=DIR`: the
pretraining command over `mlm_vs_clm.train.train` (exit status 2: a bad flag, config or data
source, or a --workdir that is a file, under a file or read-only; 1: a checkpoint or training
failure, a full disk, or a --workdir that another process holds)."""

from __future__ import annotations

import errno
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mlm_vs_clm import distributed
from mlm_vs_clm import train as train_lib
from mlm_vs_clm.checkpoint import CheckpointError, disk_full
from mlm_vs_clm.config import ConfigError, flags_parser, quiet_library_info
from mlm_vs_clm.data.errors import SourceError
from mlm_vs_clm.data.tokenizer import TokenizerError
from mlm_vs_clm.kernels import host_memory
from mlm_vs_clm.runlock import RunLockError, WorkdirError

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


def _os_error_line(e: OSError, workdir: str) -> str:
    where = e.filename or workdir
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device writing {where}"
    return f"{e.strerror or e}: {where}"


def main(argv):
    del argv
    train_lib.install_sigterm_handler()  # first: start-up (data, tokenizer, restore) takes seconds
    quiet_library_info()
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
    except (ConfigError, SourceError, TokenizerError, WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (CheckpointError, train_lib.TrainingError, RunLockError) as e:
        print(f"error: {e}", file=sys.stderr)
        _exit(1) if disk_full(e) else sys.exit(1)
    except OSError as e:  # a full disk or a folder that went away while the run wrote to it
        print(f"error: {_os_error_line(e, FLAGS.workdir)}", file=sys.stderr)
        _exit(1) if disk_full(e) else sys.exit(1)


def _exit(status: int):
    """Exit without the interpreter's teardown: after a full disk, the checkpoint writer's
    threads print tracebacks there about their closed event loop (the run is closed already)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser("error: "))
