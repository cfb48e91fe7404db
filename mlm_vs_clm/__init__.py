"""mlm_vs_clm: pretrain text encoders with MLM, CLM or any schedule of the two (JAX/Flax).

The Python API for a trained model (see README.md):
    from mlm_vs_clm import load_checkpoint
    m = load_checkpoint(PATH)          # a run directory or a step directory
    m.tokenizer.encode(text); m.logits(tokens_BxL, mask_mode="bidirectional"); m.hidden(...)
Heavy modules (jax, orbax) are imported on first use, not on `import mlm_vs_clm`.
"""

__all__ = ["load_checkpoint", "TrainedModel", "CheckpointError"]


def __getattr__(name):
    if name in __all__:
        from mlm_vs_clm import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'mlm_vs_clm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
