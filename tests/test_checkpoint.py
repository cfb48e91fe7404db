"""Checkpoints, exact resume, continuation, failure handling (train loop in-process and CLI)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mlm_vs_clm import checkpoint as ckpt_lib
from mlm_vs_clm import sharding, train_state
from mlm_vs_clm.config import ConfigError, load_config, validate
from mlm_vs_clm.data import pipeline
from mlm_vs_clm.train import TrainingError, train
from tests.helpers import write_word_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus"))


def _config(corpus, objective="clm50_mlm40", **kw):
    o = {"data.source": corpus, "data.tokenizer_vocab_size": 384, "model.vocab_size": 384,
         "train.batch_size": 8, "train.seq_len": 32, "train.steps": 12, "train.log_every": 1,
         "train.eval_every": 6, "train.checkpoint_every": 4, "train.eval_batches": 1, "train.progress": False,
         "mesh.data": 1}
    o.update(kw)
    return load_config(f"configs/pretrain.py:tiny,{objective}", o)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f if x.strip()]


def _params(workdir):
    return jax.tree.map(np.asarray, ckpt_lib.load_checkpoint(workdir).params)


def _cli(args, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "JAX_COMPILATION_CACHE_DIR": os.path.join(REPO, ".cache", "jax")}
    return subprocess.Popen([sys.executable, "-m", "mlm_vs_clm.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _cli_flags(corpus, workdir, steps=12):
    return ["--config=configs/pretrain.py:tiny,clm50_mlm40", f"--workdir={workdir}",
            f"--config.data.source={corpus}", "--config.data.tokenizer_vocab_size=384",
            "--config.model.vocab_size=384", "--config.train.batch_size=8", "--config.train.seq_len=32",
            f"--config.train.steps={steps}", "--config.train.log_every=1", "--config.train.eval_every=6",
            "--config.train.checkpoint_every=4", "--config.train.eval_batches=1", "--config.train.progress=False"]


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ref"))
    train(_config(corpus), workdir, devices=jax.devices()[:1])
    return workdir


@pytest.fixture(scope="module")
def cli_reference_run(corpus, tmp_path_factory):
    """The uninterrupted run, through the CLI like the interrupted one (same XLA environment)."""
    workdir = str(tmp_path_factory.mktemp("cliref"))
    out, err = _cli(_cli_flags(corpus, workdir)).communicate(timeout=300)
    assert "done: step 12" in out, err[-2000:]
    return workdir


def test_kill9_then_resume_is_identical(corpus, cli_reference_run, tmp_path):
    reference_run = cli_reference_run
    workdir = str(tmp_path / "run")
    proc = _cli(_cli_flags(corpus, workdir))
    kill_at = random.Random().randint(5, 10)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        path = os.path.join(workdir, "metrics.jsonl")
        finalized = os.path.isdir(os.path.join(workdir, "checkpoints", "4"))  # orbax renames when complete
        if finalized and os.path.exists(path) and any(r.get("step", 0) >= kill_at for r in _records(workdir)):
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    rerun = _cli(_cli_flags(corpus, workdir))
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert "resumed from step" in out
    ref, got = _records(reference_run), _records(workdir)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for k in ("loss", "val_mlm_loss", "val_clm_loss", "objective"):
            assert a.get(k) == b.get(k), (a, b)
    jax.tree.map(np.testing.assert_array_equal, _params(reference_run), _params(workdir))


def test_sigterm_saves_the_current_step(corpus, tmp_path):
    workdir = str(tmp_path / "run")
    proc = _cli(_cli_flags(corpus, workdir, steps=400))
    deadline = time.time() + 240
    while time.time() < deadline:
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(path) and any(r.get("step", 0) >= 5 for r in _records(workdir)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "preempted: checkpoint saved at step" in out
    saved = int(out.split("preempted: checkpoint saved at step")[1].split()[0])
    steps = ckpt_lib.Checkpointer(workdir).steps()
    assert saved == max(steps) and saved < 400
    model = ckpt_lib.load_checkpoint(os.path.join(workdir, "checkpoints", str(saved)))
    assert np.isfinite(model.logits([[5, 6, 7]])).all()


def test_truncated_newest_checkpoint_falls_back(corpus, reference_run, tmp_path):
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(reference_run, workdir)
    newest = os.path.join(workdir, "checkpoints", "12", "state")
    biggest = max((os.path.join(r, f) for r, _, fs in os.walk(newest) for f in fs), key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 3)
    config = _config(corpus)
    setup = train_state.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    step, state = ckpt_lib.Checkpointer(workdir).restore_latest(setup.abstract_state)
    assert step == 8 and int(state.step) == 8
    assert os.listdir(os.path.join(workdir, "checkpoints_corrupt"))  # moved aside, not deleted
    # and a rerun of the run resumes from 8 and reproduces the reference exactly
    train(_config(corpus), workdir, devices=jax.devices()[:1])
    jax.tree.map(np.testing.assert_array_equal, _params(reference_run), _params(workdir))


def _tree_files(root):
    return sorted(os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs)


def test_resume_with_another_architecture_stops_and_keeps_every_checkpoint(corpus, reference_run, tmp_path):
    # A resume under a config whose parameters do not fit the checkpoints (here a wider model)
    # is the user's mistake, not corruption: one error naming the difference, nothing moved
    # aside, no metric record rewritten.
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(reference_run, workdir)
    before = _tree_files(workdir)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"model\.hidden_size is 64 there, 128 here") as e:
        train(_config(corpus, **{"model.hidden_size": 128, "train.steps": 16}), workdir, devices=jax.devices()[:1])
    assert "\n" not in str(e.value)
    after = [f for f in _tree_files(workdir) if f != "config.json"]  # rewritten at start-up, as before
    assert after == [f for f in before if f != "config.json"] and not os.path.exists(
        os.path.join(workdir, "checkpoints_corrupt"))
    assert _records(workdir) == _records(reference_run)
    # the unrolled layout of the same model has other parameter names: named too
    config = _config(corpus, **{"model.scan_layers": False})
    setup = train_state.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"model\.scan_layers is True there, False here"):
        ckpt_lib.Checkpointer(workdir).restore_latest(setup.abstract_state, config=config)


def test_data_state_that_does_not_fit_stops_the_resume(corpus, reference_run, tmp_path):
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(reference_run, workdir)
    with open(os.path.join(workdir, "checkpoints", "12", "data", "process_0-of-1.json"), "w") as f:
        json.dump({"a_pipeline_we_do_not_have": 1}, f)
    before = _tree_files(workdir)
    config = _config(corpus)
    setup = train_state.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    data_iter = pipeline.train_iterator(config, pipeline.prepare_tokenizer(config, workdir), 0, 1)
    with pytest.raises(ckpt_lib.CheckpointError, match="data iterator's saved state does not fit"):
        ckpt_lib.Checkpointer(workdir).restore_latest(setup.abstract_state, data_iter, config=config)
    assert _tree_files(workdir) == before


def test_restore_on_another_mesh(corpus, reference_run):
    for devices, mesh in ((8, (2, 2, 2)), (8, (8, 1, 1)), (1, (1, 1, 1))):
        config = _config(corpus, **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
        setup = train_state.build(config, sharding.make_mesh(config.mesh, jax.devices()[:devices]))
        step, state = ckpt_lib.Checkpointer(reference_run).restore_latest(setup.abstract_state)
        assert step == 12
        q = state.params["encoder"]["layers"]["q_proj"]["kernel"]
        assert len(q.sharding.device_set) == devices
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), _params(reference_run))


def test_init_from_clm_run_gives_fresh_optimizer(corpus, reference_run, tmp_path):
    config = _config(corpus, "mlm40", init_from=reference_run, **{"train.steps": 2})
    config.init_from = reference_run
    setup = train_state.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    from mlm_vs_clm.train import initial_state

    state, start, how = initial_state(setup, ckpt_lib.Checkpointer(str(tmp_path / "new")), None, config)
    assert start == 0 and int(state.step) == 0 and "initialised from" in how
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), _params(reference_run))
    mu = state.opt_state[1][0].mu
    assert all(float(np.abs(x).max()) == 0.0 for x in jax.tree.leaves(mu))


def test_init_from_takes_the_source_architecture(corpus, reference_run, tmp_path, capsys):
    config = _config(corpus, "mlm40", **{"model.ffn_size": 96, "train.steps": 2, "train.eval_every": 2})
    config.init_from = reference_run
    train(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert "init_from: using the source checkpoint's model.ffn_size=192" in capsys.readouterr().out
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["model"]["ffn_size"] == 192
    config = _config(corpus, "mlm40", **{"model.ffn_size": 96, "train.steps": 2})
    config.init_from, config.init_from_architecture = reference_run, False
    with pytest.raises(ckpt_lib.CheckpointError, match="gate_proj"):
        train(config, str(tmp_path / "own"), devices=jax.devices()[:1])


def test_continuation_resumes_after_its_source_moved(corpus, reference_run, tmp_path, capsys):
    # Once a continuation run has checkpoints of its own, resuming it needs neither its init_from
    # source nor the source's architecture (which it adopted, and saved with its checkpoints).
    import shutil

    source = str(tmp_path / "source")
    shutil.copytree(reference_run, source)
    workdir = str(tmp_path / "run")
    settings = {"model.ffn_size": 96, "train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2}
    config = _config(corpus, "mlm40", **settings)
    config.init_from = source
    train(config, workdir, devices=jax.devices()[:1])
    os.rename(source, source + "_moved")
    config = _config(corpus, "mlm40", **{**settings, "train.steps": 4})
    config.init_from = source
    capsys.readouterr()
    train(config, workdir, devices=jax.devices()[:1])
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and "resume: using the run checkpoint's model.ffn_size=192" in out
    assert ckpt_lib.Checkpointer(workdir).steps()[-1] == 4


def test_init_from_mismatch_is_a_clear_error(corpus, reference_run, tmp_path):
    config = _config(corpus, "mlm40", **{"model.ffn_size": 96})
    config.init_from = reference_run
    setup = train_state.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    with pytest.raises(ckpt_lib.CheckpointError, match="gate_proj"):
        ckpt_lib.load_params(reference_run, setup.abstract_state.params)


def test_non_finite_steps_are_skipped_then_stop(corpus, tmp_path, monkeypatch):
    """Batches with an out-of-range token give NaN losses from step 6 on."""
    from mlm_vs_clm import train as train_mod

    real, vocab, calls = train_mod._to_global, 384, []

    def poisoned(batch, mesh):
        if batch["tokens"].shape[0] == 8:  # training batches (validation batches are built first)
            calls.append(1)
            if len(calls) > 6:
                batch = dict(batch, tokens=np.full_like(batch["tokens"], vocab + 50))
        return real(batch, mesh)

    monkeypatch.setattr(train_mod, "_to_global", poisoned)
    workdir = str(tmp_path / "run")
    config = _config(corpus, **{"train.steps": 40, "train.max_bad_steps": 3, "train.eval_every": 100,
                                "train.eval_batches": 1})
    with pytest.raises(TrainingError, match="consecutive non-finite"):
        train(config, workdir, devices=jax.devices()[:1])
    recs = _records(workdir)
    assert recs[-1]["skipped_steps"] >= 1
    assert max(ckpt_lib.Checkpointer(workdir).steps()) == 4  # the last checkpoint before the bad streak
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(workdir)))


@pytest.mark.parametrize("key,value,message", [
    ("mlm.mask_ratio", 1.5, "mlm.mask_ratio"),
    ("model.num_heads", 3, "model.num_heads"),
    ("model.num_kv_heads", 3, "model.num_kv_heads"),
    ("mesh.fsdp", 3, "mesh"),
    ("train.batch_size", 7, "train.batch_size"),
    ("objective", "clm+mlm40@500", "not before the end"),
    ("objective", "bogus", "objective"),
    ("init_from", "/nonexistent/run", "init_from"),
    ("model.attention_impl", "flash", "model.attention_impl"),
    ("model.attention_max_segments", 1, "model.attention_max_segments"),
    ("train.max_bad_steps", 0, "train.max_bad_steps"),
    ("train.eval_batches", 0, "train.eval_batches"),
    ("train.keep", 0, "train.keep"),
    ("optimizer.decay_fraction", 0.98, "optimizer.decay_fraction"),
    ("train.batch_size", 0, "train.batch_size: must be positive"),
    ("model.rope_scaling", "yarn", "model.rope_scaling"),
    ("tokens.special_ids", tuple(range(4096)), "tokens.special_ids"),
])
def test_invalid_configs_are_named(key, value, message):
    config = load_config("configs/pretrain.py:tiny", {key: value, "train.batch_size": 8} if key != "train.batch_size"
                         else {key: value, "mesh.data": 2})
    with pytest.raises(ConfigError, match=message):
        validate(config, 2 if key == "train.batch_size" else 1)


@pytest.mark.parametrize("flags_,message", [
    (["--config=configs/pretrain.py:huge"], "huge"),
    (["--config=configs/pretrain.py:tiny", "--config.mlm.mask_ratio=0"], "mlm.mask_ratio"),
    (["--config=configs/pretrain.py:tiny", "--config.no_such_key=1"], "no_such_key"),
])
def test_cli_rejects_bad_config_with_status_2(flags_, message, tmp_path):
    proc = _cli([*flags_, f"--workdir={tmp_path}"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_load_checkpoint_logits_match_training_model(reference_run):
    from mlm_vs_clm.model import LanguageModel

    m = ckpt_lib.load_checkpoint(reference_run)
    assert m.tokenizer is not None and m.tokenizer.encode("the bank")
    tokens = np.asarray([m.tokenizer.encode("the team won the game")], np.int32)
    for mode in ("causal", "bidirectional"):
        got = m.logits(tokens, mask_mode=mode)
        L = tokens.shape[1]
        ref = LanguageModel(m.model_config).apply(
            {"params": m.params}, tokens, np.ones_like(tokens), np.arange(L)[None], mode)
        np.testing.assert_allclose(got, np.asarray(ref, np.float32), atol=1e-5)
        assert got.shape == (1, L, m.config.model.vocab_size) and got.dtype == np.float32


def test_keep_steps_survive_retention(corpus, tmp_path):
    workdir = str(tmp_path / "run")
    config = _config(corpus, **{"train.keep": 1, "train.keep_steps": (4,), "train.eval_every": 100})
    train(config, workdir, devices=jax.devices()[:1])
    assert ckpt_lib.Checkpointer(workdir).steps() == [4, 12]


def test_init_from_allow_missing_initialises_the_rest(corpus, reference_run, tmp_path):
    """A params-only checkpoint without the head: allowed, the head is fresh, the rest restored."""
    full = ckpt_lib.load_checkpoint(reference_run)
    partial = {"encoder": full.params["encoder"]}
    src = str(tmp_path / "encoder_only")
    ckpt_lib.save_params_checkpoint(src, full.config, partial)
    config = _config(corpus, "mlm40", **{"train.steps": 2})
    config.init_from = src
    setup = train_state.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    from mlm_vs_clm.train import initial_state

    with pytest.raises(ckpt_lib.CheckpointError, match="lm_head"):
        initial_state(setup, ckpt_lib.Checkpointer(str(tmp_path / "a")), None, config)
    config.init_from_allow_missing = True
    state, _, _ = initial_state(setup, ckpt_lib.Checkpointer(str(tmp_path / "b")), None, config)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params["encoder"]),
                 jax.tree.map(np.asarray, full.params["encoder"]))
    head, full_head = np.asarray(state.params["lm_head"]["kernel"]), np.asarray(full.params["lm_head"]["kernel"])
    assert np.abs(head - full_head).max() > 0


def test_train_takes_every_special_id_from_the_tokenizer():
    # A Hugging Face tokenizer numbers its special tokens its own way (BERT: [PAD]=0, [UNK]=100,
    # [CLS]=101, [SEP]=102, [MASK]=103): the run uses its ids, with no tokens.* flags.
    import types

    from mlm_vs_clm.train import _apply_tokenizer

    config = load_config("configs/pretrain.py:tiny")
    tokenizer = types.SimpleNamespace(vocab_size=3000, pad_id=0, unk_id=100, bos_id=101, eos_id=102, mask_id=103,
                                      special_ids=(0, 100, 101, 102, 103))
    _apply_tokenizer(config, tokenizer)
    t = config.tokens
    assert (t.pad_id, t.unk_id, t.bos_id, t.eos_id, t.mask_id) == (0, 100, 101, 102, 103)
    assert tuple(t.special_ids) == (0, 100, 101, 102, 103)
    validate(config, 1)
