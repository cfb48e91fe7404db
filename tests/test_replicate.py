"""`make replicate` at smoke scale end to end, and the verdict rules of its report."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mlm_vs_clm import stats
from mlm_vs_clm.replicate import report as rr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
       "JAX_COMPILATION_CACHE_DIR": os.path.join(REPO, ".cache", "jax")}


def test_findings_are_tested_paired_by_pretraining_seed_with_holm_and_flop_ratios():
    rng = np.random.default_rng(0)
    final, middle = [], []
    runs, cpt, mids = {}, {}, {}
    base = {"mlm40": 60.0, "clm": 50.0, "clm25_mlm40": 61.0, "clm50_mlm40": 70.0, "clm75_mlm40": 62.0}
    for seed in range(3):
        noise = rng.normal(0, 2.0)  # a pretraining seed's effect, shared by every schedule (paired)
        for n, b in base.items():
            ckpt = f"{n}_s{seed}"
            runs.setdefault(n, {})[seed] = ckpt
            final += _runs(ckpt, {"t": [b + noise + rng.normal(0, 0.1)]})
        for n, b in (("clm", 40.0), ("mlm40", 30.0)):
            cpt.setdefault(n, {})[seed] = f"cpt_{n}_s{seed}"
            final += _runs(f"cpt_{n}_s{seed}", {"t": [b + noise + rng.normal(0, 0.1)]})
            mids.setdefault("clm" if n == "clm" else "mlm40", {})[seed] = [f"mid_{n}_{seed}_{i}" for i in range(3)]
            middle += _runs(f"mid_{n}_{seed}_0", {"t": [b + rng.normal(0, 0.1)]})
    pre = {(n, s): {"flops": str(2.0 if n == "clm" else 1.0 + 0.25 * ("clm" in n))} for n in base for s in range(3)}
    found = rr.findings(final, middle, runs, cpt, mids, pre, steps=100, cpt_steps=50)
    by = {f["comparison"].split(",")[0].split(" (")[0]: f for f in found}
    assert [f["test"].name for f in found] == ["paired t", "paired t", "Levene", "Fisher exact", "paired t", "paired t"]
    assert by["MLM-40 - CLM"]["verdict"] == "agrees" and by["MLM-40 - CLM"]["flops"] == 0.5
    assert found[4]["split"] == "clm50_mlm40" and found[4]["verdict"] == "agrees"  # picked on validation
    assert found[4]["flops"] == 1.25
    assert found[5]["flops"] == pytest.approx((2.0 + 0.5) / (1.0 + 0.5))  # pretraining + the same CPT
    assert [f["p_holm"] for f in found if np.isfinite(f["p_holm"])] == pytest.approx(
        [q for q in stats.holm([f["test"].p for f in found]) if np.isfinite(q)])
    # one pretraining seed: no test anywhere, `cannot tell`
    one = {n: {0: d[0]} for n, d in runs.items()}
    found = rr.findings(final, middle, one, {n: {0: d[0]} for n, d in cpt.items()},
                        {n: {0: d[0]} for n, d in mids.items()}, pre, steps=100, cpt_steps=50)
    assert all(f["verdict"].startswith("cannot tell") for f in found if f["test"].name == "paired t")


def _runs(checkpoint, scores_by_task, lr=1e-3):
    return [{"checkpoint": checkpoint, "task": t, "lr": lr, "seed": s, "test": v, "best_validation": v,
             "diverged": False, "metric": "accuracy"} for t, vs in scores_by_task.items() for s, v in enumerate(vs)]


def test_seed_scores_pick_the_best_learning_rate_per_task():
    runs = (_runs("a", {"t1": [50, 52], "t2": [10, 12]}, lr=1e-3)
            + _runs("a", {"t1": [70, 74], "t2": [5, 7]}, lr=3e-3))
    # t1 is best at 3e-3, t2 at 1e-3: seed 0 -> (70 + 10) / 2, seed 1 -> (74 + 12) / 2
    assert rr.seed_scores(runs, "a") == {0: 40.0, 1: 43.0}
    assert rr.score(runs, "a") == (41.5, float(np.std([40.0, 43.0], ddof=1)))


def test_verdict_score_uses_the_tables_learning_rate_and_counts_a_failed_seed():
    from mlm_vs_clm.finetune import report

    failed = _runs("a", {"t1": [80, 82, None]}, lr=1e-3)
    runs = failed + _runs("a", {"t1": [70, 71, 72]}, lr=3e-4) + _runs("a", {"t2": [20, 21, 22]})
    # 1e-3 wins on its two survivors (81) but has a failed seed: the table picks 3e-4 for t1
    table = {row["task"]: row for row in report.summarize(runs)}
    assert table["t1"]["best_lr"] == 3e-4
    assert rr.seed_scores(runs, "a") == {0: 45.0, 1: 46.0, 2: 47.0}
    assert rr.score(runs, "a")[0] == np.mean([table["t1"]["test_mean"], table["t2"]["test_mean"]]) == 46.0
    # a seed without a score at the chosen rate has no score, rather than the mean of fewer tasks
    runs = _runs("a", {"t1": [80, 82, None]}) + _runs("a", {"t2": [20, 21, 22]})
    seeds = rr.seed_scores(runs, "a")
    assert (seeds[0], seeds[1]) == (50.0, 51.5) and np.isnan(seeds[2])
    assert rr.score(runs, "a") == (50.75, float(np.std([50.0, 51.5], ddof=1)))
    assert rr._seeds_note(runs, "a") == " (2 of 3 seeds)"


def test_stability_is_tested_on_the_spread_and_the_divergence_counts():
    rng = np.random.default_rng(0)
    calm = _runs("clm", {"t": list(50 + rng.normal(0, 0.5, 30))})
    wild = _runs("mlm", {"t": list(50 + rng.normal(0, 8.0, 30))})
    t = stats.levene(rr.centered_scores(calm + wild, "mlm"), rr.centered_scores(calm + wild, "clm"))
    assert t.p < 0.05 and t.diff > 0
    for r in wild[:12]:
        r["diverged"] = True
    assert rr.diverged(calm + wild, ["mlm"]) == (12, 30)
    assert stats.fisher(*rr.diverged(calm + wild, ["mlm"]), *rr.diverged(calm + wild, ["clm"])).p < 0.001


def test_output_dirs_keep_other_scales_out_of_the_committed_report(tmp_path, monkeypatch):
    from mlm_vs_clm import replicate, train  # noqa: F401 - train first: replicate defines no flags on import

    monkeypatch.chdir(tmp_path)
    assert replicate.output_dirs("full") == (str(tmp_path / "replication_runs"), str(tmp_path / "replication"))
    assert replicate.output_dirs("smoke") == (str(tmp_path / "replication_runs_smoke"),
                                              str(tmp_path / "replication_runs_smoke" / "report"))
    assert replicate.output_dirs("smoke", "w") == (str(tmp_path / "w"), str(tmp_path / "w" / "report"))
    assert replicate.output_dirs("smoke", "w", "replication")[1] == str(tmp_path / "replication")  # asked for


def test_cpt_runs_made_from_another_source_or_for_other_steps_are_refused(tmp_path):
    from mlm_vs_clm import replicate, train  # noqa: F401 - train first: replicate defines no flags on import

    scale = dict(replicate.SCALES["full"])
    sources = {(n, 0): str(tmp_path / "pretrain" / n) for n in ("clm", "mlm40")}
    for n in sources:
        (tmp_path / "pretrain" / n[0] / "checkpoints" / "1500" / "state").mkdir(parents=True)
    made = {n: {"source": os.path.join(sources[n], "checkpoints", "1500"), "steps": 500} for n in sources}
    for n in sources:
        (tmp_path / "cpt" / f"from_{n[0]}_s0").mkdir(parents=True)
        (tmp_path / "cpt" / f"from_{n[0]}_s0" / "done.json").write_text(json.dumps(made[n]))
    assert replicate.run_cpt(str(tmp_path), scale, sources) == {
        n: str(tmp_path / "cpt" / f"from_{n[0]}_s0") for n in sources}  # done: nothing is trained
    scale["cpt_steps"] = 8  # e.g. the smoke scale's continuation in a full scale's workdir
    with pytest.raises(RuntimeError, match="for 500 steps, not from .* for 8 steps: use another --workdir"):
        replicate.run_cpt(str(tmp_path), scale, sources)
    (tmp_path / "cpt" / "from_clm_s0" / "done.json").write_text(json.dumps({"val_mlm_loss": 5.0}))  # older
    with pytest.raises(RuntimeError, match=r"made from \(unrecorded\) for \(unrecorded\) steps"):
        replicate.run_cpt(str(tmp_path), replicate.SCALES["full"], sources)


def test_replicate_smoke_end_to_end(tmp_path):
    workdir, report_dir = tmp_path / "runs", tmp_path / "report"
    cmd = [sys.executable, "-m", "mlm_vs_clm.replicate", "--scale=smoke", f"--workdir={workdir}",
           f"--report_dir={report_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (report_dir / "REPORT.md").read_text()
    verdicts = re.findall(r"\| \*\*(agrees|disagrees|cannot tell[^*]*)\*\* \|", text)
    assert len(verdicts) == 6, text
    assert "3 pretraining seeds per schedule" in text and "Holm-corrected over the 6 tests at alpha = 0.05" in text
    assert "| 1. MLM gives the best representations | MLM-40 - CLM, final | paired t | 3 |" in text
    assert "| 3. CLM-then-MLM beats MLM at equal steps and tokens |" in text
    for png in ("data_efficiency.png", "split_ratio.png", "stability.png"):
        assert (report_dir / png).stat().st_size > 1000
        assert f"({png})" in text
    # every final checkpoint ((5 schedules + 2 CPT runs) x 3 pretraining seeds) was fine-tuned: 2 LRs x 1 seed
    with open(workdir / "finetune_final" / "results.json") as f:
        runs = json.load(f)["runs"]
    assert len(runs) == 7 * 3 * 2 * 1
    with open(workdir / "finetune_intermediate" / "results.json") as f:
        assert len(json.load(f)["runs"]) == 6 * 3 * 1 * 1
    # the biphasic runs branched from the CLM run of their seed; the CPT runs started from the final checkpoints
    log = (workdir / "pretrain" / "runs" / "tiny_20_clm50_mlm40_s2" / "train.log").read_text()
    assert "resumed from step 10;" in log
    cpt_log = (workdir / "cpt" / "from_clm_s1" / "train.log").read_text()
    assert "initialised from" in cpt_log and "tiny_20_clm_s1" in cpt_log
    done = json.loads((workdir / "cpt" / "from_clm_s1" / "done.json").read_text())
    assert done["steps"] == 8 and done["source"].endswith(os.path.join("tiny_20_clm_s1", "checkpoints", "20"))
    # the pretraining seeds share the data order and differ in initialisation and masks
    configs = [json.loads((workdir / "pretrain" / "runs" / f"tiny_20_mlm40_s{s}" / "config.json").read_text())
               for s in range(3)]
    assert [c["seed"] for c in configs] == [0, 1, 2] and all(c["data"]["seed"] == 0 for c in configs)
    losses = [json.loads(ln)["loss"] for s in range(2) for ln in
              (workdir / "pretrain" / "runs" / f"tiny_20_mlm40_s{s}" / "metrics.jsonl").read_text().splitlines()[:1]]
    assert losses[0] != losses[1]
    # a rerun does nothing but rewrite the report
    again = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "15 of 15 runs already done" in again.stdout
