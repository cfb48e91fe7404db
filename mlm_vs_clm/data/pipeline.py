"""The grain input pipeline: documents -> packed token rows, objective-agnostic.

    source -> this process's shard -> seeded shuffle (reshuffled every epoch, endless)
      -> tokenize ([bos] + ids + [eos] per document; worker processes if data.worker_count)
      -> pack into rows of train.seq_len (grain ConcatThenSplit: a document longer than the
         rest of a row continues as a new segment, positions from 0, in the next row)
      -> batch of train.batch_size // process_count rows
      -> {tokens, segment_ids, positions}: int32 [local_batch, seq_len]; segment_ids 1, 2, ..
         per document in a row, 0 = padding; positions restart at 0 in every segment.

The iterator is a grain `DatasetIterator`: `get_state()` / `set_state()`, and
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` inside orbax, give exactly
the next batch after a restore, also under another `data.worker_count` (the state counts
the documents read, whichever processes read them). Validation rows come from held-out
documents: the `data.validation_source` if set, the demo corpus's held-out split for `demo`,
otherwise every 64th document of the source (then left out of training).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import grain
import jax
from absl import flags, logging

from mlm_vs_clm import cache
from mlm_vs_clm.config import ConfigError
from mlm_vs_clm.data import prepared, sources
from mlm_vs_clm.data.tokenizer import (
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)

FEATURES = ("tokens", "segment_ids", "positions")
HELDOUT_EVERY = 64
_opened: dict = {}


def _text_mode(config) -> str:
    return config.data.get("text_mode", "file")


def _open(spec: str, config):
    key = (spec, config.data.text_field, _text_mode(config))
    if key not in _opened:
        _opened[key] = sources.open_source(spec, config.data.text_field, _text_mode(config))
    return _opened[key]


def documents(config, split: str):
    """The 'train' or 'validation' documents of `config.data` (random access)."""
    data = config.data
    source = _open(data.source, config)
    if data.validation_source:
        return source if split == "train" else _open(data.validation_source, config)
    if data.source.strip() in ("demo", "demo:pretrain"):
        return source if split == "train" else _open("demo:heldout", config)
    train, heldout = sources.split_heldout(source, HELDOUT_EVERY)
    return train if split == "train" else heldout


class _Tokenize(grain.transforms.Map):
    """text -> {'tokens': int32 [n + 2]} ([bos] + ids + [eos]; `Tokenizer.encode_document`)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    def map(self, text: str):
        return {"tokens": self._tokenizer.encode_document(text)}


class _OneReaderState(grain.IterDataset):
    """`parent`'s elements, with the state of one reader, `{'next_index': elements read}`,
    however many worker processes `mp_prefetch` split the reading over: a state saved with
    one `worker_count` restores under any other, at the same element."""

    def __init__(self, parent: grain.IterDataset, worker_count: int):
        super().__init__(parent)
        self._worker_count = worker_count

    def __iter__(self):
        return _OneReaderStateIterator(self._parent.__iter__(), self._worker_count)


class _OneReaderStateIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, worker_count: int):
        super().__init__(parent)
        self._worker_count, self._next_index = worker_count, 0

    def __next__(self):
        element = next(self._parent)
        self._next_index += 1
        return element

    def get_state(self) -> dict:
        return {"next_index": self._next_index}

    def set_state(self, state: dict):
        if "iterators_in_use_states" in state:  # saved by mp_prefetch itself (before this class)
            n = sum(int(s["next_index"]) for s in state["iterators_in_use_states"] if s)
        else:
            n = int(state["next_index"])
        k = self._worker_count
        if k == 0:
            self._parent.set_state({"next_index": n})
        else:
            # mp_prefetch interleaves k workers round-robin; worker i reads elements i, i + k, ...
            self._parent.set_state({
                "next_index_in_cycle": n % k, "next_index_in_datasets": k,
                "iterators_in_use_indices": list(range(k)),
                "iterators_in_use_states": [{"next_index": (n - i + k - 1) // k} for i in range(k)],
                "exhausted": [0] * k, "future_states": {},
            })
        self._next_index = n


class _DropEmpty(grain.transforms.Filter):
    """Drops empty documents; a `SourceError` once 2 * n documents in a row were empty (those
    hold a whole epoch of the n documents): an endless pass over nothing would hang."""

    def __init__(self, n_docs: int, name: str):
        self._limit, self._name, self._empty_run = 2 * n_docs, name, 0

    def filter(self, element: dict) -> bool:
        if element["tokens"].shape[0] > 0:
            self._empty_run = 0
            return True
        self._empty_run += 1
        if self._empty_run >= self._limit:
            raise sources.SourceError(f"data source {self._name!r}: all {self._limit // 2} documents are empty")
        return False


def _rename(row: dict) -> dict:
    return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"], "positions": row["tokens_positions"]}


def packed_batches(
    docs,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    *,
    seed: int | None = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
    num_epochs: int | None = None,
) -> grain.IterDataset:
    """Documents -> endless (or `num_epochs`) batches of packed rows; see the module docstring.

    `seed=None` keeps document order. The rows do not depend on `worker_count`.
    """
    name = getattr(docs, "name", type(docs).__name__)
    if len(docs) < shard_count:
        raise sources.SourceError(f"data source {name!r}: {len(docs)} documents cannot be sharded over "
                                  f"{shard_count} processes (data.shard_by_process=True)")
    ds = grain.MapDataset.source(docs)[shard_index::shard_count]
    shard_docs = len(ds)
    if seed is not None:
        ds = ds.shuffle(seed=int(seed) % 2**32)
    ds = ds.repeat(num_epochs).map(_Tokenize(tokenizer))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=256))
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    it = _OneReaderState(it, worker_count)
    # Empty documents are dropped here, after the workers, so rows do not depend on them.
    it = it.filter(_DropEmpty(shard_docs, name))
    return pack_rows(it, seq_len).batch(batch_size, drop_remainder=True)


