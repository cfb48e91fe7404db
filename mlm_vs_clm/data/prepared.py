"""Training on a prepared corpus (`data.source=prepared:DIR`): packed rows read by row index.

A prepared corpus (written by `python -m mlm_vs_clm.data.prepare`) is a folder holding
`manifest.json`, ArrayRecord shards of packed rows (`train-NNNNN.array_record`, held-out
`validation-NNNNN.array_record`) and `tokenizer/`, a copy of its tokenizer.

A row record holds the row's tokens and its segments' lengths (`rows.py`); segment ids and
positions are rebuilt from them exactly as the pipeline packed them.

Global row j of step s is `row(s * batch_size + j)`: for one corpus, `perm_e(g mod n)` with
e = g // n the epoch and perm_e grain's seeded index shuffle (`MapDataset.shuffle`, seed
`seed + e`), computed lazily per index. Each process reads only its rows
`[p * batch / P, (p + 1) * batch / P)` of each global batch; the iterator is a grain
`MapDataset` over steps, so its state is the step (`{"next_index": s}`) and a checkpoint
resumes under any process count with the identical global batch. A mixture
`prepared:A@0.7,prepared:B@0.3` assigns global rows to corpora in blocks of
`MIXTURE_BLOCK` rows: in each block, a seeded arrangement of round(w * MIXTURE_BLOCK) slots
per corpus; a corpus's k-th slot overall reads its own k-th permuted row.
"""

from __future__ import annotations

import json
import os

import grain
import numpy as np
from grain._src.python.experimental.index_shuffle.python import (
    index_shuffle_module as _index_shuffle,
)

from mlm_vs_clm.config import ConfigError
from mlm_vs_clm.data.rows import (
    FORMAT_VERSION,
    MANIFEST,
    TOKENIZER_DIR,
    decode_rows,
    tokenizer_fingerprint,
)
from mlm_vs_clm.data.sources import SourceError
from mlm_vs_clm.data.tokenizer import load_tokenizer

PREFIX = "prepared:"
MIXTURE_BLOCK = 1000


class PreparedError(SourceError):
    """A prepared corpus is missing, corrupt or does not fit the run; the message names the file."""


def is_prepared(spec: str) -> bool:
    return (spec or "").strip().startswith(PREFIX)


def local_batch_size(config, process_count: int) -> int:
    """Rows of the global batch that one process reads (prepared and on-the-fly sources alike)."""
    if config.train.batch_size % process_count:
        raise ConfigError(f"train.batch_size={config.train.batch_size} is not divisible by {process_count} processes")
    return config.train.batch_size // process_count


def order_seed(config) -> int | None:
    """The seed of the data order, for prepared and on-the-fly sources alike: `data.seed`, or the
    run's `seed` when it is -1; None when `data.shuffle` is off (rows in order)."""
    if not config.data.shuffle:
        return None
    data_seed = int(config.data.get("seed", -1))
    return int(config.seed) if data_seed < 0 else data_seed


def permuted_row(g: int, n: int, seed: int) -> int:
    """Row of global index `g` in an endless stream of per-epoch permutations of n rows: the
    same as `grain.MapDataset.range(n).shuffle(seed=seed)[g] % n` (grain's index shuffle,
    seed + epoch), computed here without the dataset's per-element overhead."""
    epoch, k = divmod(int(g), n)
    return _index_shuffle.index_shuffle(k, max_index=n - 1, seed=(int(seed) + epoch) % 2**32, rounds=4)


# -- a prepared corpus --------------------------------------------------------------------------

class Rows:
    """Random access to one split's rows (the shards in manifest order), decoded."""

    def __init__(self, corpus: Corpus, shards: list[dict]):
        self._paths = [os.path.join(corpus.directory, s["file"]) for s in shards if s["rows"]]
        self._ends = np.cumsum([s["rows"] for s in shards if s["rows"]])
        self._seq_len, self._dtype = corpus.seq_len, corpus.dtype
        self._source = None

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _file_of(self, index: int) -> str:
        return self._paths[int(np.searchsorted(self._ends, index, side="right"))]

    def read(self, indices) -> dict:
        """Rows `indices` (taken modulo the row count), stacked: int32 [len(indices), seq_len]."""
        indices = [int(i) % len(self) for i in indices]
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self._paths)
        records = []
        for index in indices:
            try:
                records.append(self._source[index])
            except Exception as e:  # array_record errors of many types: this shard is unusable
                raise self._error(index, e) from e
        try:
            return decode_rows(records, self._seq_len, self._dtype)
        except ValueError:
            for index, record in zip(indices, records):  # find the row that does not decode
                try:
                    decode_rows([record], self._seq_len, self._dtype)
                except ValueError as e:
                    raise self._error(index, e) from e
            raise

    def _error(self, index: int, e: Exception) -> PreparedError:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return PreparedError(f"prepared shard {self._file_of(index)!r} is corrupt: row {index}: {detail}")

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.read([index]).items()}

    def __getstate__(self):
        return {**self.__dict__, "_source": None}


