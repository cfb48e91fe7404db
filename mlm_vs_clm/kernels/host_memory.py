"""Host memory for XLA's CPU runtime: keep the step's temporaries mapped between steps.

XLA's CPU runtime allocates each step's temporaries afresh (1.1 GB on the `small` preset).
glibc serves allocations that large with mmap and unmaps them on free, so every step
page-faults the whole arena back in: on `small` (2 cores) 323k minor faults and 0.6 s of kernel
time per CLM step. `keep_mapped` switches glibc to one arena that never uses mmap and never
trims, so the pages stay mapped and a step reuses them.

The command-line tools (train, finetune, bench) call it first thing and apply it when JAX will
run on the CPU (`MLM_VS_CLM_HOST_MEMORY=auto`, the default; see `cpu_only`). The costs: the process
keeps its peak heap for its lifetime (a trainer reaches that peak every step anyway), and one
arena serialises allocations across threads (the input pipeline reads fewer rows/s, still far
above what a step consumes; figures in docs/performance.md). `MLM_VS_CLM_HOST_MEMORY=default` keeps
glibc's own settings, `kept` applies them on any backend.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil

ENV = "MLM_VS_CLM_HOST_MEMORY"

# glibc malloc.h parameter numbers
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
# M_TRIM_THRESHOLD -1: never trim (mallopt(3)); a finite int caps it below 2 GiB, which a heap that frees
# more than that at once (the PyTorch peer on `small`) exceeds every step.
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 256 << 20))


def cpu_only() -> bool:
    """Whether JAX will run on the CPU, decided without starting a backend: the first of
    `JAX_PLATFORMS` when set, else no accelerator plugin installed (`jax_plugins.*` modules or
    `jax_plugins` entry points for CUDA and ROCm, `libtpu` for TPUs). An installed plugin
    without its device counts as an accelerator: the settings are then left off."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    try:
        import jax_plugins  # namespace package of the CUDA / ROCm plugins
    except ImportError:
        plugins = []
    else:
        plugins = [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    plugins += [e.name for e in importlib.metadata.entry_points(group="jax_plugins")]
    return not plugins and importlib.util.find_spec("libtpu") is None


def keep_mapped(respect_env: bool = True) -> bool:
    """Apply the settings above; True when glibc took all of them.

    With `respect_env`, `MLM_VS_CLM_HOST_MEMORY` decides: `auto` (the default) applies them
    when JAX will run on the CPU (`cpu_only`), where XLA's temporaries live in host memory; on
    a GPU or TPU they live on the device and the one arena would only slow the input pipeline.
    `kept` applies them anyway, `default` never. Call it before the JAX backend starts its
    threads (arenas already created keep their settings). False where nothing was applied or
    libc has no `mallopt` (not glibc).
    """
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in ("auto", "kept", "default"):
        raise ValueError(f"{ENV}={value!r}: use 'auto' (the default: kept when JAX runs on the CPU), "
                         "'kept' or 'default' (glibc's own settings)")
    if respect_env and (value == "default" or (value == "auto" and not cpu_only())):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(key, value) == 1 for key, value in _SETTINGS)
