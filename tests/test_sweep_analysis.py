"""Sweep analysis: the scaling-law fit recovers known parameters, its frontier is optimal, and
`analyze` on synthetic tables names the right winners and writes every output. No JAX."""

import csv
import json
import os

import numpy as np
import pytest
from scipy import stats

from mlm_vs_clm.sweep import analysis as sweep_analysis
from mlm_vs_clm.sweep import scaling_law

TRUE = dict(E=1.7, A=400.0, alpha=0.34, B=410.0, beta=0.28)


def _law(N, D, p=TRUE):
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def _grid(n=5):
    N, D = np.meshgrid(np.geomspace(1e7, 1e9, n), np.geomspace(2e8, 2e10, n))
    return N.ravel(), D.ravel()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_known_parameters_and_covers_them(seed):
    N, D = _grid()
    L = _law(N, D) * np.exp(np.random.default_rng(seed).normal(0.0, 0.003, N.size))  # 0.3 % noise
    fit = scaling_law.fit_law(N, D, L)
    assert abs(fit.alpha - TRUE["alpha"]) < 0.02 and abs(fit.beta - TRUE["beta"]) < 0.02, fit
    assert abs(fit.E - TRUE["E"]) < 0.06, fit
    assert abs(np.log(fit.A / TRUE["A"])) < 0.25 and abs(np.log(fit.B / TRUE["B"])) < 0.25, fit
    for k, v in TRUE.items():
        lo, hi = fit.ci95[k]
        assert lo <= v <= hi, (k, v, fit.ci95[k])
        assert lo <= getattr(fit, k) <= hi
    assert fit.ci95["alpha"][1] - fit.ci95["alpha"][0] < 0.1  # informative, not just wide
    assert 0.0 < fit.rmse < 0.03 and fit.n_points == 25 and fit.at_bound == ()


def test_fit_without_noise_is_exact_and_robust_to_one_bad_run():
    N, D = _grid()
    fit = scaling_law.fit_law(N, D, _law(N, D))
    for k, v in TRUE.items():
        assert getattr(fit, k) == pytest.approx(v, rel=1e-3), k
    L = _law(N, D)
    L[7] *= 1.5  # one run that went wrong: the Huber loss keeps the exponents
    fit = scaling_law.fit_law(N, D, L)
    assert abs(fit.alpha - TRUE["alpha"]) < 0.02 and abs(fit.beta - TRUE["beta"]) < 0.02, fit


@pytest.mark.parametrize("N,D,reason", [
    ([1e7, 1e7, 1e7], [1e8, 1e9, 1e10], "3 points at 3 distinct (N, D) pairs, 1 distinct model size, 3 distinct"),
    ([1e7, 1e8, 1e9] * 2, [1e8] * 3 + [1e9] * 3, "6 points at 6 distinct (N, D) pairs, 3 distinct model sizes, 2 "),
    ([1e7, 1e8, 1e9, 1e7, 1e8], [1e8, 1e9, 1e10, 1e9, 1e10], "5 points at 5 distinct (N, D) pairs, 3 distinct"),
])
def test_too_few_points_says_why(N, D, reason):
    with pytest.raises(scaling_law.TooFewPoints) as e:
        scaling_law.fit_law(N, D, _law(np.array(N), np.array(D)))
    assert str(e.value).startswith(reason), str(e.value)
    assert "need >= 3 sizes, >= 3 token counts and >= 6 distinct (N, D) pairs" in str(e.value)


def test_seeds_repeating_three_points_are_not_a_fit():
    """The reviewer's case: 3 (N, D) pairs x 2 seeds passed the counts, J had rank 3 and the
    report showed zero-width intervals and a frontier 36x off."""
    N, D = np.array([1e6, 4e6, 1.6e7] * 2), np.array([1e8, 4e8, 1.6e9] * 2)
    L = _law(N, D) * np.exp(np.random.default_rng(0).normal(0.0, 0.005, 6))
    with pytest.raises(scaling_law.TooFewPoints, match=r"^6 points at 3 distinct \(N, D\) pairs"):
        scaling_law.fit_law(N, D, L)