class Corpus:
    """A prepared corpus folder (or its manifest.json), checked: every shard present, whole."""

    def __init__(self, path: str):
        path = os.path.abspath(os.path.expanduser(path))
        self.directory = os.path.dirname(path) if path.endswith(".json") else path
        manifest = os.path.join(self.directory, MANIFEST)
        if not os.path.isfile(manifest):
            raise PreparedError(f"prepared corpus {self.directory!r}: no {MANIFEST} (a prepare that has not "
                                "finished, or not a prepared corpus)")
        try:
            with open(manifest) as f:
                m = json.load(f)
            self.seq_len, self.dtype = int(m["seq_len"]), str(m["token_dtype"])
            version = int(m["format_version"])
            train, validation = m["train"]["shards"], m["validation"]["shards"]
            self.tokenizer_fingerprint = m["tokenizer"]["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PreparedError(f"prepared manifest {manifest!r} is corrupt ({type(e).__name__}: {e})") from e
        if version != FORMAT_VERSION:
            raise PreparedError(f"prepared manifest {manifest!r} has format version {version}; this code reads "
                                f"version {FORMAT_VERSION}: prepare the corpus again")
        for shard in train + validation:
            file = os.path.join(self.directory, shard["file"])
            if not os.path.isfile(file):
                raise PreparedError(f"prepared shard {file!r} is missing")
            if os.path.getsize(file) != shard["bytes"]:
                raise PreparedError(f"prepared shard {file!r} is corrupt: {os.path.getsize(file)} bytes, the manifest "
                                    f"says {shard['bytes']}")
        self.manifest = m
        self.train, self.validation = Rows(self, train), Rows(self, validation)
        if not len(self.train):
            raise PreparedError(f"prepared corpus {self.directory!r} has no training rows")

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.directory, TOKENIZER_DIR)


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """`prepared:A[@w],prepared:B[@w]` -> [(A, w), ...] with weights summing to 1."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    out = []
    for part in parts:
        if not part.startswith(PREFIX):
            raise ConfigError(f"data.source: {part!r} in a mixture is not prepared:DIR[@WEIGHT]")
        body = part[len(PREFIX):]
        path, _, weight = body.rpartition("@") if "@" in body else (body, "", "1")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not path or not w > 0:
            raise ConfigError(f"data.source: {part!r}: expected prepared:DIR[@WEIGHT] with a positive weight")
        out.append((path, w))
    total = sum(w for _, w in out)
    return [(p, w / total) for p, w in out]


_corpora: dict = {}


def open_corpora(spec: str) -> list[tuple[Corpus, float]]:
    out = []
    for path, w in parse_spec(spec):
        key = os.path.abspath(path)
        if key not in _corpora:
            _corpora[key] = Corpus(path)
        out.append((_corpora[key], w))
    first = out[0][0]
    for c, _ in out[1:]:
        if c.tokenizer_fingerprint != first.tokenizer_fingerprint or c.seq_len != first.seq_len:
            raise ConfigError(f"data.source: prepared corpora {first.directory!r} and {c.directory!r} differ in "
                              "tokenizer or seq_len; a mixture needs one tokenizer and one seq_len")
    return out


class Mixture:
    """Global row index -> a row of one of the corpora (module docstring)."""

    def __init__(self, corpora: list[tuple[Corpus, float]], seed: int | None):
        self._shuffle, seed = seed is not None, seed or 0  # None: rows in order (data.shuffle=False)
        self._rows = [c.train for c, _ in corpora]
        self._seeds = [(int(seed) + 1_000_003 * i) % 2**32 for i in range(len(corpora))]
        counts = np.round(np.array([w for _, w in corpora]) * MIXTURE_BLOCK).astype(np.int64)
        counts[np.argmax(counts)] += MIXTURE_BLOCK - counts.sum()
        self._counts, self._seed = counts, int(seed)
        self._block_cache: dict = {}

    def _block(self, b: int):
        found = self._block_cache.get(b)  # read by several grain threads: never index after a check
        if found is None:
            labels = np.repeat(np.arange(len(self._counts)), self._counts)
            labels = np.random.default_rng([self._seed, b]).permutation(labels)
            ranks = np.zeros_like(labels)
            for c in range(len(self._counts)):
                ranks[labels == c] = np.arange(self._counts[c])
            if len(self._block_cache) > 64:
                self._block_cache.clear()
            found = self._block_cache[b] = (labels, ranks)
        return found

    def locate(self, g: int) -> tuple[int, int]:
        """(corpus, row of that corpus) of global row `g`."""
        if len(self._rows) == 1:
            c, k = 0, int(g)
        else:
            b, slot = divmod(int(g), MIXTURE_BLOCK)
            labels, ranks = self._block(b)
            c = int(labels[slot])
            k = b * int(self._counts[c]) + int(ranks[slot])
        n = len(self._rows[c])
        return c, permuted_row(k, n, self._seeds[c]) if self._shuffle else k % n

    def read(self, first: int, count: int) -> dict:
        """Global rows [first, first + count), stacked."""
        where = [self.locate(g) for g in range(first, first + count)]
        if len(self._rows) == 1:
            return self._rows[0].read([r for _, r in where])
        parts = {c: self._rows[c].read([r for cc, r in where if cc == c]) for c in {c for c, _ in where}}
        taken = dict.fromkeys(parts, 0)
        order = []
        for c, _ in where:
            order.append((c, taken[c]))
            taken[c] += 1
        return {k: np.stack([parts[c][k][i] for c, i in order]) for k in ("tokens", "segment_ids", "positions")}

    def __getitem__(self, g: int) -> dict:
        return {k: v[0] for k, v in self.read(int(g), 1).items()}


class _StepRows(grain.transforms.Map):
    """step s -> this process's rows [start, start + rows) of global batch s, stacked."""

    def __init__(self, mixture: Mixture, batch_size: int, start: int, rows: int):
        self._mixture, self._batch, self._start, self._rows = mixture, batch_size, start, rows

    def map(self, step: int) -> dict:
        return self._mixture.read(int(step) * self._batch + self._start, self._rows)


