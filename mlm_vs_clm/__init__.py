"""mlm_vs_clm: pretrain text encoders with MLM, CLM or any schedule of the two (JAX/Flax).

The Python API for a trained model (see README.md):
    from mlm_vs_clm import load_checkpoint
    m = load_checkpoint(PATH)          # a run directory or a step directory
    m.tokenizer.encode(text); m.logits(tokens_BxL, mask_mode="bidirectional"); m.hidden(...)
    from mlm_vs_clm import load_config
    config = load_config("configs/pretrain.py:tiny,clm50_mlm40", {"train.steps": 100})
Heavy modules (jax, orbax) are imported on first use, not on `import mlm_vs_clm`.
"""

__all__ = ["load_checkpoint", "TrainedModel", "CheckpointError", "load_config", "ConfigError"]
_HOMES = {"load_checkpoint": "checkpoint", "TrainedModel": "checkpoint", "CheckpointError": "checkpoint",
          "load_config": "config", "ConfigError": "config"}


def __getattr__(name):
    if name in _HOMES:  # imported on first use: `import mlm_vs_clm` must not start jax
        import importlib

        return getattr(importlib.import_module(f"mlm_vs_clm.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'mlm_vs_clm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
