"""The project's one statistics module: summaries, tests, multiple-comparison correction and
the number formatter used by every table (sweep/analysis.py, replicate/report.py, finetune/).

Conventions (one rule, one implementation):
- Missing values (None, NaN) are dropped before anything is computed.
- A standard deviation is the sample one, **ddof = 1** (`DDOF`). With fewer than two values it
  is undefined (NaN, printed "-"), never 0.
- Tests are two-sided. A comparison A vs B that the study expects to favour A is tested on
  d = A - B: Welch's t-test for independent groups, the paired t-test when the values are
  paired (the same seeds on both sides), Fisher's exact test for counts (diverged runs).
- A verdict needs a p-value: with one value per side, or no spread at all, there is no test
  and the verdict is `cannot tell` (everywhere: the sweep summary and the replication report).
- Several findings are corrected together with Holm's step-down method at `ALPHA` = 0.05:
  a finding is `agrees` when its corrected p < ALPHA and the difference has the expected
  sign, `disagrees` when corrected p < ALPHA with the other sign, else `cannot tell`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
DDOF = 1

AGREES, DISAGREES, CANNOT_TELL = "agrees", "disagrees", "cannot tell"


# ---------------------------------------------------------------- summaries


def finite(values) -> np.ndarray:
    """The values that are numbers (None and NaN dropped), as float64."""
    return np.asarray([float(x) for x in values if x is not None and np.isfinite(float(x))], float)


@dataclasses.dataclass(frozen=True)
class Summary:
    mean: float  # NaN without values
    sd: float  # ddof 1; NaN with fewer than two values
    n: int


def summarize(values) -> Summary:
    v = finite(values)
    if not len(v):
        return Summary(float("nan"), float("nan"), 0)
    return Summary(float(v.mean()), float(v.std(ddof=DDOF)) if len(v) > 1 else float("nan"), len(v))


def mean_sd(values) -> tuple[float, float]:
    s = summarize(values)
    return s.mean, s.sd


def sd(values) -> float:
    return summarize(values).sd


# ---------------------------------------------------------------- tests


@dataclasses.dataclass(frozen=True)
class Test:
    name: str  # "Welch t", "paired t", "Fisher exact", "Levene", "none"
    diff: float  # the effect, A - B (difference of means, of rates, of spreads ...)
    p: float  # two-sided; NaN when there is no test (too few values, no spread)
    n_a: int
    n_b: int
    note: str = ""  # why there is no p-value


def _no_test(name, diff, n_a, n_b, note) -> Test:
    return Test(name, diff, float("nan"), n_a, n_b, note)


def welch(a, b) -> Test:
    """Welch's t-test of mean(a) - mean(b) (independent samples, unequal variances)."""
    a, b = finite(a), finite(b)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
    if len(a) < 2 or len(b) < 2:
        return _no_test("Welch t", diff, len(a), len(b), "one value per side: no spread to test against")
    if a.std() == 0 and b.std() == 0:
        return _no_test("Welch t", diff, len(a), len(b), "no spread on either side")
    return Test("Welch t", diff, float(sps.ttest_ind(a, b, equal_var=False).pvalue), len(a), len(b))


def paired(a: dict, b: dict) -> Test:
    """Paired t-test of a[k] - b[k] over the keys (seeds) both sides have a value for."""
    keys = [k for k in a if k in b and finite([a[k]]).size and finite([b[k]]).size]
    d = np.asarray([float(a[k]) - float(b[k]) for k in keys])
    diff = float(d.mean()) if len(d) else float("nan")
    if len(d) < 2:
        return _no_test("paired t", diff, len(d), len(d), "fewer than two paired seeds")
    if d.std() == 0:
        return _no_test("paired t", diff, len(d), len(d), "the paired differences do not vary")
    return Test("paired t", diff, float(sps.ttest_rel([float(a[k]) for k in keys], [float(b[k]) for k in keys]).pvalue),
                len(d), len(d))


def compare(a, b) -> Test:
    """Paired when both are dicts keyed by seed and share at least two seeds, else Welch."""
    if isinstance(a, dict) and isinstance(b, dict):
        if sum(k in b for k in a) >= 2:
            return paired(a, b)
        a, b = a.values(), b.values()
    return welch(a, b)


def fisher(k_a: int, n_a: int, k_b: int, n_b: int) -> Test:
    """Fisher's exact test on k_a of n_a vs k_b of n_b (e.g. diverged runs); diff = rate_a - rate_b."""
    if n_a <= 0 or n_b <= 0:
        return _no_test("Fisher exact", float("nan"), n_a, n_b, "no runs")
    diff = k_a / n_a - k_b / n_b
    p = float(sps.fisher_exact([[k_a, n_a - k_a], [k_b, n_b - k_b]]).pvalue)
    return Test("Fisher exact", diff, min(p, 1.0), n_a, n_b)


def levene(a, b) -> Test:
    """Levene's test of equal spread; diff = sd(a) - sd(b) (ddof 1)."""
    a, b = finite(a), finite(b)
    diff = sd(a) - sd(b)
    if len(a) < 3 or len(b) < 3:
        return _no_test("Levene", diff, len(a), len(b), "too few runs")
    with np.errstate(invalid="ignore", divide="ignore"):
        p = float(sps.levene(a, b).pvalue)
    return Test("Levene", diff, p if np.isfinite(p) else float("nan"), len(a), len(b),
                "" if np.isfinite(p) else "no spread")


def holm(pvalues) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1); NaN stays NaN and is not counted."""
    p = [float(x) if x is not None else float("nan") for x in pvalues]
    idx = sorted((i for i, x in enumerate(p) if np.isfinite(x)), key=lambda i: p[i])
    m, out, running = len(idx), [float("nan")] * len(p), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def verdict(diff: float, p_adjusted: float, alpha: float = ALPHA, note: str = "") -> str:
    """`agrees` / `disagrees` / `cannot tell` for an effect expected to be positive (module docstring)."""
    if not (np.isfinite(diff) and np.isfinite(p_adjusted)):
        return f"{CANNOT_TELL} ({note})" if note else CANNOT_TELL
    if p_adjusted < alpha:
        return AGREES if diff > 0 else DISAGREES
    return CANNOT_TELL


def verdicts(tests: list[Test], alpha: float = ALPHA) -> list[tuple[float, str]]:
    """(Holm-corrected p, verdict) for each test, corrected together."""
    adjusted = holm([t.p for t in tests])
    return [(q, verdict(t.diff, q, alpha, t.note)) for t, q in zip(tests, adjusted)]


# ---------------------------------------------------------------- formatting


def fmt(x, spec: str = ".2f", missing: str = "-") -> str:
    """The one number formatter of every table: `missing` for None / NaN / inf, ints as they
    are, p-values with spec "p" (3 decimals, "<0.001" below), floats by `spec` (".2f", ".4g")."""
    if x is None or isinstance(x, str):
        return missing if x is None else x
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if not math.isfinite(x):
        return missing
    if spec == "p":
        return "<0.001" if x < 0.001 else f"{x:.3f}"
    return f"{x:{spec}}"
