"""Document sources: random-access sequences of document strings (`len` + `[i]`) for grain.

`open_source(spec)` understands
- a local path, a directory (all files in it), a glob, or any `etils.epath` path (gs:// ...),
  several separated by commas. By extension: `.jsonl`/`.json`/`.ndjson` = JSON lines with a
  text field, `.parquet` = a text column, anything else = plain text, one document per file
  (`text_mode='file'`) or per blank-line-separated block (`text_mode='blocks'`). These are
  read once into memory, compactly (UTF-8 bytes + offsets); larger corpora belong in TFDS.
- `tfds:NAME[/CONFIG][:SPLIT]` (default split `train`): `tfds.data_source`, read lazily.
- `demo` / `demo:heldout`: the BBC News pretraining / held-out split (`demo_corpus`).

Empty documents are skipped, invalid UTF-8 is decoded with U+FFFD and counted, and the
counts are logged (at WARNING when nonzero); a leading UTF-8 byte order mark is dropped.
A `SourceError` names the file for: a missing path or a glob that matches nothing, a file
that cannot be read or parsed, a JSON text field that is not a string, a compressed or
binary suffix (`BINARY_SUFFIXES`), and a plain-text file more than `BINARY_FRACTION` of
whose characters are U+FFFD or control characters (binary data, or not UTF-8).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import pathlib
import re

import numpy as np
import pyarrow.parquet as pq
from absl import logging
from etils import epath

from mlm_vs_clm.data import demo_corpus
from mlm_vs_clm.data.errors import SourceError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_MODES = ("file", "blocks")
# Compressed, archive, image, audio, video and binary-data suffixes: never read as text.
BINARY_SUFFIXES = frozenset({
    ".gz", ".tgz", ".bz2", ".xz", ".lz4", ".zst", ".zstd", ".br", ".z", ".zip", ".tar", ".7z", ".rar",
    ".whl", ".jar", ".bin", ".npy", ".npz", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".safetensors",
    ".h5", ".hdf5", ".arrow", ".feather", ".tfrecord", ".array_record", ".model", ".so", ".o", ".a",
    ".dll", ".exe", ".pyc", ".class", ".db", ".sqlite", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif",
    ".tiff", ".webp", ".ico", ".pdf", ".mp3", ".wav", ".flac", ".ogg", ".mp4", ".avi", ".mov", ".mkv",
})
# A plain-text file with more than this fraction of U+FFFD or control characters is binary
# (or not UTF-8): Latin-1 French or German text has up to ~15 %, while compressed data,
# images, executables, float arrays and UTF-16 text have 50 % or more.
BINARY_FRACTION = 0.3
_GLOB_CHARS = re.compile(r"[*?\[]")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
_NOT_TEXT = re.compile(r"[\ufffd\x00-\x08\x0e-\x1f\x7f]")  # all C0 controls but \t \n \v \f \r


@dataclasses.dataclass
class SourceStats:
    files: int = 0
    documents: int = 0
    skipped_empty: int = 0
    repaired_utf8: int = 0


def _decode(raw: bytes, stats: SourceStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.repaired_utf8 += 1
        return raw.decode("utf-8", errors="replace")


class _RandomAccess:
    """Indices wrap around (grain's endless repeat reads past the end); iteration does not."""

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class Documents(_RandomAccess):
    """Documents held as one UTF-8 buffer plus offsets: ~1 byte per character."""

    def __init__(self, texts, name: str = "documents", stats: SourceStats | None = None):
        encoded = [t.encode("utf-8") for t in texts]
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self.name = name
        self.stats = stats or SourceStats(documents=len(encoded))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        index = int(index) % len(self)
        return self._data[self._offsets[index] : self._offsets[index + 1]].tobytes().decode("utf-8")

    def __repr__(self) -> str:
        return f"Documents({self.name!r}, {len(self)} documents)"


class TfdsDocuments(_RandomAccess):
    """`tfds.data_source` records -> their text field (bytes decoded with replacement).

    Read lazily, so an empty record comes back as '' (the pipeline drops those).
    """

    def __init__(self, spec: str, text_field: str = "text"):
        import tensorflow_datasets as tfds  # heavy (pulls in TensorFlow); only `tfds:` sources need it

        name, _, split = spec[len("tfds:") :].partition(":")
        if not name:
            raise SourceError(f"data source {spec!r}: expected tfds:NAME[/CONFIG][:SPLIT]")
        self.name, self.split, self.text_field = name, split or "train", text_field
        self.stats = SourceStats()
        try:
            self._source = tfds.data_source(name, split=self.split, data_dir=os.environ.get("TFDS_DATA_DIR"))
        except Exception as e:  # tfds raises many types; all mean the same to a user
            raise SourceError(f"data source {spec!r}: cannot open the TFDS data source: {e}") from e
        self.stats.documents = len(self._source)
        if len(self._source) == 0:
            raise SourceError(f"data source {spec!r}: split {self.split!r} has no records")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        record = self._source[int(index) % len(self)]
        if self.text_field not in record:
            raise SourceError(f"data source tfds:{self.name}: record has no field {self.text_field!r} "
                              f"(fields: {sorted(record)}); set data.text_field")
        value = record[self.text_field]
        text = _decode(value, self.stats) if isinstance(value, bytes) else str(value)
        return text if text.strip() else ""

    def __getstate__(self):
        return self.__dict__

    def __repr__(self) -> str:
        return f"TfdsDocuments({self.name!r}, split={self.split!r}, {len(self)} records)"


class IndexSubset(_RandomAccess):
    """Documents `index_fn(j)` for j in range(length) of a parent source (no index arrays)."""

    def __init__(self, parent, length: int, index_fn, name: str):
        self._parent, self._length, self._index_fn, self.name = parent, length, index_fn, name
        self.stats = getattr(parent, "stats", SourceStats())

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> str:
        return self._parent[self._index_fn(int(index) % self._length)]

    def __repr__(self) -> str:
        return f"IndexSubset({self.name!r}, {self._length} documents)"


def split_heldout(source, every: int = 64):
    """(train, heldout): document i is held out when i % every == 0 (~1.6 % for 64)."""
    n = len(source)
    if n < 2:
        raise SourceError(f"data source {getattr(source, 'name', source)!r}: {n} document(s), "
                          "too few to hold some out; set data.validation_source")
    n_held = -(-n // every)
    keep = every - 1
    train = IndexSubset(source, n - n_held, lambda j: (j // keep) * every + 1 + j % keep, "train part")
    heldout = IndexSubset(source, n_held, lambda k: k * every, "held-out part")
    return train, heldout


def _path(entry: str):
    """Local paths as pathlib (full glob support), URLs (gs://, ...) as etils.epath."""
    entry = entry.removeprefix("file://")
    return epath.Path(entry) if "://" in entry else pathlib.Path(entry)


def _files_under(path) -> list:
    found, stack = [], [path]
    while stack:
        for child in stack.pop().iterdir():
            if child.name.startswith("."):
                continue
            (stack if child.is_dir() else found).append(child)
    return sorted(found, key=os.fspath)


def expand_paths(spec: str) -> list[epath.Path]:
    """Comma-separated paths, directories and globs -> the files, sorted per entry."""
    files: list[epath.Path] = []
    for entry in [e.strip() for e in spec.split(",") if e.strip()]:
        if _GLOB_CHARS.search(entry):
            head = _GLOB_CHARS.split(entry, maxsplit=1)[0]
            base = head.rsplit("/", 1)[0] if "/" in head else "."
            pattern = entry[len(base) + 1 :] if base != "." or entry.startswith("./") else entry
            matched = sorted((p for p in _path(base).glob(pattern) if p.is_file()), key=os.fspath)
            if not matched:
                raise SourceError(f"data source: glob {entry!r} matches no files")
            files.extend(matched)
            continue
        path = _path(entry)
        if not path.exists():
            raise SourceError(f"data source: path {entry!r} does not exist")
        if path.is_dir():
            inside = _files_under(path)
            if not inside:
                raise SourceError(f"data source: directory {entry!r} contains no files")
            files.extend(inside)
        else:
            files.append(path)
    if not files:
        raise SourceError(f"data source: {spec!r} names no files")
    return files


def fingerprint(spec: str) -> list:
    """[absolute path, size, mtime] of every file of a file source ([] for tfds: and demo):
    changes when a file at the same path is rewritten."""
    spec = (spec or "").strip()
    if spec.startswith("tfds:") or spec in ("demo", "demo:pretrain", "demo:heldout"):
        return []
    out = []
    for path in expand_paths(spec):
        try:
            st = path.stat()
        except OSError as e:
            raise _read_error(path, e) from e
        if isinstance(path, pathlib.Path):
            out.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
        else:  # etils.epath (gs:// ...)
            out.append([os.fspath(path), st.length, st.mtime])
    return out


def _texts_of_file(path: epath.Path, text_field: str, text_mode: str, stats: SourceStats):
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        with path.open("rb") as f:
            parquet = pq.ParquetFile(f)
            if text_field not in parquet.schema_arrow.names:
                raise SourceError(f"data source {os.fspath(path)!r}: no column {text_field!r} "
                                  f"(columns: {parquet.schema_arrow.names}); set data.text_field")
            for batch in parquet.iter_batches(columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    if isinstance(value, bytes):
                        value = _decode(value, stats)
                    yield value or ""
        return
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    if suffix in JSONL_SUFFIXES:
        for line_no, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(_decode(line, stats))
            except json.JSONDecodeError as e:
                raise SourceError(f"data source {os.fspath(path)!r} line {line_no}: invalid JSON ({e})") from e
            if not isinstance(record, dict) or text_field not in record:
                raise SourceError(f"data source {os.fspath(path)!r} line {line_no}: no field {text_field!r}; "
                                  "set data.text_field")
            value = record[text_field]
            if value is not None and not isinstance(value, str):
                raise SourceError(f"data source {os.fspath(path)!r} line {line_no}: field {text_field!r} is "
                                  f"a {type(value).__name__}, not a string")
            yield value or ""
        return
    text = _decode(raw, stats).replace("\r\n", "\n")
    not_text = len(_NOT_TEXT.findall(text))
    if not_text > BINARY_FRACTION * len(text):
        raise SourceError(f"data source {os.fspath(path)!r}: {not_text / len(text):.0%} of its characters are "
                          "invalid UTF-8 or control characters: a binary file, or text not in UTF-8")
    if text_mode == "blocks":
        yield from _BLANK_LINE.split(text.strip())
    else:
        yield text


def _read_error(path, error: Exception) -> SourceError:
    """A library's error while reading or parsing `path` -> one line naming the file."""
    if isinstance(error, OSError) and error.strerror:
        reason = f"cannot read it ({error.strerror})"
    else:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = f"cannot parse it ({type(error).__name__}{': ' + detail if detail else ''})"
    return SourceError(f"data source {os.fspath(path)!r}: {reason}")


def read_files(spec: str, text_field: str = "text", text_mode: str = "file") -> Documents:
    """Reads every document of the files named by `spec` into memory."""
    if text_mode not in TEXT_MODES:
        raise SourceError(f"data.text_mode: {text_mode!r} is not one of {TEXT_MODES}")
    stats, texts = SourceStats(), []
    for path in expand_paths(spec):
        if path.suffix.lower() in BINARY_SUFFIXES:
            raise SourceError(f"data source {os.fspath(path)!r}: a {path.suffix} file is compressed or binary, "
                              "not text; decompress or convert it, or leave it out of data.source")
        stats.files += 1
        try:
            for text in _texts_of_file(path, text_field, text_mode, stats):
                text = text.strip()
                if text:
                    texts.append(text)
                else:
                    stats.skipped_empty += 1
        except SourceError:
            raise
        except Exception as e:  # OS, pyarrow and codec errors of many types: this file is unusable
            raise _read_error(path, e) from e
    stats.documents = len(texts)
    log = logging.warning if stats.skipped_empty or stats.repaired_utf8 else logging.info
    log("data source %s: %d documents from %d files; %d empty skipped; %d with invalid UTF-8 repaired",
        spec, stats.documents, stats.files, stats.skipped_empty, stats.repaired_utf8)
    if not texts:
        raise SourceError(f"data source {spec!r}: no non-empty documents")
    return Documents(texts, name=spec, stats=stats)


def open_source(spec: str, text_field: str = "text", text_mode: str = "file"):
    """A data source spec (see the module docstring) -> random-access documents."""
    spec = (spec or "").strip()
    if not spec:
        raise SourceError("data.source is empty: give a path, a glob, tfds:NAME or demo")
    if spec.startswith("tfds:"):
        return TfdsDocuments(spec, text_field)
    if spec in ("demo", "demo:pretrain", "demo:heldout"):
        texts = demo_corpus.heldout_texts() if spec == "demo:heldout" else demo_corpus.pretrain_texts()
        return Documents(texts, name=spec)
    return read_files(spec, text_field, text_mode)


def sample_texts(source, max_chars: int):
    """Up to ~max_chars of text from documents spread evenly over the source (in order)."""
    n = len(source)
    probe = [len(source[i]) for i in range(0, n, max(1, n // 100))]
    estimate = float(np.mean(probe)) * n if probe else 0.0
    stride = max(1, int(np.ceil(estimate / max(1, max_chars))))
    total = 0
    for i in range(0, n, stride):
        text = source[i]
        if text:
            yield text
            total += len(text)
            if total >= max_chars:
                return
