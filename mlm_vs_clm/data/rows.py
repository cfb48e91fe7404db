"""The record format of a prepared corpus, with numpy only (the prepare workers import no jax or grain).

A row record is the row's `seq_len` tokens (`manifest["token_dtype"]`, uint16 when the
vocabulary fits) followed by the lengths of its segments (int32): segment ids and positions
are rebuilt from them exactly as the pipeline packed them (`encode_row` / `decode_rows`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "int32"


def encode_row(tokens: np.ndarray, segment_ids: np.ndarray, dtype: str) -> bytes:
    """A packed row -> its record: tokens, then the length of each segment (ids 1, 2, ...)."""
    lengths = np.bincount(segment_ids[segment_ids > 0])[1:].astype(np.int32)
    return np.asarray(tokens).astype(dtype).tobytes() + lengths.tobytes()


def decode_rows(records: list[bytes], seq_len: int, dtype: str) -> dict:
    """Records -> {tokens, segment_ids, positions}: int32 [n, seq_len], as the pipeline packs them."""
    n, nbytes = len(records), seq_len * np.dtype(dtype).itemsize
    tokens = np.empty((n, seq_len), np.int32)
    ids, lens = [], []  # per row: segments 1..k, then the padding (id 0, maybe of length 0)
    for i, record in enumerate(records):
        if len(record) < nbytes or (len(record) - nbytes) % 4:
            raise ValueError(f"a record of {len(record)} bytes is not a row of {seq_len} {dtype} tokens")
        tokens[i] = np.frombuffer(record, dtype, seq_len)
        lengths = np.frombuffer(record, np.int32, offset=nbytes).tolist()
        used = sum(lengths)
        if used > seq_len or min(lengths, default=1) <= 0:
            raise ValueError(f"segment lengths {lengths} do not fit a row of {seq_len}")
        ids.extend(range(1, len(lengths) + 1))
        ids.append(0)
        lens.extend(lengths)
        lens.append(seq_len - used)
    ids, lens = np.array(ids, np.int32), np.array(lens, np.int64)
    segment_ids = np.repeat(ids, lens).reshape(n, seq_len)
    starts = np.cumsum(lens) - lens
    positions = (np.arange(n * seq_len, dtype=np.int64) - np.repeat(starts, lens)).astype(np.int32).reshape(n, seq_len)
    positions[segment_ids == 0] = 0
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (16 hex digits) of the files `tokenizer.save` writes: its model and special ids."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        h = hashlib.sha256()
        for name in sorted(os.listdir(d)):
            h.update(name.encode() + b"\0")
            with open(os.path.join(d, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]
