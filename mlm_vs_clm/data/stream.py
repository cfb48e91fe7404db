"""Streaming a data source in pieces, for `prepare`: memory bounded by one piece, not the corpus.

A piece is a JSON-serialisable dict, read on its own by `read_piece`:
- `{"kind": "parquet", "path", "row_group", "bytes"}`: one row group of a Parquet file;
- `{"kind": "jsonl", "path", "start", "end", "bytes"}`: the lines of a JSON-lines file that
  start in the byte range [start, end);
- `{"kind": "text", "path", "bytes"}`: one plain-text file (one document, or its blank-line
  blocks with text_mode='blocks');
- `{"kind": "indexed", "spec", "start", "end", "bytes"}`: documents [start, end) of a
  random-access source (`tfds:NAME`, read lazily, or `demo`).

`read_piece` yields stripped, non-empty documents, and counts the empty and the repaired
ones in a `sources.SourceStats`, with the same rules and one-line errors as `sources`.
"""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq

from mlm_vs_clm.data import sources
from mlm_vs_clm.data.sources import SourceError, SourceStats

JSONL_PIECE_BYTES = 32 << 20
INDEXED_PIECE_DOCS = 4096


def _indexed(spec: str) -> bool:
    return spec.startswith("tfds:") or spec in ("demo", "demo:pretrain", "demo:heldout")


def list_pieces(spec: str, text_field: str = "text", jsonl_piece_bytes: int = JSONL_PIECE_BYTES) -> list[dict]:
    """Every piece of `spec`, in source order. Reads only file sizes and Parquet footers."""
    spec = (spec or "").strip()
    if not spec:
        raise SourceError("data source is empty: give a path, a glob, tfds:NAME or demo")
    if _indexed(spec):
        n = len(sources.open_source(spec, text_field))
        return [{"kind": "indexed", "spec": spec, "start": a, "end": min(n, a + INDEXED_PIECE_DOCS),
                 "bytes": 1000 * (min(n, a + INDEXED_PIECE_DOCS) - a)} for a in range(0, n, INDEXED_PIECE_DOCS)]
    pieces = []
    for path in sources.expand_paths(spec):
        name, suffix = os.fspath(path), path.suffix.lower()
        if suffix in sources.BINARY_SUFFIXES:
            raise SourceError(f"data source {name!r}: a {path.suffix} file is compressed or binary, "
                              "not text; decompress or convert it, or leave it out of the source")
        try:
            st = path.stat()
            size = int(st.st_size if hasattr(st, "st_size") else st.length)
            if suffix in sources.PARQUET_SUFFIXES:
                with path.open("rb") as f:
                    meta = pq.ParquetFile(f).metadata
                    pieces += [{"kind": "parquet", "path": name, "row_group": g,
                                "bytes": int(meta.row_group(g).total_byte_size)} for g in range(meta.num_row_groups)]
            elif suffix in sources.JSONL_SUFFIXES:
                pieces += [{"kind": "jsonl", "path": name, "start": a, "end": min(size, a + jsonl_piece_bytes),
                            "bytes": min(size, a + jsonl_piece_bytes) - a} for a in range(0, size, jsonl_piece_bytes)]
            else:
                pieces.append({"kind": "text", "path": name, "bytes": int(size)})
        except SourceError:
            raise
        except Exception as e:  # OS and pyarrow errors: this file is unusable
            raise sources._read_error(path, e) from e
    return pieces


def _jsonl_lines(path, start: int, end: int):
    """(byte offset, line) for the lines of `path` that start in [start, end)."""
    with sources._path(path).open("rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of the line that began before `start` belongs to the previous piece
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                return
            yield pos, line
            pos += len(line)


def _raw_texts(piece: dict, text_field: str, text_mode: str, stats: SourceStats):
    kind = piece["kind"]
    if kind == "indexed":
        source = sources.open_source(piece["spec"], text_field)
        for i in range(piece["start"], piece["end"]):
            yield source[i]
        return
    path = sources._path(piece["path"])
    if kind == "text":
        yield from sources._texts_of_file(path, text_field, text_mode, stats)
    elif kind == "parquet":
        with path.open("rb") as f:
            parquet = pq.ParquetFile(f)
            if text_field not in parquet.schema_arrow.names:
                raise SourceError(f"data source {piece['path']!r}: no column {text_field!r} "
                                  f"(columns: {parquet.schema_arrow.names}); set --text_field")
            for value in parquet.read_row_group(piece["row_group"], columns=[text_field]).column(0).to_pylist():
                yield sources._decode(value, stats) if isinstance(value, bytes) else (value or "")
    elif kind == "jsonl":
        for offset, line in _jsonl_lines(piece["path"], piece["start"], piece["end"]):
            if offset == 0:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            where = f"data source {piece['path']!r} byte {offset}"
            try:
                record = json.loads(sources._decode(line, stats))
            except json.JSONDecodeError as e:
                raise SourceError(f"{where}: invalid JSON ({e})") from e
            if not isinstance(record, dict) or text_field not in record:
                raise SourceError(f"{where}: no field {text_field!r}; set --text_field")
            value = record[text_field]
            if value is not None and not isinstance(value, str):
                raise SourceError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string")
            yield value or ""
    else:
        raise SourceError(f"unknown piece kind {kind!r}")


def read_piece(piece: dict, text_field: str = "text", text_mode: str = "file", stats: SourceStats | None = None):
    """The stripped, non-empty documents of `piece`, in order."""
    stats = stats if stats is not None else SourceStats()
    try:
        for text in _raw_texts(piece, text_field, text_mode, stats):
            text = text.strip()
            if text:
                stats.documents += 1
                yield text
            else:
                stats.skipped_empty += 1
    except SourceError:
        raise
    except Exception as e:  # OS, pyarrow and codec errors of many types: this file is unusable
        raise sources._read_error(piece.get("path", piece.get("spec")), e) from e
