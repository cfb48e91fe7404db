"""mlm_vs_clm.stats on synthetic scores with known differences: the false-positive rate under
the null is about alpha, the power on a clear effect is high, Holm keeps the family-wise rate,
and one seed gives `cannot tell`."""

import numpy as np
import pytest
from scipy import stats as sps

from mlm_vs_clm import stats

TRIALS = 2000


def _rate_bounds(p, n=TRIALS, tail=1e-4):
    """A two-sided binomial interval that holds the observed rate with probability 1 - 2 * tail."""
    return sps.binom.ppf(tail, n, p) / n, sps.binom.isf(tail, n, p) / n


@pytest.mark.parametrize("kind", ["welch", "paired"])
def test_false_positive_rate_under_the_null_is_alpha(kind):
    rng = np.random.default_rng(20)
    a = rng.normal(60.0, 2.0, (TRIALS, 5))
    b = rng.normal(60.0, 2.0, (TRIALS, 5)) + (a - 60.0) * 0.5 * (kind == "paired")  # paired: correlated seeds
    if kind == "welch":
        tests = [stats.welch(x, y) for x, y in zip(a, b)]
    else:
        tests = [stats.paired(dict(enumerate(x)), dict(enumerate(y))) for x, y in zip(a, b)]
    verdicts = [stats.verdict(t.diff, t.p) for t in tests]
    lo, hi = _rate_bounds(stats.ALPHA)
    rate = np.mean([v != stats.CANNOT_TELL for v in verdicts])
    assert lo <= rate <= hi, rate
    # two-sided: the spurious verdicts split about evenly between the two signs
    lo, hi = _rate_bounds(stats.ALPHA / 2)
    assert lo <= np.mean([v == stats.AGREES for v in verdicts]) <= hi


def test_power_on_a_clear_effect():
    rng = np.random.default_rng(21)
    tests = [stats.welch(rng.normal(64, 1.5, 5), rng.normal(60, 1.5, 5)) for _ in range(500)]  # 2.7 sd apart
    assert np.mean([stats.verdict(t.diff, t.p) == stats.AGREES for t in tests]) > 0.9
    # paired by seed: a small effect on top of a large per-seed variation (3 seeds)
    hits = []
    for _ in range(500):
        base = rng.normal(60, 5.0, 3)
        t = stats.paired(dict(enumerate(base + 2.0 + rng.normal(0, 0.2, 3))), dict(enumerate(base)))
        hits.append(stats.verdict(t.diff, t.p) == stats.AGREES)
    assert np.mean(hits) > 0.9


def test_holm_keeps_the_family_wise_rate_over_four_findings():
    rng = np.random.default_rng(22)
    a, b = rng.normal(0, 1, (TRIALS, 4, 4)), rng.normal(0, 1, (TRIALS, 4, 4))
    p = sps.ttest_ind(a, b, axis=-1, equal_var=False).pvalue  # TRIALS x 4 findings, all null
    any_raw = np.mean((p < stats.ALPHA).any(axis=1))
    any_holm = np.mean([min(stats.holm(row)) < stats.ALPHA for row in p])
    assert any_raw > 0.15  # uncorrected: about 1 - 0.95^4 = 0.19
    assert any_holm <= _rate_bounds(stats.ALPHA)[1]


def test_holm_hand_computed():
    assert stats.holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert np.isnan(stats.holm([0.01, float("nan")])[1])
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]


def test_one_seed_or_no_spread_cannot_tell():
    assert stats.summarize([70.0]).n == 1 and np.isnan(stats.summarize([70.0]).sd)  # ddof 1: undefined, not 0
    t = stats.welch([70.0], [60.0])
    assert np.isnan(t.p) and stats.verdict(t.diff, t.p, note=t.note).startswith("cannot tell")
    t = stats.compare({0: 70.0}, {0: 60.0})
    assert np.isnan(t.p) and stats.verdicts([t])[0][1].startswith("cannot tell")
    assert stats.summarize([1.0, 3.0]).sd == pytest.approx(np.sqrt(2.0))
    assert stats.summarize([None, float("nan")]).n == 0


def test_fisher_on_divergence_counts():
    t = stats.fisher(0, 36, 12, 36)
    assert t.diff == pytest.approx(-1 / 3) and t.p < 0.001
    assert stats.fisher(3, 36, 3, 36).p == pytest.approx(1.0)
    assert stats.verdict(-t.diff, t.p) == stats.AGREES  # fewer diverged runs on side A


def test_compare_pairs_by_seed_when_it_can():
    assert stats.compare({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.0, 1: 1.5, 2: 3.0}).name == "paired t"
    assert stats.compare([1.0, 2.0, 4.0], [0.0, 1.5, 3.0]).name == "Welch t"


def test_one_formatter():
    assert stats.fmt(None) == "-" and stats.fmt(float("nan")) == "-" and stats.fmt(float("inf")) == "-"
    assert stats.fmt(3) == "3" and stats.fmt(np.int64(3)) == "3"
    assert stats.fmt(1.23456) == "1.23" and stats.fmt(1234.5, ".3g") == "1.23e+03"
    assert stats.fmt(0.0004, "p") == "<0.001" and stats.fmt(0.0321, "p") == "0.032"
    assert stats.fmt(None, ".6g", missing="") == ""
