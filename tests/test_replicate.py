"""`make replicate` at smoke scale end to end, and the verdict rules of its report."""

import os
import re
import subprocess
import sys

import numpy as np

from mlm_vs_clm import replication_report as rr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
       "JAX_COMPILATION_CACHE_DIR": os.path.join(REPO, ".cache", "jax")}


def test_verdict_rules():
    assert rr.verdict((60.0, 1.0), (55.0, 1.0))[2] == "agrees"  # margin 5 > spread 1.41
    assert rr.verdict((55.0, 1.0), (60.0, 1.0))[2] == "disagrees"
    margin, spread, v = rr.verdict((60.0, 3.0), (58.0, 4.0))
    assert (margin, spread, v) == (2.0, 5.0, "cannot tell")
    assert rr.verdict((float("nan"), 0.0), (1.0, 0.0))[2].startswith("cannot tell")


def _runs(checkpoint, scores_by_task, lr=1e-3):
    return [{"checkpoint": checkpoint, "task": t, "lr": lr, "seed": s, "test": v, "best_validation": v,
             "diverged": False, "metric": "accuracy"} for t, vs in scores_by_task.items() for s, v in enumerate(vs)]


def test_seed_scores_pick_the_best_learning_rate_per_task():
    runs = (_runs("a", {"t1": [50, 52], "t2": [10, 12]}, lr=1e-3)
            + _runs("a", {"t1": [70, 74], "t2": [5, 7]}, lr=3e-3))
    # t1 is best at 3e-3, t2 at 1e-3: seed 0 -> (70 + 10) / 2, seed 1 -> (74 + 12) / 2
    assert rr.seed_scores(runs, "a") == {0: 40.0, 1: 43.0}
    assert rr.score(runs, "a") == (41.5, float(np.std([40.0, 43.0], ddof=1)))


def test_stability_verdict_uses_the_spread_across_runs():
    rng = np.random.default_rng(0)
    calm = _runs("clm", {"t": list(50 + rng.normal(0, 0.5, 30))})
    wild = _runs("mlm", {"t": list(50 + rng.normal(0, 8.0, 30))})
    assert rr.stability_verdict(calm + wild, "clm", "mlm")[3] == "agrees"
    assert rr.stability_verdict(calm + wild, "mlm", "clm")[3] == "disagrees"
    same = _runs("mlm", {"t": [r["test"] + 3.0 for r in calm]})  # the same spread around another mean
    assert rr.stability_verdict(calm + same, "clm", "mlm")[3] == "cannot tell"


def test_replicate_smoke_end_to_end(tmp_path):
    workdir, report_dir = tmp_path / "runs", tmp_path / "report"
    cmd = [sys.executable, "-m", "mlm_vs_clm.replicate", "--scale=smoke", f"--workdir={workdir}",
           f"--report_dir={report_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (report_dir / "REPORT.md").read_text()
    verdicts = re.findall(r"\| \*\*(agrees|disagrees|cannot tell[^*]*)\*\* \|", text)
    assert len(verdicts) == 5, text
    for png in ("data_efficiency.png", "split_ratio.png", "stability.png"):
        assert (report_dir / png).stat().st_size > 1000
        assert f"({png})" in text
    # every final checkpoint (5 schedules + 2 CPT runs) was fine-tuned on the grid: 2 LRs x 3 seeds
    import json

    with open(workdir / "finetune_final" / "results.json") as f:
        runs = json.load(f)["runs"]
    assert len(runs) == 7 * 2 * 3
    with open(workdir / "finetune_intermediate" / "results.json") as f:
        assert len(json.load(f)["runs"]) == 6 * 1 * 3
    # the biphasic runs branched from the CLM run; the CPT runs started from the final checkpoints
    log = (workdir / "pretrain" / "runs" / "tiny_20_clm50_mlm40_s0" / "train.log").read_text()
    assert "resumed from step 10;" in log
    cpt_log = (workdir / "cpt" / "from_clm" / "train.log").read_text()
    assert "initialised from" in cpt_log and "tiny_20_clm_s0" in cpt_log
    # a rerun does nothing but rewrite the report
    again = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "5 of 5 runs already done" in again.stdout
