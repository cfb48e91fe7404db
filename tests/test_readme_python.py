"""Every ```python snippet of README.md runs, in order, in one namespace. Placeholders such as
RUN_DIR and HF_DIR are bound to a tiny checkpoint built here and to its export."""

import os
import re

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets():
    with open(os.path.join(REPO, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_the_readme_has_python():
    assert any("from mlm_vs_clm import load_checkpoint" in s for s in _snippets())


def test_package_exports_load_checkpoint():
    import mlm_vs_clm

    assert callable(mlm_vs_clm.load_checkpoint) and "load_checkpoint" in dir(mlm_vs_clm)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A params-only tiny checkpoint with a trained sentencepiece tokenizer, and its export."""
    import flax.linen as nn
    from helpers import tiny_config

    from mlm_vs_clm.checkpoint import save_params_checkpoint
    from mlm_vs_clm.data.tokenizer import train_tokenizer
    from mlm_vs_clm.model import ModelConfig, init_params

    words = ["the", "cat", "sat", "on", "mat", "dog", "a", "tree", "fell", "big"]
    rng = np.random.RandomState(0)
    text = [" ".join(rng.choice(words, 10)) for _ in range(500)] + [f"filler{i} word{i % 13}" for i in range(800)]
    tokenizer = train_tokenizer(text, 400)
    config = tiny_config("mlm40", **{"model.vocab_size": tokenizer.vocab_size})
    for role in ("pad", "unk", "bos", "eos", "mask"):
        config.tokens[f"{role}_id"] = getattr(tokenizer, f"{role}_id")
    config.tokens.special_ids = tuple(int(i) for i in tokenizer.special_ids)
    params = nn.meta.unbox(init_params(ModelConfig.from_config(config.model), jax.random.PRNGKey(0)))
    root = tmp_path_factory.mktemp("readme")
    run = str(root / "run")
    save_params_checkpoint(run, config, jax.tree.map(np.asarray, params), tokenizer)
    hf = str(root / "hf")
    from mlm_vs_clm.convert.hf_export import export_checkpoint

    export_checkpoint(run, hf, mask_mode="bidirectional")
    return run, hf


def test_readme_python_snippets_run(tiny_run):
    pytest.importorskip("transformers")
    run, hf = tiny_run
    namespace = {"RUN_DIR": run, "HF_DIR": hf, "__name__": "readme"}
    snippets = _snippets()
    assert snippets
    for code in snippets:
        exec(compile(code, "README.md", "exec"), namespace)
