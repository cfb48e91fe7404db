"""data.prepare and prepared: sources: equal rows to the pipeline, resume, training, process counts, errors."""

import filecmp
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlm_vs_clm.config import ConfigError, load_config
from mlm_vs_clm.data import pipeline, prepare, prepared, rows, sources
from mlm_vs_clm.data import tokenizer as tk
from tests.helpers import run_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 32
WORDS = "the market grew while ministers met and the team won a late match in Zürich 東京".split()
SMALL = {"shard_mb": 0.004, "jsonl_piece_bytes": 3000, "heldout_every": 8, "heldout_docs": 2, "progress": False}


def _doc(rng, i):
    return f"doc{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 70))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """JSON lines, Parquet (several row groups) and text files, with an empty document."""
    d = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    with open(d / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": _doc(rng, i) if i != 7 else "  "}) + "\n" for i in range(150))
    pq.write_table(pa.table({"text": [_doc(rng, 1000 + i) for i in range(120)]}), d / "b.parquet", row_group_size=30)
    for i in range(12):
        (d / f"t{i:02d}.txt").write_text(_doc(rng, 2000 + i))
    return str(d / "*")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    rng = np.random.default_rng(1)
    out = str(tmp_path_factory.mktemp("tok"))
    tk.train_tokenizer([_doc(rng, i) for i in range(300)], vocab_size=300, model_type="bpe", out_dir=out)
    return out


@pytest.fixture(scope="module")
def ref(corpus, tok_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    prepare.prepare(corpus, tok_dir, SEQ, out, workers=1, **SMALL)
    return out


def _files(d):
    return sorted(f for f in os.listdir(d) if not f.startswith("."))


def _same_output(a, b):
    assert _files(a) == _files(b)
    _match, mismatch, errors = filecmp.cmpfiles(a, b, [f for f in _files(a) if os.path.isfile(os.path.join(a, f))],
                                               shallow=False)
    assert not mismatch and not errors, mismatch + errors


def test_prepared_rows_equal_the_pipeline_rows(corpus, tok_dir, ref):
    tok = tk.load_tokenizer(tok_dir)
    with open(os.path.join(ref, prepare.PLAN)) as f:
        plan = json.load(f)
    with open(os.path.join(ref, rows.MANIFEST)) as f:
        manifest = json.load(f)
    assert len(plan["shards"]) > 5 and manifest["train"]["rows"] > 100
    assert manifest["train"]["documents"] + manifest["validation"]["documents"] == 150 + 120 + 12 - 1
    assert manifest["skipped_empty"] == 1
    settings = {**{k: plan["key"][k] for k in ("seq_len", "seed", "text_field", "text_mode", "heldout_every",
                                               "heldout_docs", "token_dtype")}, "out": ref}
    corpus_ = prepared.Corpus(ref)
    row = 0
    for i, pieces in enumerate(plan["shards"]):
        train, _held, _ = prepare.shard_texts(i, pieces, settings)
        if not train:  # a shard of one document, held out
            continue
        ds = pipeline.packed_batches(sources.Documents(train), tok, SEQ, 1, seed=None, num_epochs=1)
        for batch in ds:  # the training pipeline's rows of the same documents in the same order
            got = corpus_.train[row]
            for k in pipeline.FEATURES:
                np.testing.assert_array_equal(got[k], batch[k][0])
            row += 1
    assert row == len(corpus_.train) == manifest["train"]["rows"]
    # Documents are shuffled: a shard's first document is not the first of its first piece.
    firsts = [prepare.shard_texts(i, p, settings)[0][:1] for i, p in enumerate(plan["shards"])]
    assert len({f[0] for f in firsts if f}) == sum(1 for f in firsts if f) > 5


def _grain_rows(docs, seq_len):
    import grain
    ds = grain.MapDataset.source([{"tokens": np.asarray(d, np.int32)} for d in docs])
    return [(r["tokens"], r["segment_ids"])
            for r in pipeline.pack_rows(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)), seq_len)]


@pytest.mark.parametrize("case", range(40))
def test_pack_documents_equals_the_pipelines_grain_packer(case):
    """The numpy packer of prepare = the pipeline's grain packer, for any chunking: documents
    longer than a row, ending on a row's end, and empty ones anywhere (including first, last,
    right after a full row, and only empty ones)."""
    rng = np.random.default_rng(case)
    seq_len = int(rng.choice([4, 7, 16]))
    fixed = {0: [[1, 2, 3, 4], [], [5]], 1: [[], [1, 2, 3, 4]], 2: [[1, 2], [], [], [3]], 3: [[]], 4: [],
             5: [[1, 2, 3, 4, 5], [], [6]], 6: [[1, 2, 3, 4], []]}
    if case in fixed:
        seq_len, docs = 4, fixed[case]
    else:
        lengths = rng.choice([0, 1, seq_len - 1, seq_len, seq_len + 1, 3 * seq_len], size=int(rng.integers(1, 30)),
                             p=[0.15, 0.25, 0.15, 0.15, 0.15, 0.15])
        docs = [rng.integers(1, 1000, int(n)).astype(np.int32) for n in lengths]
    want = _grain_rows(docs, seq_len)
    for chunk in (1, 3, seq_len, 1 << 20):
        got = list(prepare.pack_documents((np.asarray(d, np.int32) for d in docs), seq_len, chunk_tokens=chunk))
        assert len(got) == len(want), (chunk, docs)
        for (gt, gs), (wt, ws) in zip(got, want):
            np.testing.assert_array_equal(gt, wt)
            np.testing.assert_array_equal(gs, ws)


def test_two_workers_and_a_rerun_give_the_same_output(corpus, tok_dir, ref, tmp_path, capsys):
    out = str(tmp_path / "w2")
    prepare.prepare(corpus, tok_dir, SEQ, out, workers=2, **SMALL)
    _same_output(ref, out)
    prepare.prepare(corpus, tok_dir, SEQ, out, workers=2, **SMALL)  # idempotent: nothing to do
    assert "0 shards written now" in capsys.readouterr().out
    _same_output(ref, out)


def test_resume_after_a_simulated_crash_is_identical(corpus, tok_dir, ref, tmp_path, capsys):
    out = str(tmp_path / "crash")
    prepare.prepare(corpus, tok_dir, SEQ, out, workers=1, **SMALL)
    os.remove(os.path.join(out, rows.MANIFEST))
    os.remove(os.path.join(out, "shard-00001.json"))  # killed before its json: redone
    with open(os.path.join(out, "train-00003.array_record"), "r+b") as f:
        f.truncate(10)  # a shard file not of its recorded size: redone
    with open(os.path.join(out, ".tmp-train-00004.array_record.123"), "wb") as f:
        f.write(b"half")  # a half-written shard: removed
    prepare.prepare(corpus, tok_dir, SEQ, out, workers=1, **SMALL)
    assert "2 shards written now" in capsys.readouterr().out
    _same_output(ref, out)
    # Killed after copying the tokenizer, before writing the plan.
    early = tmp_path / "early"
    early.mkdir()
    tk.load_tokenizer(tok_dir).save(str(early / rows.TOKENIZER_DIR))
    prepare.prepare(corpus, tok_dir, SEQ, str(early), workers=1, **SMALL)
    _same_output(ref, str(early))


def test_kill9_mid_prepare_then_rerun_is_identical(corpus, tok_dir, ref, tmp_path):
    out = str(tmp_path / "kill")
    code = ("import sys; from mlm_vs_clm.data import prepare\n"
            "if __name__ == '__main__':\n"
            f"    prepare.prepare({corpus!r}, {tok_dir!r}, {SEQ}, {out!r}, workers=1, **{SMALL!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(out, "shard-00002.json")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(os.path.join(out, "shard-00002.json"))
    killed_early = not os.path.exists(os.path.join(out, rows.MANIFEST))
    prepare.prepare(corpus, tok_dir, SEQ, out, workers=1, **SMALL)
    _same_output(ref, out)
    if not killed_early:
        pytest.skip("the prepare finished before the kill (output still identical)")


def _config(ref, **kw):
    o = {"data.source": f"prepared:{ref}", "model.vocab_size": 384, "train.batch_size": 8, "train.seq_len": SEQ,
         "train.steps": 6, "train.log_every": 1, "train.eval_every": 3, "train.checkpoint_every": 3,
         "train.eval_batches": 1, "train.progress": False, "mesh.data": 1}
    o.update(kw)
    return load_config("configs/pretrain.py:tiny,clm", o)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_global_batch_is_the_same_for_1_and_2_processes_and_resumes_by_step(ref):
    config = _config(ref)
    one = _take(pipeline.train_iterator(config, None, 0, 1), 5)
    two = [_take(pipeline.train_iterator(config, None, p, 2), 5) for p in range(2)]
    for s in range(5):
        for k in pipeline.FEATURES:
            np.testing.assert_array_equal(one[s][k], np.concatenate([two[0][s][k], two[1][s][k]]))
    it = pipeline.train_iterator(config, None, 1, 2)
    _take(it, 3)
    assert it.get_state() == {"next_index": 3}  # the data position is the step
    resumed = pipeline.train_iterator(config, None, 0, 4)
    resumed.set_state({"next_index": 3})
    np.testing.assert_array_equal(next(resumed)["tokens"], one[3]["tokens"][:2])
    # Each epoch is a permutation of all rows: the first epoch reads every row once.
    corpus = prepared.Corpus(ref)
    mix, n = prepared.Mixture([(corpus, 1.0)], config.seed), len(corpus.train)
    first_epoch = sorted(mix[g]["tokens"].tobytes() for g in range(n))
    assert first_epoch == sorted(corpus.train[i]["tokens"].tobytes() for i in range(n))
    assert [mix[g]["tokens"].tobytes() for g in range(n, n + 20)] != [mix[g]["tokens"].tobytes() for g in range(20)]
    import grain

    shuffled = grain.MapDataset.range(n).shuffle(seed=5)
    assert [prepared.permuted_row(g, n, 5) for g in range(3 * n)] == [shuffled[g] % n for g in range(3 * n)]
    in_order = next(pipeline.train_iterator(_config(ref, **{"data.shuffle": False}), None))
    np.testing.assert_array_equal(in_order["tokens"], corpus.train.read(range(8))["tokens"])
    other_seed = next(pipeline.train_iterator(_config(ref, seed=1), None))
    assert not np.array_equal(other_seed["tokens"], one[0]["tokens"])


def test_mixture_is_deterministic_and_weighted(ref, tmp_path):
    config = _config(ref, **{"data.source": f"prepared:{ref}@0.7,prepared:{ref}@0.3"})
    mix = prepared.Mixture(prepared.open_corpora(config.data.source), 0)
    corpora = [mix.locate(g)[0] for g in range(2000)]
    assert corpora.count(0) == 1400 and corpora.count(1) == 600
    a, b = (_take(pipeline.train_iterator(config, None), 2) for _ in range(2))
    np.testing.assert_array_equal(a[1]["tokens"], b[1]["tokens"])
    with pytest.raises(ConfigError, match="prepared:DIR"):
        prepared.parse_spec(f"prepared:{ref}@x")


def test_training_on_prepared_rows_resumes_exactly(ref, tmp_path):
    import shutil

    import jax

    from mlm_vs_clm.train import train

    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    last = train(_config(ref), full, devices=jax.devices()[:1])
    shutil.copytree(full, split)  # as if the run had stopped after its step-3 checkpoint
    shutil.rmtree(os.path.join(split, "checkpoints", "6"))
    resumed = train(_config(ref), split, devices=jax.devices()[:1])
    assert resumed["loss"] == last["loss"] and resumed["val_mlm_loss"] == last["val_mlm_loss"]
    with open(os.path.join(full, "config.json")) as f:
        assert json.load(f)["data"]["source"] == f"prepared:{ref}"


def test_kill9_mid_training_on_prepared_rows_then_rerun_is_identical(ref, tmp_path):
    """`kill -9` of a CLI run on `prepared:` rows after its first checkpoint, then the same
    command again: every logged loss equals the uninterrupted run's (the data state is the step)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": REPO,
           "JAX_COMPILATION_CACHE_DIR": os.path.join(REPO, ".cache", "jax")}

    def flags(workdir):
        return ["--config=configs/pretrain.py:tiny,clm50_mlm40", f"--workdir={workdir}",
                f"--config.data.source=prepared:{ref}", "--config.model.vocab_size=384",
                "--config.train.batch_size=8", f"--config.train.seq_len={SEQ}", "--config.train.steps=12",
                "--config.train.log_every=1", "--config.train.eval_every=6", "--config.train.checkpoint_every=4",
                "--config.train.eval_batches=1", "--config.train.progress=False"]

    def start(workdir):
        return subprocess.Popen([sys.executable, "-m", "mlm_vs_clm.train", *flags(workdir)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def records(workdir):
        path = os.path.join(workdir, "metrics.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(x) for x in f if x.strip().endswith("}")]

    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    out, err = start(full).communicate(timeout=300)
    assert "done: step 12" in out, err[-2000:]
    proc = start(killed)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(os.path.join(killed, "checkpoints", "4")) and any(r.get("step", 0) >= 6
                                                                           for r in records(killed)):
            break
        time.sleep(0.05)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    rerun = start(killed)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and "resumed from step" in out, err[-2000:]
    want, got = records(full), records(killed)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got):
        assert all(a.get(k) == b.get(k) for k in ("loss", "val_mlm_loss", "val_clm_loss", "objective")), (a, b)


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_errors_are_one_line_naming_the_file(ref, tok_dir, corpus, tmp_path, capsys):
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copytree(ref, bad)
    os.remove(os.path.join(bad, "train-00002.array_record"))
    with pytest.raises(prepared.PreparedError) as e:
        prepared.Corpus(bad)
    assert "train-00002.array_record" in _one_line(e) and "missing" in str(e.value)
    shutil.copy(os.path.join(ref, "train-00002.array_record"), bad)
    with open(os.path.join(bad, "train-00002.array_record"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(prepared.PreparedError) as e:
        prepared.Corpus(bad)
    assert "train-00002.array_record" in _one_line(e) and "corrupt" in str(e.value)
    with open(os.path.join(bad, rows.MANIFEST), "w") as f:
        f.write("{not json")
    with pytest.raises(prepared.PreparedError) as e:
        prepared.Corpus(bad)
    assert rows.MANIFEST in _one_line(e)
    os.remove(os.path.join(bad, rows.MANIFEST))
    with pytest.raises(prepared.PreparedError) as e:
        prepared.Corpus(bad)
    assert rows.MANIFEST in _one_line(e)

    # A run whose tokenizer differs from the manifest's names both.
    other = str(tmp_path / "othertok")
    tk.train_tokenizer(["another text entirely, " * 50, "with other words"] * 20, vocab_size=280,
                       model_type="bpe", out_dir=other)
    with pytest.raises(prepared.PreparedError) as e:
        pipeline.prepare_tokenizer(_config(ref, **{"data.tokenizer": other}), None)
    assert other in _one_line(e) and os.path.join(ref, "tokenizer") in str(e.value)
    with pytest.raises(ConfigError, match="train.seq_len"):
        pipeline.train_iterator(_config(ref, **{"train.seq_len": 64}), None)

    # The command: one line on stderr, exit 2.
    proc = run_command("data.prepare", [f"--source={tmp_path}/nothing*.txt", f"--tokenizer={tok_dir}",
                                         "--seq_len=32", f"--out={tmp_path}/o1"])
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and "matches no files" in err, err
    proc = run_command("data.prepare", [f"--source={corpus}", f"--tokenizer={tok_dir}", "--seq_len=64", f"--out={ref}"])
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and "seq_len" in err and ref in err, err


# -- --runner=beam: the same per-shard function on Apache Beam (the [beam] extra) ----------------

HAS_BEAM = importlib.util.find_spec("apache_beam") is not None


def _direct_runner(tmp_path):
    """Beam's DirectRunner runs a pipeline on Prism, downloading Prism's binary where it has none;
    a missing local --prism_location makes it fall back to its in-process runner at once, so
    the test touches no network."""
    return f"--runner=DirectRunner --prism_location={tmp_path / 'no-prism'}"


@pytest.mark.skipif(not HAS_BEAM, reason="apache_beam is not installed (the [beam] extra, in an environment of "
                    "its own: docs/data.md)")
def test_beam_runner_equals_the_local_runner_and_reruns_only_a_lost_shard(corpus, tok_dir, tmp_path, capsys):
    small = {k: v for k, v in SMALL.items() if k != "jsonl_piece_bytes"}  # settings the command takes
    local, out = str(tmp_path / "local"), str(tmp_path / "beam")
    prepare.prepare(corpus, tok_dir, SEQ, local, workers=1, **small)
    prepare.prepare(corpus, tok_dir, SEQ, out, runner="beam", beam_options=_direct_runner(tmp_path), **small)
    assert "Beam DirectRunner" in capsys.readouterr().out
    with open(os.path.join(out, prepare.PLAN)) as f:
        assert len(json.load(f)["shards"]) > 5
    _same_output(local, out)  # manifest, plan and every shard file byte for byte
    for name in prepare.shard_names(3):
        os.remove(os.path.join(out, name))
    kept = {f: os.stat(os.path.join(out, f)) for f in _files(out) if f != rows.MANIFEST}
    proc = run_command("data.prepare", [f"--source={corpus}", f"--tokenizer={tok_dir}", f"--seq_len={SEQ}",
                                         f"--out={out}", "--runner=beam", f"--beam_options={_direct_runner(tmp_path)}",
                                         *(f"--{k}={v}" for k, v in small.items() if k != "progress")],
                      timeout=600)
    assert proc.returncode == 0 and "1 shards written now" in proc.stdout, proc.stderr[-3000:]
    for f, st in kept.items():  # the other shards were not rewritten
        now = os.stat(os.path.join(out, f))
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f
    _same_output(local, out)
    os.remove(os.path.join(out, prepare.shard_names(5)[0]))  # the local runner finishes a Beam prepare
    prepare.prepare(corpus, tok_dir, SEQ, out, workers=1, **small)
    assert "1 shards written now" in capsys.readouterr().out
    _same_output(local, out)


@pytest.mark.skipif(HAS_BEAM, reason="apache_beam is installed: this checks the message given without it")
def test_runner_beam_without_apache_beam_says_how_to_install_it(corpus, tok_dir, tmp_path):
    out = str(tmp_path / "nobeam")
    proc = run_command("data.prepare", [f"--source={corpus}", f"--tokenizer={tok_dir}", f"--seq_len={SEQ}",
                                         f"--out={out}", "--runner=beam"])
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and "pip install -e '.[beam]'" in err, err
    assert not os.path.exists(out)  # refused before writing anything
