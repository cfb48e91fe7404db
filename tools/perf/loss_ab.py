"""A/B of the chunked loss against an older version of objectives.py, on the full `small` step.

  python tools/perf/loss_ab.py REV [ROUNDS] [DTYPE]

REV is a git revision whose mlm_vs_clm/objectives.py is loaded as the "old" loss (e.g. d3a4972,
the commit before the exp-once change); both versions' CLM and MLM-40 steps take turns round by round
(`bench.interleaved_times`). DTYPE is the compute dtype (default float32, the preset's).
Prints the median step seconds of each.
"""

import importlib.util
import subprocess
import sys
import tempfile

import numpy as np

from mlm_vs_clm import bench
from mlm_vs_clm.kernels import host_memory

if __name__ == "__main__":
    host_memory.keep_mapped(respect_env=False)
    import jax

    from mlm_vs_clm import objectives, schedules, sharding, train_state
    from mlm_vs_clm import step as step_lib
    from mlm_vs_clm.config import load_config

    rev, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6
    dtype = sys.argv[3] if len(sys.argv) > 3 else "float32"
    old_src = subprocess.run(["git", "show", f"{rev}:mlm_vs_clm/objectives.py"], check=True, capture_output=True,
                             text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(old_src)
    spec = importlib.util.spec_from_file_location("old_objectives", fh.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    new_xent = objectives._xent_sums
    runners = {}
    for obj_name in ("clm", "mlm40"):
        obj = schedules._objective(obj_name, 0.4)
        for name, fn in (("old", old._xent_sums), ("new", new_xent)):
            objectives._xent_sums = fn  # read when the step is traced
            c = load_config("configs/pretrain.py:small")
            c.model.dtype = dtype
            mesh = sharding.make_mesh(c.mesh)
            setup = train_state.build(c, mesh)
            batch = jax.device_put(bench.synthetic_batch(32, 128, c.model.vocab_size), step_lib.batch_shardings(mesh))
            runners[f"{obj_name} {name}"], _, _ = bench.ours_runner(setup, obj, batch)
    objectives._xent_sums = new_xent
    times = bench.interleaved_times(runners, 1, rounds)
    for name in runners:
        print(f"{name}: {np.median(times[name]):.3f} s")
