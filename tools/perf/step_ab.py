"""A/B of the whole `small` train step against an older revision of the package, interleaved.

  python tools/perf/step_ab.py REV [ROUNDS] [DTYPE] [OBJECTIVES]

REV is a git revision: its `mlm_vs_clm/` is copied out of git as the package `ab_old_mlm_vs_clm`
and imported next to the working tree's, in this process. Both versions' steps (DTYPE, default
float32; OBJECTIVES, default clm,mlm40) then take turns round by round
(`bench.interleaved_times`), so that a load change on this shared machine hits both alike.
Prints the median step seconds of each and the ratio old / new.
"""

import importlib
import os
import subprocess
import sys
import tempfile

import numpy as np

from mlm_vs_clm import bench
from mlm_vs_clm.kernels import host_memory

OLD = "ab_old_mlm_vs_clm"


def import_revision(rev: str):
    """The package as it was at `rev`, importable as OLD (its own imports rewritten)."""
    root = tempfile.mkdtemp(prefix="step_ab_")
    listing = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "mlm_vs_clm/"], check=True,
                             capture_output=True, text=True).stdout.split()
    for path in listing:  # every file of the package, its folders included
        if not path.endswith(".py"):
            continue
        src = subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout
        src = src.replace("from mlm_vs_clm", f"from {OLD}").replace("import mlm_vs_clm", f"import {OLD}")
        target = os.path.join(root, OLD, os.path.relpath(path, "mlm_vs_clm"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as fh:
            fh.write(src)
    sys.path.insert(0, root)
    return importlib.import_module(OLD)


if __name__ == "__main__":
    host_memory.keep_mapped(respect_env=False)
    import jax

    rev = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    dtype = sys.argv[3] if len(sys.argv) > 3 else "float32"
    objectives = sys.argv[4].split(",") if len(sys.argv) > 4 else ["clm", "mlm40"]
    import_revision(rev)
    runners = {}
    for obj_name in objectives:
        for name, pkg in (("old", OLD), ("new", "mlm_vs_clm")):
            config_lib = importlib.import_module(f"{pkg}.config")
            schedules = importlib.import_module(f"{pkg}.schedules")
            sharding = importlib.import_module(f"{pkg}.sharding")
            train_state = importlib.import_module(f"{pkg}.train_state")
            step_lib = importlib.import_module(f"{pkg}.step")
            c = config_lib.load_config("configs/pretrain.py:small")
            c.model.dtype = dtype
            mesh = sharding.make_mesh(c.mesh)
            setup = train_state.build(c, mesh)
            batch = jax.device_put(bench.synthetic_batch(32, 128, c.model.vocab_size), step_lib.batch_shardings(mesh))
            holder = {"state": train_state.init_state(setup, c.seed)}
            compiled = step_lib.compiled_train_step(setup, schedules._objective(obj_name, 0.4)).lower(
                holder["state"], batch).compile()

            def run_one(compiled=compiled, holder=holder, batch=batch):
                holder["state"], metrics = compiled(holder["state"], batch)
                jax.block_until_ready(metrics)

            runners[f"{obj_name} {name}"] = run_one
    times = bench.interleaved_times(runners, 1, rounds)
    for obj_name in objectives:
        old, new = (np.median(times[f"{obj_name} {v}"]) for v in ("old", "new"))
        print(f"{obj_name} old: {old:.3f} s, new: {new:.3f} s, old / new {old / new:.3f}")
