"""Where a `small` training step's time goes, by XLA op: a `jax.profiler` trace of our step.

  python tools/perf/profile_step.py [DTYPE] [OBJECTIVE]

DTYPE is the compute dtype (float32 or bfloat16, default bfloat16), OBJECTIVE clm or mlm40
(default clm). Traces 3 steps and prints each op kind's milliseconds per step (summed over
its instances, with the shape it writes; for a matmul fusion, its operands' types). XLA's CPU
runtime runs independent ops concurrently, so the times overlap and sum to more than a step.
"""

import collections
import glob
import os
import re
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_xprof_traceme=true")

from mlm_vs_clm import bench  # noqa: E402
from mlm_vs_clm.kernels import host_memory

if __name__ == "__main__":
    host_memory.keep_mapped(respect_env=False)
    import jax

    from mlm_vs_clm import schedules, sharding, train_state
    from mlm_vs_clm import step as step_lib
    from mlm_vs_clm.config import load_config

    dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
    objective = sys.argv[2] if len(sys.argv) > 2 else "clm"
    c = load_config("configs/pretrain.py:small")
    c.model.dtype = dtype
    mesh = sharding.make_mesh(c.mesh)
    setup = train_state.build(c, mesh)
    batch = jax.device_put(bench.synthetic_batch(32, 128, c.model.vocab_size), step_lib.batch_shardings(mesh))
    state = train_state.init_state(setup, c.seed)
    compiled = step_lib.compiled_train_step(setup, schedules._objective(objective, 0.4)).lower(state, batch).compile()
    hlo = compiled.as_text()
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    folder = tempfile.mkdtemp(prefix="mlm_vs_clm_profile_")
    jax.profiler.start_trace(folder)
    for _ in range(3):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    jax.profiler.stop_trace()

    # what each fusion writes, and for a matmul fusion the types of its dot's operands
    types = dict(re.findall(r"(%[\w.\-]+) = (\w+\[[\d,]*\])", hlo))
    dots = {}
    for name, body in re.findall(r"\n%([\w.\-]+) \([^)]*\) -> [^{]*\{\n(.*?)\n\}", hlo, re.S):
        d = re.search(r"\} dot\((%[\w.\-]+), (%[\w.\-]+)\)", body)
        if d:
            dots[name] = f"{types.get(d.group(1))} x {types.get(d.group(2))}"
    writes = {}
    for name, shape, calls in re.findall(r"  %([\w.\-]+) = (\w+\[[\d,]*\])\{[^}]*\} fusion\([^)]*\), kind=\w+, "
                                         r"calls=%([\w.\-]+)", hlo):
        writes[name] = f"{dots[calls]} -> {shape}" if calls in dots else shape
    total = collections.Counter()
    count = collections.Counter()
    path = sorted(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True))[-1]
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in writes or event.name.startswith("wrapped_"):
                    key = (re.sub(r"\.\d+$", "", event.name), writes.get(event.name, "?"))
                    total[key] += event.duration_ns
                    count[key] += 1
    for (kind, what), ns in total.most_common(30):
        print(f"{ns / 3e6:8.1f} ms/step  x{count[(kind, what)] // 3:3d}  {kind}  {what}")
