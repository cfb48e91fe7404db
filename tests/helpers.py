"""Small builders shared by the tests."""

import os
import random
import subprocess
import sys

import numpy as np

from mlm_vs_clm.config import load_config


def tiny_config(objective="mlm40", **overrides):
    base = {"train.batch_size": 8, "train.seq_len": 32, "model.vocab_size": 256, "train.steps": 40}
    base.update(overrides)
    return load_config(f"configs/pretrain.py:tiny,{objective}", base)


def packed_batch(batch=8, length=32, vocab=256, seed=0, segments=(20, 10), pad_tail=True):
    """Rows packed with segments of the given lengths, then padding (segment 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, vocab, (batch, length)).astype(np.int32)
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    start = 0
    for i, n in enumerate(segments):
        seg[:, start : start + n] = i + 1
        pos[:, start : start + n] = np.arange(n)
        tokens[:, start] = 2  # bos: a special token, never an MLM target
        start += n
    if not pad_tail:
        assert start == length
    tokens[seg == 0] = 0
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


EPS32 = float(np.finfo(np.float32).eps)  # 2^-23
EPS16 = 2.0**-7  # bfloat16's machine epsilon (8 significant bits)


def accum_tol(n: int, eps: float = EPS32) -> float:
    """Relative error bound for comparing two computations of one n-term sum or dot product in a
    float format with machine epsilon eps: each side is within (n/2)*eps*sum|terms| of the exact
    value (n roundings of at most eps/2), whatever order a CPU's kernels add the terms in."""
    return n * eps



def run_command(module: str, argv: list[str], timeout: int = 300):
    """`python -m mlm_vs_clm.MODULE ARGV...` in a process of its own (absl flags are global to a
    process, and several commands define flags of the same name); returns the CompletedProcess."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=repo)
    return subprocess.run([sys.executable, "-m", f"mlm_vs_clm.{module}", *argv], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def write_word_corpus(folder, documents: int = 120, seed: int = 0) -> str:
    """Small plain-text documents of news-like words in `folder`; returns their glob."""
    rng = random.Random(seed)
    words = "the bank said shares rose while the team won its game and the minister spoke on the film".split()
    for i in range(documents):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(10, 80))) + ".\n"
        with open(os.path.join(folder, f"d{i}.txt"), "w") as f:
            f.write(text)
    return os.path.join(str(folder), "*.txt")
