"""Prepare a corpus once: tokenized, packed rows in ArrayRecord shards plus a manifest.

    python -m mlm_vs_clm.data.prepare --source=SPEC --tokenizer=DIR --seq_len=N --out=DIR \
        [--workers=N] [--seed=0] [--text_field=text] [--text_mode=file|blocks] [--shard_mb=128] \
        [--heldout_every=64] [--heldout_docs=32] [--runner=local|beam] [--beam_options='...']

Then train with `--config.data.source=prepared:DIR` (`data/prepared.py`).

How (see docs/data.md):
1. The source is listed in pieces (`stream.py`: a Parquet row group, a 32 MB byte range of
   a JSON-lines file, a text file, 4,096 documents of a tfds: source), reading only sizes
   and Parquet footers.
2. Two-level shuffle. Level 1: the pieces are permuted with `--seed` and dealt, in that
   order, into shards of about `--shard_mb` MB of source text, so a shard mixes pieces from
   all over the corpus. Level 2: a shard's documents are permuted with (seed, shard index).
   Training then reads the rows in a seeded permutation of all rows, new each epoch.
3. Every shard is one task of a pure function, `prepare_shard(index, pieces, settings)`:
   it reads its pieces (memory: one shard of text), holds out documents 0, E, 2E, ... of
   its shuffled order (at most `--heldout_docs`), tokenizes and packs the rest exactly as the
   training pipeline packs (bos + ids + eos, same segments and positions: `pack_documents`),
   and writes `train-NNNNN.array_record`, `validation-NNNNN.array_record` and, last,
   `shard-NNNNN.json` (its counts), each to a temporary name renamed when complete.
   A shard is done when its json names files of the recorded sizes.
4. Local runs map the tasks over `--workers` processes; `--runner=beam` maps them on Apache
   Beam (`beam_runner.py`: DirectRunner here, Dataflow, Flink or Spark by `--beam_options`).
   Rerunning the same command after a crash does only the shards not done, and gives the
   identical result (nothing in the output depends on timing, the worker count or the
   runner). `manifest.json` is written last, by this process, whichever runner ran the shards.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from mlm_vs_clm.data import rows, sources, stream
from mlm_vs_clm.data.prepare import beam_runner
from mlm_vs_clm.data.sources import SourceError, SourceStats
from mlm_vs_clm.data.tokenizer import load_tokenizer

PLAN = "plan.json"
TMP = ".tmp-"
RUNNERS = ("local", "beam")


class PrepareError(SourceError):
    """The output folder or the arguments do not fit; the message names them."""


def _atomic_write(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f"{TMP}{os.path.basename(path)}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plan_shards(pieces: list[dict], seed: int, shard_bytes: int) -> list[list[dict]]:
    """Level-1 shuffle: pieces in a seeded order, dealt into shards of about `shard_bytes`."""
    shards, current, size = [], [], 0
    for i in np.random.default_rng([int(seed), 1]).permutation(len(pieces)):
        piece = pieces[int(i)]
        if current and size + piece["bytes"] > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(piece)
        size += piece["bytes"]
    if current:
        shards.append(current)
    return shards


# -- the per-shard function (pure: its output depends only on its arguments) --------------------

_tokenizers: dict = {}


def _tokenizer(directory: str):
    if directory not in _tokenizers:
        _tokenizers[directory] = load_tokenizer(directory)
    return _tokenizers[directory]


def shard_texts(index: int, pieces: list[dict], settings: dict):
    """(training texts in packing order, held-out texts, SourceStats) of shard `index`."""
    stats = SourceStats()
    texts = [t for p in pieces for t in stream.read_piece(p, settings["text_field"], settings["text_mode"], stats)]
    texts = [texts[i] for i in np.random.default_rng([int(settings["seed"]), 2, index]).permutation(len(texts))]
    every, cap = settings["heldout_every"], settings["heldout_docs"]
    held = {j for j in range(0, len(texts), every)[:cap]} if every > 0 else set()
    return [t for j, t in enumerate(texts) if j not in held], [texts[j] for j in sorted(held)], stats


def pack_documents(docs, seq_len: int, chunk_tokens: int = 1 << 20):
    """Token arrays of documents, in order -> rows (tokens, segment_ids) of `seq_len`, equal to
    what the training pipeline's grain packer (`pipeline.pack_rows`, ConcatThenSplit) makes of
    the same documents, computed with numpy on chunks of about `chunk_tokens` tokens (tests
    check the equality, chunk boundaries and empty documents included).

    The packer's rules: the documents are concatenated and cut into rows; a row's segment ids
    count its documents from 1 (the part of a document that continues from the row before is
    1), padding (the last row's end) is 0. An empty document takes an id in the row the packer
    is filling: the row of the token before it, where a full row stays current until the next
    token, or row 0 at the start; a stream of only empty documents gives one all-padding row.
    """
    buf, size, placed = [], 0, False
    for doc in docs:
        if not len(doc) and not buf and placed:
            continue  # an empty document right after a full row: an id of that (written) row
        buf.append(doc)
        size += len(doc)
        placed = placed or bool(len(doc))
        if size >= chunk_tokens + seq_len:
            full, buf = _pack_chunk(buf, seq_len, final=False)
            size = sum(len(d) for d in buf)
            yield from full
    if buf:
        yield from _pack_chunk(buf, seq_len, final=True)[0]


def _pack_chunk(buf: list, seq_len: int, final: bool):
    """(rows, the documents left for the next chunk): the full rows of `buf` (and, if `final`,
    the last, padded row); buf[0] is the first element of its first row."""
    lengths = np.fromiter((len(d) for d in buf), np.int64, len(buf))
    total = int(lengths.sum())
    n_rows = -(-total // seq_len) if final else total // seq_len
    if final and total == 0:
        n_rows = 1
    used = min(total, n_rows * seq_len)
    flat = np.concatenate([np.asarray(d, np.int32) for d in buf]) if total else np.zeros((0,), np.int32)
    ordinal = np.full(n_rows * seq_len, -1, np.int64)
    ordinal[:used] = np.repeat(np.arange(len(buf)), lengths)[:used]
    tokens = np.zeros(n_rows * seq_len, np.int32)
    tokens[:used] = flat[:used]
    first = ordinal[::seq_len].copy()
    first[0] = 0
    segments = np.where(ordinal >= 0, ordinal - np.repeat(first, seq_len) + 1, 0).astype(np.int32)
    packed = list(zip(tokens.reshape(n_rows, seq_len), segments.reshape(n_rows, seq_len)))
    rest = []
    if used < total:  # the document at the cut continues the next row, then the ones after it
        ends = np.cumsum(lengths)
        d = int(np.searchsorted(ends, used, side="right"))
        rest = [flat[used:int(ends[d])]] + buf[d + 1:]
    return packed, rest


def packed_rows(texts: list[str], tokenizer, seq_len: int):
    """Rows (tokens, segment_ids) of `texts` in order: [bos] + ids + [eos] per document
    (`Tokenizer.encode_document`, as in the pipeline), packed as the pipeline packs them."""
    yield from pack_documents((tokenizer.encode_document(t) for t in texts), seq_len)


def _write(path: str, packed, dtype: str) -> dict:
    tmp = os.path.join(os.path.dirname(path), f"{TMP}{os.path.basename(path)}.{os.getpid()}")
    writer = ArrayRecordWriter(tmp, "group_size:1,uncompressed")
    n = tokens = 0
    for row_tokens, segment_ids in packed:
        writer.write(rows.encode_row(row_tokens, segment_ids, dtype))
        n, tokens = n + 1, tokens + int((segment_ids > 0).sum())
    writer.close()
    os.replace(tmp, path)
    return {"file": os.path.basename(path), "rows": n, "tokens": tokens, "bytes": os.path.getsize(path)}


def shard_names(index: int) -> tuple[str, str, str]:
    return f"train-{index:05d}.array_record", f"validation-{index:05d}.array_record", f"shard-{index:05d}.json"


def prepare_shard(index: int, pieces: list[dict], settings: dict) -> dict:
    """Writes shard `index` into settings['out'] and returns its counts (also in shard-NNNNN.json)."""
    out, seq_len, dtype = settings["out"], settings["seq_len"], settings["token_dtype"]
    tokenizer = _tokenizer(os.path.join(out, rows.TOKENIZER_DIR))
    train, held, stats = shard_texts(index, pieces, settings)
    train_name, val_name, json_name = shard_names(index)
    info = {"index": index, "source_bytes": sum(p["bytes"] for p in pieces), "documents": len(train),
            "heldout_documents": len(held), "skipped_empty": stats.skipped_empty,
            "repaired_utf8": stats.repaired_utf8}
    info["train"] = _write(os.path.join(out, train_name), packed_rows(train, tokenizer, seq_len), dtype)
    info["validation"] = _write(os.path.join(out, val_name), packed_rows(held, tokenizer, seq_len), dtype)
    _atomic_write(os.path.join(out, json_name), json.dumps(info, sort_keys=True))
    return info


def _run_shard(args):
    index, pieces, settings = args
    return prepare_shard(index, pieces, settings)


def _map_local(tasks: list[tuple], workers: int, progress: bool | None) -> int:
    """Runs the tasks (index, pieces, settings) over `workers` processes with a progress bar;
    returns the number of processes used."""
    start, done_tokens, done_docs = time.perf_counter(), 0, 0
    bar = tqdm(total=sum(p["bytes"] for _i, pieces, _s in tasks for p in pieces), unit="B", unit_scale=True,
               desc="prepare", disable=None if progress is None else not progress, file=sys.stderr)
    workers = max(1, min(int(workers), len(tasks) or 1))
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap_unordered(_run_shard, tasks) if pool else map(_run_shard, tasks)
        for info in results:
            done_tokens += info["train"]["tokens"] + info["validation"]["tokens"]
            done_docs += info["documents"] + info["heldout_documents"]
            rate = done_tokens / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(docs=f"{done_docs:,}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(info["source_bytes"])
    finally:
        if pool:
            pool.terminate()
        bar.close()
    return workers


def shard_done(out: str, index: int) -> dict | None:
    """The shard's counts if it is complete: its json names files of the recorded sizes."""
    try:
        with open(os.path.join(out, shard_names(index)[2])) as f:
            info = json.load(f)
        for part in ("train", "validation"):
            if os.path.getsize(os.path.join(out, info[part]["file"])) != info[part]["bytes"]:
                return None
        return info
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- the command ----------------------------------------------------------------------------------

def source_fingerprint(spec: str) -> str:
    return hashlib.sha256(json.dumps([spec, sources.fingerprint(spec)]).encode()).hexdigest()[:16]


def prepare(source: str, tokenizer: str, seq_len: int, out: str, workers: int = 1, seed: int = 0,
            text_field: str = "text", text_mode: str = "file", shard_mb: float = 128, heldout_every: int = 64,
            heldout_docs: int = 32, progress: bool | None = None,
            jsonl_piece_bytes: int = stream.JSONL_PIECE_BYTES, runner: str = "local",
            beam_options: str | Sequence[str] = ()) -> dict:
    """Prepares (or finishes preparing) `source` into `out`; returns the manifest. `runner`:
    'local' (`workers` processes) or 'beam' (Apache Beam with `beam_options`, beam_runner.py)."""
    if not shard_mb > 0:
        raise PrepareError(f"--shard_mb={shard_mb}: must be positive")
    if seq_len < 2:
        raise PrepareError(f"--seq_len={seq_len}: must be at least 2")
    if text_mode not in sources.TEXT_MODES:
        raise PrepareError(f"--text_mode={text_mode!r}: not one of {sources.TEXT_MODES}")
    if runner not in RUNNERS:
        raise PrepareError(f"--runner={runner!r}: not one of {RUNNERS}")
    beam = beam_runner.load() if runner == "beam" else None
    if runner == "beam" and beam is None:
        raise PrepareError(beam_runner.MISSING)  # before anything is written
    tok = load_tokenizer(tokenizer)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    settings = {"out": out, "seq_len": int(seq_len), "seed": int(seed), "text_field": text_field,
                "text_mode": text_mode, "heldout_every": int(heldout_every), "heldout_docs": int(heldout_docs),
                "token_dtype": rows.token_dtype(tok.vocab_size)}
    jsonl_piece_bytes = min(int(jsonl_piece_bytes), int(shard_mb * 2**20))  # a piece fits in a shard
    key = {"format_version": rows.FORMAT_VERSION, "source": source,
           "source_fingerprint": source_fingerprint(source),
           "tokenizer_fingerprint": rows.tokenizer_fingerprint(tok),
           "shard_bytes": int(shard_mb * 2**20), "jsonl_piece_bytes": int(jsonl_piece_bytes),
           **{k: v for k, v in settings.items() if k != "out"}}
    plan_path = os.path.join(out, PLAN)
    if os.path.isfile(plan_path):
        try:
            with open(plan_path) as f:
                old = json.load(f)
            old["key"], old["shards"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PrepareError(f"{plan_path!r} is corrupt ({type(e).__name__}); delete --out and prepare again") from e
        diff = sorted(k for k in set(key) | set(old["key"]) if old["key"].get(k) != key.get(k))
        if diff:
            raise PrepareError(f"--out {out!r} holds a prepare with other settings ({', '.join(diff)} differ); "
                               "use a new --out or delete it")
        shards = old["shards"]
    else:
        if [f for f in os.listdir(out) if f != rows.TOKENIZER_DIR and not f.startswith(TMP)]:
            raise PrepareError(f"--out {out!r} is not empty and holds no {PLAN}; use a new --out")
        pieces = stream.list_pieces(source, text_field, jsonl_piece_bytes)
        shards = plan_shards(pieces, seed, key["shard_bytes"])
        tmp_tok = os.path.join(out, f"{TMP}{rows.TOKENIZER_DIR}")
        shutil.rmtree(tmp_tok, ignore_errors=True)
        tok.save(tmp_tok)
        shutil.rmtree(os.path.join(out, rows.TOKENIZER_DIR), ignore_errors=True)  # a crash before the plan
        os.replace(tmp_tok, os.path.join(out, rows.TOKENIZER_DIR))
        _atomic_write(plan_path, json.dumps({"key": key, "shards": shards}, sort_keys=True))
    for leftover in glob.glob(os.path.join(out, f"{TMP}*")):  # a crashed run's half-written files
        shutil.rmtree(leftover) if os.path.isdir(leftover) else os.remove(leftover)

    pending = [i for i in range(len(shards)) if shard_done(out, i) is None]
    start = time.perf_counter()
    if beam is not None:
        try:
            how = "Beam " + beam_runner.map_shards(beam, prepare_shard, [(i, shards[i]) for i in pending],
                                                   settings, beam_options)
        except Exception as e:  # noqa: BLE001 - a runner's failure, whatever its type: one line
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise PrepareError(f"prepare {out!r}: the Beam pipeline failed ({type(e).__name__}: {first}); "
                               "the shards it completed are kept: run it again") from e
    else:
        how = f"{_map_local([(i, shards[i], settings) for i in pending], workers, progress)} workers"
    elapsed = time.perf_counter() - start

    infos = [shard_done(out, i) for i in range(len(shards))]
    missing = [shard_names(i)[2] for i, info in enumerate(infos) if info is None]
    if missing:
        raise PrepareError(f"prepare {out!r}: shards {', '.join(missing[:5])} did not complete; run it again")
    done_tokens = sum(infos[i][part]["tokens"] for i in pending for part in ("train", "validation"))
    manifest = {
        "format_version": rows.FORMAT_VERSION, "seq_len": int(seq_len), "token_dtype": settings["token_dtype"],
        "seed": int(seed), "settings": key,
        "source": {"spec": source, "fingerprint": key["source_fingerprint"], "text_field": text_field,
                   "text_mode": text_mode, "pieces": sum(len(s) for s in shards)},
        "tokenizer": {"fingerprint": key["tokenizer_fingerprint"], "dir": rows.TOKENIZER_DIR,
                      "kind": tok.kind, "vocab_size": int(tok.vocab_size)},
        "skipped_empty": sum(i["skipped_empty"] for i in infos),
        "repaired_utf8": sum(i["repaired_utf8"] for i in infos),
    }
    for part, docs in (("train", "documents"), ("validation", "heldout_documents")):
        manifest[part] = {"rows": sum(i[part]["rows"] for i in infos), "tokens": sum(i[part]["tokens"] for i in infos),
                          "documents": sum(i[docs] for i in infos), "shards": [i[part] for i in infos]}
    _atomic_write(os.path.join(out, rows.MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    t, v = manifest["train"], manifest["validation"]
    print(f"prepared {out}: {t['rows']:,} rows of {seq_len} ({t['tokens']:,} tokens, {t['documents']:,} documents) "
          f"in {len(shards)} shards, {v['rows']:,} held-out rows; {len(pending)} shards written now "
          f"({done_tokens / max(elapsed, 1e-9):,.0f} tokens/s, {how}), "
          f"{len(shards) - len(pending)} already done", flush=True)
    return manifest
