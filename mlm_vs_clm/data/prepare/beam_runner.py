"""`--runner=beam`: map `prepare_shard` over a prepare's pending shards on Apache Beam.

The driver (`prepare()`) writes plan.json and the tokenizer copy before the pipeline and the
manifest after it, exactly as with the local runner; Beam only maps the pure per-shard
function over (index, pieces) pairs (`Create` reshuffles them, so a distributed runner spreads
the shards over its workers). The output equals the local runner's byte for byte.

`beam_options` are Beam pipeline options, passed through (`--runner=DataflowRunner
--project=P --region=R --temp_location=gs://...`, `--runner=FlinkRunner ...`); with no
`--runner` among them, Beam's `DirectRunner` runs the shards on this machine. Every worker
must see `--out`, the source files and `--out`'s tokenizer copy at the same paths as the driver
(a shared file system), and have this package installed (Dataflow: `--setup_file` or a
container image). apache_beam is imported only here, only when asked for.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence

MISSING = ("data.prepare: --runner=beam needs Apache Beam: pip install -e '.[beam]' "
           "(in an environment of its own: docs/data.md, 'Many machines')")
DEFAULT_RUNNER = "DirectRunner"


def load():
    """The apache_beam module, or None where it is not installed."""
    try:
        import apache_beam
    except ImportError:
        return None
    return apache_beam


def pipeline_flags(beam_options: str | Sequence[str]) -> list[str]:
    """Beam's command-line options from a string (split as a shell splits it) or a list;
    `--runner=DirectRunner` is added where none names a runner."""
    flags = shlex.split(beam_options) if isinstance(beam_options, str) else list(beam_options)
    if not any(f == "--runner" or f.startswith("--runner=") for f in flags):
        flags.append(f"--runner={DEFAULT_RUNNER}")
    return flags


def map_shards(beam, prepare_shard: Callable, tasks: list[tuple[int, list]], settings: dict,
               beam_options: str | Sequence[str]) -> str:
    """Runs prepare_shard(index, pieces, settings) for each (index, pieces) of `tasks` in one
    Beam pipeline and waits for it; returns the runner's name. The shards' counts stay in
    their files (`shard_done` reads them back), so nothing is collected."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(pipeline_flags(beam_options))
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | "shards" >> beam.Create(tasks)
             | "prepare_shard" >> beam.Map(_run_task, prepare_shard, settings))
    return options.view_as(StandardOptions).runner


def _run_task(task: tuple[int, list], prepare_shard: Callable, settings: dict) -> dict:
    index, pieces = task
    return prepare_shard(index, pieces, settings)
