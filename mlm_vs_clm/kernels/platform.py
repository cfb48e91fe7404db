"""The platform a program is built for: the backend it runs on, or the chips an ahead-of-time
compile targets.

Kernels choose by platform (16-bit CPU products, cuDNN, splash attention). Usually that is
`jax.default_backend()`; when `mlm_vs_clm.aot` compiles for a TPU topology on a CPU machine, the
default backend is the CPU while the program is for TPU chips, so the check states its target
with `target("tpu")` around tracing and compiling.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlm_vs_clm_target_platform", default=None)


def current() -> str:
    """'cpu', 'gpu', 'tpu', ...: the platform set by `target`, else JAX's default backend."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def target(platform: str):
    """Trace (and compile) for `platform` ('cpu', 'gpu', 'tpu'; a device's `.platform`, where
    'cuda' and 'rocm' read as 'gpu')."""
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