def check_seq_len(config, corpora) -> None:
    corpus = corpora[0][0]
    if corpus.seq_len != config.train.seq_len:
        raise ConfigError(f"train.seq_len={config.train.seq_len} differs from the prepared corpus "
                          f"{corpus.directory!r}, packed at seq_len {corpus.seq_len}")


def train_iterator(config, process_index: int = 0, process_count: int = 1, threads: int = 4):
    """This process's batches: a grain iterator whose state is the step."""
    corpora = open_corpora(config.data.source)
    check_seq_len(config, corpora)
    local = local_batch_size(config, process_count)
    mixture = Mixture(corpora, order_seed(config))
    ds = grain.MapDataset.range(2**62).map(_StepRows(mixture, config.train.batch_size, process_index * local, local))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)))


def validation_batches(config, num_batches: int) -> list[dict]:
    """Global batches of the first corpus's held-out rows, in order (wrapping around)."""
    corpus = open_corpora(config.data.source)[0][0]
    rows = corpus.validation
    if not len(rows):
        raise PreparedError(f"prepared corpus {corpus.directory!r} has no held-out rows (prepared with "
                            "--heldout_every=0); prepare it with held-out documents")
    b = config.train.batch_size
    out = []
    for i in range(num_batches):
        out.append(rows.read(range(i * b, (i + 1) * b)))
    return out


def prepare_tokenizer(config, workdir: str | None):
    """The manifest's tokenizer; `data.tokenizer` (or the run's copy) only if it is the same one."""
    corpora = open_corpora(config.data.source)
    corpus = corpora[0][0]
    run_copy = os.path.join(workdir, "tokenizer") if workdir else None
    given = config.data.tokenizer or (run_copy if run_copy and os.path.isdir(run_copy) else "")
    tokenizer = load_tokenizer(given or corpus.tokenizer_dir)
    fp = tokenizer_fingerprint(tokenizer)
    if fp != corpus.tokenizer_fingerprint:
        raise PreparedError(f"tokenizer {given!r} (fingerprint {fp}) differs from the prepared corpus's "
                            f"{corpus.tokenizer_dir!r} (fingerprint {corpus.tokenizer_fingerprint})")
    if run_copy and not os.path.isdir(run_copy):
        tokenizer.save(run_copy)
    return tokenizer