def pack_rows(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """{'tokens': [n]} documents, in order -> rows {tokens, segment_ids, positions} of `seq_len`
    (grain ConcatThenSplit; see the module docstring). `data.prepare` packs with this too."""
    it = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"tokens": seq_len})
    return it.map(_rename)


class _ProcessRows(grain.transforms.Map):
    """Rows [index * n, (index + 1) * n) of a global batch: this process's part."""

    def __init__(self, process_index: int, rows: int):
        self._start, self._rows = process_index * rows, rows

    def map(self, batch: dict) -> dict:
        return {k: v[self._start : self._start + self._rows] for k, v in batch.items()}


def train_iterator(config, tokenizer: Tokenizer, process_index: int = 0, process_count: int = 1):
    """This process's batches: a grain iterator with get_state() / set_state().

    By default every process packs the same global stream and keeps its own rows of each
    global batch, so the global batch does not depend on the number of processes (a run on
    2 hosts equals a run on 1). `data.shard_by_process=True` instead gives each process its
    own documents: less tokenization per host, but the batches depend on the process count.
    A `prepared:` source is read by row index instead (`prepared.train_iterator`).
    """
    if prepared.is_prepared(config.data.source):
        return prepared.train_iterator(config, process_index, process_count)
    docs = documents(config, "train")
    local = prepared.local_batch_size(config, process_count)
    seed = prepared.order_seed(config)
    if config.data.get("shard_by_process", False):
        ds = packed_batches(
            docs, tokenizer, config.train.seq_len, local, seed=seed,
            shard_index=process_index, shard_count=process_count, worker_count=config.data.worker_count,
        )
    else:
        ds = packed_batches(
            docs, tokenizer, config.train.seq_len, config.train.batch_size, seed=seed,
            worker_count=config.data.worker_count,
        )
        if process_count > 1:
            ds = ds.map(_ProcessRows(process_index, local))
    return iter(ds)


def validation_batches(config, tokenizer: Tokenizer, num_batches: int) -> list[dict]:
    """`num_batches` global batches (train.batch_size rows) of held-out rows, in a fixed order."""
    if prepared.is_prepared(config.data.source):
        return prepared.validation_batches(config, num_batches)
    docs = documents(config, "validation")
    ds = packed_batches(docs, tokenizer, config.train.seq_len, config.train.batch_size, seed=None)
    it = iter(ds)
    batches = [next(it) for _ in range(num_batches)]
    rows, tokens = num_batches * config.train.batch_size, sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    logging.info("data: %d validation rows (%d tokens) from %d held-out documents", rows, tokens, len(docs))
    return batches


def pipeline_rows_per_second(config, tokenizer: Tokenizer, seconds: float = 5.0) -> float:
    """Rows per second that `train_iterator` produces on this machine (after its first batch)."""
    it = train_iterator(config, tokenizer)
    next(it)
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        rows += next(it)["tokens"].shape[0]
    return rows / (time.perf_counter() - start)


def _tokenizer_cache_dir(config) -> str:
    data = config.data
    key = {"source": data.source, "text_field": data.text_field, "text_mode": _text_mode(config),
           "validation_source": data.validation_source, "vocab_size": int(data.tokenizer_vocab_size),
           "files": sources.fingerprint(data.source)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() else "_" for c in data.source)[:40]
    return os.path.join(cache.cache_dir(), "tokenizers", f"{slug}-{data.tokenizer_vocab_size}-{digest}")


def check_tokenizer(config, tokenizer: Tokenizer) -> None:
    """A `ConfigError` naming the key when the tokenizer does not fit the config: a vocabulary
    larger than `model.vocab_size`. (Its special ids need no check: the train command takes
    every `tokens.*` id from the tokenizer, `train._apply_tokenizer`.)"""
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} pieces")


def prepare_tokenizer(config, workdir: str | None = None) -> Tokenizer:
    """`data.tokenizer` if set; else the run's own copy (resume); else one trained on the
    training documents with `data.tokenizer_vocab_size` pieces, cached in the cache folder.
    A copy goes to `workdir/tokenizer/`. A `prepared:` source brings its own tokenizer."""
    if prepared.is_prepared(config.data.source):
        tokenizer = prepared.prepare_tokenizer(config, workdir)
        check_tokenizer(config, tokenizer)
        return tokenizer
    run_copy = os.path.join(workdir, "tokenizer") if workdir else None
    if config.data.tokenizer:
        tokenizer = load_tokenizer(config.data.tokenizer)
    elif run_copy and os.path.isdir(run_copy):
        tokenizer = load_tokenizer(run_copy)
    else:
        cached = _tokenizer_cache_dir(config)
        try:
            tokenizer = load_tokenizer(cached)
        except TokenizerError:
            docs = documents(config, "train")
            logging.info("data: training a %d-piece tokenizer on %s", config.data.tokenizer_vocab_size,
                         config.data.source)
            tmp = f"{cached}.tmp{os.getpid()}"
            tokenizer = train_tokenizer(sources.sample_texts(docs, 200_000_000), config.data.tokenizer_vocab_size, tmp)
            shutil.rmtree(cached, ignore_errors=True)
            os.replace(tmp, cached)
    check_tokenizer(config, tokenizer)
    if run_copy and not os.path.isdir(run_copy):
        tokenizer.save(run_copy)
    return tokenizer


def to_global_batch(batch: dict, sharding) -> dict:
    """Process-local numpy rows -> global jax.Arrays laid out by `sharding` (batch axis first)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
