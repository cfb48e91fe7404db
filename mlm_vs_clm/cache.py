"""The project's cache folder: the demo corpus, trained tokenizers, compiled programs.

`$MLM_VS_CLM_CACHE`, else `~/.cache/mlm_vs_clm`."""

from __future__ import annotations

import os

CACHE_ENV = "MLM_VS_CLM_CACHE"


def cache_dir() -> str:
    """The cache folder of the project (demo corpus, trained tokenizers, JAX's compiled programs)."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mlm_vs_clm")
