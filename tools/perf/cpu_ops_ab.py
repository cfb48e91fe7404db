"""What mlm_vs_clm/kernels/cpu.py buys a bf16 step on a CPU: an interleaved A/B of `small` with
`model.dtype=bfloat16`, CLM and MLM-40, in five versions.

  python tools/perf/cpu_ops_ab.py [ROUNDS]

- autodiff: no cpu_ops (plain `x @ kernel` and jax.nn.dot_product_attention, differentiated by
  JAX; the loss's h^T behind an optimization barrier);
- matmul: cpu_ops.matmul for the projections and the loss's bf16 path, the library's attention;
- matmul + attention, pad-slice transposes: all of cpu_ops, every standalone transpose made by
  a pad and a slice;
- matmul + attention: all of cpu_ops but RoPE's rotation, which takes slices and a
  concatenation as in f32 models;
- cpu_ops: all of it as it is (matrices transposed block-wise, RoPE's rotation as a product).

Prints the median step seconds of each (rounds take turns: `bench.interleaved_times`).
"""

import sys

import numpy as np

from mlm_vs_clm import bench
from mlm_vs_clm.kernels import host_memory

if __name__ == "__main__":
    host_memory.keep_mapped(respect_env=False)
    import jax
    import jax.numpy as jnp

    from mlm_vs_clm import schedules, sharding, train_state
    from mlm_vs_clm import step as step_lib
    from mlm_vs_clm.config import load_config
    from mlm_vs_clm.kernels import cpu as cpu_ops

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    real = (cpu_ops.wanted, cpu_ops.attention, cpu_ops.standalone_transpose, cpu_ops.rotate_half)

    def library_attention(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask)

    def pad_slice_transpose(x, axes=(1, 0)):
        xt = jnp.transpose(x, axes)
        return jax.lax.slice(jnp.pad(xt, [(0, 0)] * (xt.ndim - 1) + [(0, 1)]), (0,) * xt.ndim, xt.shape)

    def concatenated_halves(x):
        half = x.shape[-1] // 2
        return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)

    versions = {
        "autodiff": (lambda dtype: False, real[1], real[2], real[3]),
        "matmul": (real[0], library_attention, real[2], concatenated_halves),
        "matmul + attention, pad-slice transposes": (real[0], real[1], pad_slice_transpose, concatenated_halves),
        "matmul + attention": (real[0], real[1], real[2], concatenated_halves),
        "cpu_ops": real,
    }
    runners = {}
    for obj_name in ("clm", "mlm40"):
        obj = schedules._objective(obj_name, 0.4)
        for name, patch in versions.items():
            # read when the step is traced (ours_runner compiles it)
            cpu_ops.wanted, cpu_ops.attention, cpu_ops.standalone_transpose, cpu_ops.rotate_half = patch
            c = load_config("configs/pretrain.py:small")
            c.model.dtype = "bfloat16"
            mesh = sharding.make_mesh(c.mesh)
            setup = train_state.build(c, mesh)
            batch = jax.device_put(bench.synthetic_batch(32, 128, c.model.vocab_size), step_lib.batch_shardings(mesh))
            runners[f"{obj_name} {name}"], _, _ = bench.ours_runner(setup, obj, batch)
    cpu_ops.wanted, cpu_ops.attention, cpu_ops.standalone_transpose, cpu_ops.rotate_half = real
    times = bench.interleaved_times(runners, 1, rounds)
    for name in runners:
        print(f"{name}: {np.median(times[name]):.3f} s")
