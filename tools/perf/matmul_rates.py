"""Matmul rates on this machine: XLA (f32, bf16 with a bf16 result, bf16 with an f32 result)
and the same with the left operand transposed ([K, M] contracted over K, as a weight gradient's
x^T @ dy) against PyTorch (f32, bf16), for the shapes of the `small` step and square ones.

  python tools/perf/matmul_rates.py

Prints GFLOP/s (median of 7 calls) for each [M, K] x [K, N].
"""

import os
import time

import numpy as np

from mlm_vs_clm.kernels import host_memory

SHAPES = ((4096, 256, 1024), (4096, 1024, 256), (256, 4096, 1024), (4096, 256, 256), (1024, 256, 32000),
          (1024, 32000, 256), (256, 1024, 32000), (1024, 1024, 1024), (2048, 2048, 2048))


def median_seconds(call, n=7):
    call()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


if __name__ == "__main__":
    host_memory.keep_mapped(respect_env=False)
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(os.cpu_count())
    matmul = jax.jit(lambda a, b: a @ b)
    to_f32 = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    to_f32_tn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                                         preferred_element_type=jnp.float32))
    print("M x K x N: xla f32, xla bf16, xla bf16 -> f32, xla bf16 -> f32 transposed left, torch f32, torch bf16"
          " (GFLOP/s)")
    for m, k, n in SHAPES:
        flops = 2 * m * k * n
        rates = []
        for dtype in (jnp.float32, jnp.bfloat16):
            a = jnp.asarray(np.random.rand(m, k), dtype)
            b = jnp.asarray(np.random.rand(k, n), dtype)
            rates.append(flops / median_seconds(lambda a=a, b=b: matmul(a, b).block_until_ready()))
        rates.append(flops / median_seconds(lambda a=a, b=b: to_f32(a, b).block_until_ready()))
        a_t = jnp.asarray(np.random.rand(k, m), jnp.bfloat16)
        rates.append(flops / median_seconds(lambda a_t=a_t, b=b: to_f32_tn(a_t, b).block_until_ready()))
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.rand(m, k, dtype=dtype), torch.rand(k, n, dtype=dtype)
            rates.append(flops / median_seconds(lambda a=a, b=b: a @ b))
        print(f"{m} x {k} x {n}: " + ", ".join(f"{r / 1e9:,.0f}" for r in rates))
