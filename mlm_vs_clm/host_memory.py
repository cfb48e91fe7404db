"""Host memory for XLA's CPU runtime: keep the step's temporaries mapped between steps.

XLA's CPU runtime allocates each step's temporaries afresh (1.1 GB on the `small` preset).
glibc serves allocations that large with mmap and unmaps them on free, so every step
page-faults the whole arena back in: on `small` (2 cores) 323k minor faults and 0.6 s of kernel
time per CLM step. `keep_mapped` switches glibc to one arena that never uses mmap and never
trims, so the pages stay mapped and a step reuses them.

The command-line tools (train, finetune, bench) call it first thing. The costs: the process
keeps its peak heap for its lifetime (a trainer reaches that peak every step anyway), and one
arena serialises allocations across threads (the input pipeline measured 16-31 % fewer rows/s,
far above what a step consumes; docs/performance.md). Set `MLM_VS_CLM_HOST_MEMORY=default` to
keep glibc's own settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "MLM_VS_CLM_HOST_MEMORY"

# glibc malloc.h parameter numbers
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
# M_TRIM_THRESHOLD -1: never trim (mallopt(3)); a finite int caps it below 2 GiB, which a heap that frees
# more than that at once (the PyTorch peer on `small`) exceeds every step.
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 256 << 20))


def keep_mapped(respect_env: bool = True) -> bool:
    """Apply the settings above; True when glibc took all of them.

    Call it before the JAX backend starts its threads (arenas already created keep their
    settings). A no-op returning False where libc has no `mallopt` (not glibc), or when
    `MLM_VS_CLM_HOST_MEMORY=default` and `respect_env`.
    """
    value = os.environ.get(ENV, "kept").strip().lower()
    if respect_env and value == "default":
        return False
    if value not in ("kept", "default"):
        raise ValueError(f"{ENV}={value!r}: use 'kept' (the default) or 'default' (glibc's own settings)")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(key, value) == 1 for key, value in _SETTINGS)
