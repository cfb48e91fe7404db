"""`python -m mlm_vs_clm.finetune --config=configs/finetune.py:SUITE --config.checkpoint=PATH --workdir=DIR`

Fine-tunes every checkpoint on every task of the suite over the learning-rate x seed grid and
writes DIR/results.json, DIR/results.md and DIR/scores.png; rerunning skips finished runs.
A checkpoint is named by the step directory it resolves to (a run directory: its newest step).
Bad input (config, checkpoint, task files, a workdir made with other settings) is found before
any work and stops with status 2 and one line starting "finetune: ", as does a --workdir that
is a file, under a file or read-only; a --workdir that another process holds stops with status 1.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mlm_vs_clm import runlock
from mlm_vs_clm.config import flags_parser, quiet_library_info

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Fine-tuning config: configs/finetune.py:SUITE[,quick].")
flags.DEFINE_string("workdir", None, "Output folder (results.json, results.md, scores.png).")


def _loader(path: str):
    def load():
        from mlm_vs_clm.checkpoint import load_checkpoint
        from mlm_vs_clm.model import ModelConfig

        m = load_checkpoint(path)
        return ModelConfig.from_config(m.config.model), m.params, m.tokenizer

    return load


def _tasks(ft):
    from mlm_vs_clm.finetune import grid, news, paper

    if ft.suite == "news":
        names = grid.task_names(ft, ("topic", "retrieval", "cloze_qa", "truecase"))
        tasks = news.news_tasks(seed=ft.data.news_seed, names=names)
        if ft.max_train_examples or ft.max_eval_examples:
            for t in tasks:
                limits = (("train", ft.max_train_examples), ("validation", ft.max_eval_examples),
                          ("test", ft.max_eval_examples))
                for split, limit in limits:
                    if limit:
                        t.splits[split] = t.splits[split][:limit]
        return tasks
    names = grid.task_names(ft, tuple(paper.SPECS))
    return paper.paper_tasks(ft.data, names, ft.max_train_examples, ft.max_eval_examples)


def _check_results_file(workdir: str) -> None:
    """A results.json that parses but is not a results file (runs not a list of run records):
    one line naming it, before any work."""
    path = os.path.join(workdir, "results.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"results: {path} cannot be read ({e}); move it away to start afresh") from None
    runs = results.get("runs") if isinstance(results, dict) else None
    fields = ("task", "checkpoint", "lr", "seed")
    if not isinstance(runs, list) or not all(isinstance(r, dict) and all(k in r for k in fields) for r in runs):
        raise ValueError(f"results: {path} is not a results file ('runs' must be a list of runs with "
                         f"{', '.join(fields)}); move it away to start afresh")
    if not isinstance(results.get("config", {}), dict):
        raise ValueError(f"results: {path} is not a results file ('config' must be an object); move it away "
                         "to start afresh")


def main(argv) -> int:
    del argv
    quiet_library_info()
    from mlm_vs_clm.checkpoint import CheckpointError, read_config, resolve_step_dir
    from mlm_vs_clm.config import ConfigError
    from mlm_vs_clm.distributed import enable_compilation_cache
    from mlm_vs_clm.kernels import host_memory

    try:
        host_memory.keep_mapped()  # before the backend starts its threads (MLM_VS_CLM_HOST_MEMORY)
    except ValueError as e:
        print(f"finetune: {e}", file=sys.stderr)
        return 2
    enable_compilation_cache()
    from mlm_vs_clm.finetune import grid

    ft = FLAGS.config
    if ft is None:
        print("finetune: --config is required (e.g. --config=configs/finetune.py:news_quick)", file=sys.stderr)
        return 2
    if not FLAGS.workdir:
        print("finetune: --workdir is required", file=sys.stderr)
        return 2
    try:
        grid.validate(ft)
        paths = grid.checkpoint_paths(ft)
        if not paths:
            raise ConfigError("config: checkpoint is empty (give --config.checkpoint=PATH or --config.checkpoints=A,B)")
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise ConfigError(f"config: checkpoint path(s) not found: {', '.join(missing)}")
        # A run directory stands for its newest step: runs are keyed by the step directory, so
        # a run that has trained further since is a new checkpoint, not one already done.
        step_dirs = list(dict.fromkeys(resolve_step_dir(p) for p in paths))
        for d in step_dirs:  # a folder without a checkpoint, or one without its config
            read_config(d)
        problem = runlock.workdir_problem(FLAGS.workdir)
        if problem:
            raise ConfigError(problem)
        _check_results_file(FLAGS.workdir)
        grid.check_workdir(ft, FLAGS.workdir)
    except (ConfigError, ValueError, CheckpointError) as e:
        print(f"finetune: {e}", file=sys.stderr)
        return 2
    created = runlock.make_workdir(FLAGS.workdir)
    try:
        lock = runlock.RunLock(FLAGS.workdir, what="fine-tuning folder")
    except runlock.RunLockError as e:
        print(f"finetune: {e}", file=sys.stderr)
        return 1
    status = 1
    try:
        try:
            tasks = _tasks(ft)
        except (ConfigError, ValueError) as e:
            print(f"finetune: {e}", file=sys.stderr)
            status = 2
            return status
        status = _run(ft, step_dirs, tasks)
    finally:
        if status != 0:
            lock.undo(created)
        lock.release()
    return status


def _run(ft, step_dirs, tasks) -> int:
    from mlm_vs_clm.checkpoint import CheckpointError
    from mlm_vs_clm.finetune import grid, report

    checkpoints = [grid.Checkpoint(d, _loader(d)) for d in step_dirs]
    progress = None
    if ft.progress:
        from tqdm import tqdm

        progress = lambda **kw: tqdm(desc="finetune", unit="run", **kw)
    try:
        runs = grid.run_grid(ft, checkpoints, tasks, FLAGS.workdir, progress=progress)
    except CheckpointError as e:  # a checkpoint that does not fit its model (finished runs are kept)
        print(f"finetune: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"finetune: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, or a folder gone while it wrote
        print(f"finetune: {e.strerror or e}: {e.filename or FLAGS.workdir}", file=sys.stderr)
        return 1
    table = report.write_reports(FLAGS.workdir, runs)
    logging.info("finetune: %d runs in %s", len(runs), FLAGS.workdir)
    print(table)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=flags_parser("finetune: "))