def test_rank_deficient_jacobian_refuses_the_fit(monkeypatch):
    N, D = _grid(3)
    real = scaling_law._jacobian
    monkeypatch.setattr(scaling_law, "_jacobian", lambda *a: real(*a) * np.array([1.0, 1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(scaling_law.NoFit, match=r"Jacobian at the fit has rank 4 < 5") as e:
        scaling_law.fit_law(N, D, _law(N, D) * np.exp(np.random.default_rng(0).normal(0.0, 0.003, N.size)))
    assert "\n" not in str(e.value)


def test_frontier_has_intervals_that_cover_the_truth_and_marks_extrapolation():
    N, D = _grid()
    fit = scaling_law.fit_law(N, D, _law(N, D) * np.exp(np.random.default_rng(0).normal(0.0, 0.003, N.size)))
    C = scaling_law.frontier_compute_grid(6 * N * D)
    fr, true = scaling_law.frontier(fit, C), scaling_law.frontier(scaling_law.LawFit(**TRUE, se={}, ci95={}, rmse=0,
                                                                                     n_points=0, n_sizes=0,
                                                                                     n_token_counts=0), C)
    for k in ("N_opt", "D_opt", "L"):
        lo, hi = fr[f"{k}_ci95"].T
        assert np.all(lo < fr[k]) and np.all(fr[k] < hi), k  # never zero width
        assert np.all(lo <= true[k]) and np.all(true[k] <= hi), k
    width = np.log(fr["N_opt_ci95"][:, 1] / fr["N_opt_ci95"][:, 0])
    assert width[-1] > 2 * width[np.argmin(np.abs(C - 1e18))]  # wider far from the data
    inside = (C >= (6 * N * D).min()) & (C <= (6 * N * D).max()) & (fr["N_opt"] >= N.min()) & (fr["N_opt"] <= N.max())
    assert inside.any() and not inside.all()
    np.testing.assert_array_equal(fr["extrapolated"], ~inside)


def test_frontier_minimises_the_law_at_fixed_compute():
    N, D = _grid()
    fit = scaling_law.fit_law(N, D, _law(N, D))
    C = scaling_law.frontier_compute_grid(6 * N * D, decades=1)
    assert C.min() <= 0.1 * (6 * N * D).min() and C.max() >= 10 * (6 * N * D).max()
    fr = scaling_law.frontier(fit, C)
    np.testing.assert_allclose(6 * fr["N_opt"] * fr["D_opt"], C, rtol=1e-9)
    for c, n_opt, l_opt in zip(C, fr["N_opt"], fr["L"]):
        Ns = n_opt * np.geomspace(0.2, 5, 201)
        losses = fit.predict(Ns, c / (6 * Ns))
        assert l_opt <= losses.min() + 1e-12
        assert Ns[np.argmin(losses)] == pytest.approx(n_opt, rel=0.03)


# ---------------------------------------------------------------- analyze on synthetic tables

SIZES = {"s": 2e6, "m": 8e6}  # params
STEPS = {100: 1e6, 300: 3e6}  # tokens
SCHEDULES = {"mlm40": (0.0, 0.4), "clm": (1.0, 0.0), "clm50_mlm40": (0.5, 0.4)}
# ft_mean at a budget: clm50_mlm40 best at (s, 100), (m, 100), (m, 300) by a wide margin; at (s, 300)
# mlm40 beats clm50_mlm40 by 0.3 with a seed spread of 1.0 (inside the spread).
FT = {("s", 100): {"mlm40": 70, "clm": 65, "clm50_mlm40": 75},
      ("s", 300): {"mlm40": 76.3, "clm": 70, "clm50_mlm40": 76},
      ("m", 100): {"mlm40": 74, "clm": 68, "clm50_mlm40": 79},
      ("m", 300): {"mlm40": 80, "clm": 73, "clm50_mlm40": 84}}


# Per-seed offsets of each schedule's fine-tuning score (mean 0, sd 1 over the three seeds), so that
# the paired differences between schedules vary from seed to seed.
OFFSETS = {"mlm40": (1.0, 0.0, -1.0), "clm": (0.0, 1.0, -1.0), "clm50_mlm40": (-1.0, 0.0, 1.0)}


def _write_sweep(d, with_ft=True, seeds=(0, 1, 2), failed=True, sizes=SIZES, steps_tokens=STEPS):
    cols = list(sweep_analysis.REQUIRED) + ["wall_s", "branch_from"] + (["ft_topic", "ft_mean"] if with_ft else [])
    rows, ft_rows = [], []
    for size, N in sizes.items():
        for steps, D in steps_tokens.items():
            for sched, (frac, mask) in SCHEDULES.items():
                for seed in seeds:
                    run = f"{size}-{steps}-{sched}-s{seed}"
                    loss = _law(N, D) * (1.0 + 0.02 * frac)
                    spread = 0.5 if (size, steps) == ("s", 300) and sched != "clm" else 0.1
                    row = dict(run=run, size=size, schedule=sched, clm_fraction=frac, mask_ratio=mask, seed=seed,
                               params=int(N), steps=steps, tokens=int(D), flops=6.5 * N * D, wall_s=1.0,
                               val_mlm_loss=loss, val_clm_loss=loss + 0.5, status="done",
                               branch_from=f"{size}-{steps}-clm-s{seed}" if 0 < frac < 1 else "",
                               saved_flops=frac * 6.5 * N * D if 0 < frac < 1 else 0.0)
                    if with_ft:
                        ft = FT[(size, steps)][sched] + spread * OFFSETS[sched][seed]  # sd (ddof 1) = spread
                        row.update(ft_topic=ft, ft_mean=ft)
                        for lr in (1e-4, 3e-4):
                            ft_rows.append(dict(run=run, task="topic", lr=lr, seed=seed, test=ft - 1e4 * lr,
                                                best_validation=ft, diverged=0))
                    rows.append(row)
    if failed:
        rows.append(dict(rows[0], run="s-100-mlm20-s0", schedule="mlm20", val_mlm_loss="", val_clm_loss="",
                         status="missing", ft_topic="", ft_mean=""))
    with open(os.path.join(d, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if ft_rows:
        with open(os.path.join(d, "finetune.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, list(ft_rows[0]))
            w.writeheader()
            w.writerows(ft_rows)
    return rows


def test_analyze_writes_everything_and_names_the_winners(tmp_path, capsys):
    _write_sweep(str(tmp_path))
    out = sweep_analysis.main(str(tmp_path))
    for name in ("summary.md", "fits.json", "loss_vs_compute.png", "score_vs_compute.png",
                 "score_vs_clm_fraction.png", "finetune_spread.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert out["metric"] == "ft_mean"
    wins = {(w["size"], w["steps"]): w for w in out["winners"]}
    assert list(wins) == [("s", 100), ("s", 300), ("m", 100), ("m", 300)]
    for budget, scores in FT.items():
        ranked = sorted(scores, key=scores.get, reverse=True)
        assert (wins[budget]["winner"], wins[budget]["runner_up"]) == tuple(ranked[:2]), budget
        assert wins[budget]["margin"] == pytest.approx(scores[ranked[0]] - scores[ranked[1]])
    assert wins[("s", 300)]["sd"] == pytest.approx(0.5) and wins[("s", 300)]["test"] == "paired t"
    d = 0.3 + 0.5 * (np.asarray(OFFSETS["mlm40"]) - OFFSETS["clm50_mlm40"])  # paired by seed
    assert wins[("s", 300)]["p"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    assert wins[("s", 300)]["verdict"] == "cannot tell"
    assert all(wins[b]["verdict"] == "ahead" and wins[b]["p_holm"] < 0.05 for b in [("s", 100), ("m", 100), ("m", 300)])
    ps = [wins[b]["p"] for b in wins]
    assert sorted(w["p_holm"] for w in wins.values()) == pytest.approx(sorted(sweep_analysis.stats.holm(ps)))
    assert all(w["flops_ratio"] == pytest.approx(1.0) for w in wins.values())  # the synthetic rows share FLOPs
    # 2 sizes x 2 token counts cannot determine the law: each schedule says why instead of fitting
    fits = json.loads((tmp_path / "fits.json").read_text())["fits"]
    assert set(fits) == set(SCHEDULES) and all(f["fit"] is None and "2 distinct model sizes" in f["reason"]
                                               for f in fits.values())
    summary = (tmp_path / "summary.md").read_text()
    assert "s, 300 steps: mlm40 (ft_mean 76.3) over clm50_mlm40 (76), margin 0.3, paired t p = " in summary
    assert "cannot tell at alpha 0.05; FLOP ratio 1 (winner / runner-up, equal steps)" in summary
    assert "s, 100 steps: clm50_mlm40" in summary and "ahead at alpha 0.05" in summary
    assert "- s-100-mlm20-s0: status 'missing'" in summary and summary.count("| s-100-mlm40-s0 |") == 1
    assert "no fit: 12 points at 4 distinct (N, D) pairs, 2 distinct model sizes" in summary
    saved = sum(0.5 * 6.5 * N * D * 3 for N in SIZES.values() for D in STEPS.values())
    assert f"saved {saved:.3g} of" in summary
    ties = [dict(out["winners"][0], margin=0.0)]
    assert sweep_analysis._winner_line(ties[0], "ft_mean") == (
        "s, 100 steps: tie between clm50_mlm40 and mlm40 (ft_mean 75; FLOP ratio 1)")
    printed = capsys.readouterr().out
    assert "summary.md" in printed and "m, 300 steps: clm50_mlm40" in printed


def test_analyze_fits_a_schedule_with_enough_points_and_uses_loss_without_finetuning(tmp_path):
    _write_sweep(str(tmp_path), with_ft=False, seeds=(0,), failed=False, sizes={"s": 2e6, "m": 8e6, "l": 3e7},
                 steps_tokens={100: 1e6, 300: 3e6, 900: 9e6})
    out = sweep_analysis.analyze(str(tmp_path))
    assert out["metric"] == "val_mlm_loss" and not out["higher_is_better"]
    # lowest loss; one seed: no test; pure CLM is not ranked on a loss it never trained on
    assert all(w["winner"] == "mlm40" and w["runner_up"] == "clm50_mlm40" and w["p"] is None
               and w["verdict"].startswith("cannot tell") for w in out["winners"])
    assert out["fits"]["clm"]["loss"] == "val_clm_loss" and out["fits"]["mlm40"]["loss"] == "val_mlm_loss"
    assert out["fits"]["mlm40"]["fit"]["dof"] == 4 and out["fits"]["mlm40"]["fit"]["warning"]  # 9 points, 5 parameters
    fit = out["fits"]["mlm40"]["fit"]
    assert fit is not None and fit["n_points"] == 9 and fit["rmse"] < 1e-3
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], abs=0.01)
    assert fit["beta"] == pytest.approx(TRUE["beta"], abs=0.01)
    assert out["flops_over_6ND"] == pytest.approx([6.5 / 6, 6.5 / 6])
    assert not (tmp_path / "score_vs_compute.png").exists() and not (tmp_path / "finetune_spread.png").exists()
    assert (tmp_path / "loss_vs_compute.png").exists() and (tmp_path / "score_vs_clm_fraction.png").exists()
    summary = (tmp_path / "summary.md").read_text()
    assert "cannot tell (one value per side: no spread to test against)" in summary and "lower is better" in summary
    assert "4 **low dof**" in summary
    assert "score_vs_compute.png skipped" in summary and "### Compute-optimal frontier (C = 6 N D)" in summary
    fr = out["fits"]["mlm40"]["frontier"]
    assert len(fr["N_opt_ci95"]) == len(fr["C"]) and any(fr["extrapolated"]) and not all(fr["extrapolated"])
    rows = [ln for ln in summary.splitlines() if ln.startswith("| 1e+")]
    assert rows and all(" [" in ln for ln in rows) and any("**extrapolated**" in ln for ln in rows)


def test_analyze_with_fixed_E_and_a_forced_loss(tmp_path):
    """`sweep analyze --fixed_E=E --loss=val_mlm_loss` (analysis.main): the fit with E fixed beside the free one."""
    _write_sweep(str(tmp_path), with_ft=False, seeds=(0,), failed=False, sizes={"s": 2e6, "m": 8e6, "l": 3e7},
                 steps_tokens={100: 1e6, 300: 3e6, 900: 9e6})
    out = sweep_analysis.main(str(tmp_path), "val_mlm_loss", TRUE["E"])
    fits = out["fits"]
    assert fits["clm"]["loss"] == "val_mlm_loss"  # forced, not the CLM run's own loss
    fixed = fits["mlm40"]["fixed_E_fit"]
    assert fixed["fixed_E"] and fixed["E"] == pytest.approx(TRUE["E"]) and fixed["dof"] == 5
    assert fixed["alpha"] == pytest.approx(TRUE["alpha"], abs=0.01)
    assert "(E fixed)" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("edit,message", [
    (lambda text: text.replace("tokens,", "tokenz,", 1), "results.csv: missing column 'tokens'"),
    (lambda text: text.replace(",1000000,", ",1e6x,", 1),
     "results.csv: column 'tokens' on line 2 (run 's-100-mlm40-s0'): '1e6x' is not a number"),
    (lambda text: text.replace("0.4,0,", "0.4,zero,", 1), "column 'seed'"),
])
def test_malformed_results_give_one_line_naming_file_and_column(tmp_path, edit, message):
    _write_sweep(str(tmp_path), with_ft=False, seeds=(0,), failed=False)
    path = tmp_path / "results.csv"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ValueError) as e:
        sweep_analysis.analyze(str(tmp_path))
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_small_grid_fit_warns_and_offers_e_fixed_and_the_exponent_ratio():
    rng = np.random.default_rng(3)
    N, D = np.meshgrid([2e6, 8e6, 3e7], [1e6, 3e6, 9e6])
    N, D = N.ravel(), D.ravel()
    L = _law(N, D) * np.exp(rng.normal(0, 0.002, N.shape))
    free = scaling_law.fit_law(N, D, L)
    assert free.dof == 4 and "4 residual degrees of freedom" in free.warning
    fixed = scaling_law.fit_law(N, D, L, fixed_E=TRUE["E"])
    assert fixed.dof == 5 and not fixed.warning and fixed.E == TRUE["E"] and fixed.ci95["E"] == (TRUE["E"], TRUE["E"])
    a, (lo, hi) = scaling_law.exponent_ratio(fixed)
    assert lo < TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]) < hi and lo < a < hi
    with pytest.raises(ValueError, match="fixed_E must be positive and below the smallest loss"):
        scaling_law.fit_law(N, D, L, fixed_E=10.0)
