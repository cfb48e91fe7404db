"""The parametric scaling law L(N, D) = E + A / N^alpha + B / D^beta: fit, confidence
intervals and the compute-optimal frontier.

N is the number of parameters without the input embedding, D the number of training tokens,
L a validation loss.

Fit. The parameters are fitted as theta = (log E, log A, alpha, log B, beta), which keeps E, A
and B positive, on the residuals r_i = log L_hat(N_i, D_i) - log L_i (relative errors, so that
large and small losses weigh alike) with scipy's `least_squares` and a Huber loss of scale
0.01: residuals below 1 % of the loss (run-to-run noise) count quadratically, larger ones
(a run that went wrong) only linearly, so one bad run cannot drag the fit. The law is
non-convex in the exponents, so the fit starts from several points: on a grid of
(E, alpha, beta) the law is linear in A and B, which a non-negative least-squares solve gives
exactly; the best grid points start the robust fit and the lowest final cost wins.
Exponents are kept in [0.01, 3]; a parameter that ends on its bound is reported in
`at_bound` (its interval then means little).

Confidence intervals. From the Jacobian J of the residuals at the optimum:
cov(theta) = s^2 (J^T J)^-1 with s^2 = sum r_i^2 / (n - 5), computed from the singular values
of J (cov = s^2 V S^-2 V^T), and 95 % intervals theta +- t_{0.975, n-5} * se, the usual
linearised least-squares intervals (the Huber loss is treated as least squares here, exact
when no residual exceeds 1 %). E, A and B get their interval in log space, exponentiated (so it
stays positive and is asymmetric); their standard error is the delta-method one,
value * se(log value). When J has rank below 5 (its smallest singular value under 1e-10 of
the largest) or a variance is not positive, the points do not determine the law and the fit
is refused (`NoFit`, one line): a covariance from a near-singular J^T J would give
meaningless, even zero-width, intervals.

Identifiability. With two distinct model sizes A / N^alpha takes two values, so E, A and alpha
cannot be told apart (likewise B, beta with two token counts); seeds repeat a point and add
no information on the shape. A fit needs >= 3 distinct N, >= 3 distinct D and >= 6 distinct
(N, D) pairs (5 parameters and one degree of freedom for the errors).

Small grids. With n points the residuals have n - 5 degrees of freedom (n - 4 with E fixed).
With 4 or fewer (`LOW_DOF`) the law is barely determined: on the study's 3 x 3 grid, in
simulation, about a fifth of the fits are rank-deficient and the N_opt intervals cover about
72 % rather than 95 %. Such a fit carries a `warning`; two more robust readings are offered:
`fit_law(..., fixed_E=E)` (E taken from elsewhere, e.g. a larger sweep: one parameter less),
and `exponent_ratio(fit)`, a = beta / (alpha + beta), the exponent of N_opt ~ C^a, which
depends on the curvature of the law more than on its level and is the quantity to report
from a small grid.

Frontier. With training compute approximated as C = 6 N D, minimising L(N, C / (6 N)) gives
N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = C / (6 N_opt), G = (alpha A / (beta B))^(1/(alpha+beta)).
Each frontier value gets a 95 % interval by the delta method: the gradient of log N_opt,
log D_opt and L with respect to theta (central differences) against cov(theta), with the
fit's t quantile (log N_opt and log D_opt are exponentiated, so those intervals are
asymmetric). A row is marked `extrapolated` when its C lies outside the 6 N D of the fitted
points or its N_opt outside their N: there the law is only a guess, whatever its interval.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import stats
from scipy.optimize import least_squares, nnls

PARAMS = ("E", "A", "alpha", "B", "beta")
MIN_PAIRS = 6  # distinct (N, D)
MIN_DISTINCT = 3  # distinct N, distinct D
RANK_TOL = 1e-10  # smallest / largest singular value of J below this: rank-deficient
HUBER_SCALE = 0.01
EXPONENT_BOUNDS = (0.01, 3.0)
LOW_DOF = 4  # residual degrees of freedom at or below which a fit is flagged


class NoFit(ValueError):
    """The points do not determine the five parameters; the one-line message says why."""


class TooFewPoints(NoFit):
    """Too few points, distinct sizes, token counts or (N, D) pairs."""


@dataclasses.dataclass(frozen=True)
class LawFit:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    se: dict  # name -> standard error
    ci95: dict  # name -> (low, high)
    rmse: float  # root mean square of L_hat - L, in loss units
    n_points: int
    n_sizes: int
    n_token_counts: int
    at_bound: tuple = ()
    cov: tuple = ()  # 5 x 5 covariance of theta = (log E, log A, alpha, log B, beta)
    N_range: tuple = ()  # (min, max) of the fitted points' N
    C_range: tuple = ()  # (min, max) of the fitted points' 6 N D
    t95: float = float("nan")  # the t quantile of the intervals
    dof: int = 0  # residual degrees of freedom: points - free parameters
    fixed_E: bool = False  # E was given, not fitted

    @property
    def warning(self) -> str:
        if self.dof > LOW_DOF:
            return ""
        return (f"{self.dof} residual degree{'s' * (self.dof != 1)} of freedom (<= {LOW_DOF}): the law is barely "
                "determined and its intervals under-cover; report the exponent ratio, or fit with E fixed")

    def predict(self, N, D) -> np.ndarray:
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in PARAMS}
        out.update(se=dict(self.se), ci95={k: list(v) for k, v in self.ci95.items()}, rmse=self.rmse,
                   n_points=self.n_points, n_sizes=self.n_sizes, n_token_counts=self.n_token_counts,
                   at_bound=list(self.at_bound), cov=[list(r) for r in self.cov], N_range=list(self.N_range),
                   C_range=list(self.C_range), dof=self.dof, fixed_E=self.fixed_E, warning=self.warning)
        ratio, (lo, hi) = exponent_ratio(self)
        out.update(exponent_ratio=ratio, exponent_ratio_ci95=[lo, hi])
        return out


def check_points(N, D, L, fixed_E: bool = False) -> None:
    """Raises TooFewPoints naming the shortfall (points, distinct (N, D) pairs, sizes, token counts)."""
    N, D = np.asarray(N).tolist(), np.asarray(D).tolist()
    n, npairs, ns, nd = len(L), len(set(zip(N, D))), len(set(N)), len(set(D))
    if npairs >= MIN_PAIRS - fixed_E and ns >= MIN_DISTINCT and nd >= MIN_DISTINCT:
        return
    raise TooFewPoints(f"{n} point{'s' * (n != 1)} at {npairs} distinct (N, D) pair{'s' * (npairs != 1)}, "
                       f"{ns} distinct model size{'s' * (ns != 1)}, {nd} distinct token count{'s' * (nd != 1)}: "
                       f"need >= {MIN_DISTINCT} sizes, >= {MIN_DISTINCT} token counts and >= {MIN_PAIRS - fixed_E} "
                       f"distinct (N, D) pairs to fit {5 - fixed_E} parameters")


def _terms(theta, logN, logD):
    e, a, alpha, b, beta = theta
    tN, tD = np.exp(a - alpha * logN), np.exp(b - beta * logD)
    return np.exp(e), tN, tD


def _residuals(theta, logN, logD, logL):
    E, tN, tD = _terms(theta, logN, logD)
    return np.log(E + tN + tD) - logL


def _jacobian(theta, logN, logD, logL):
    E, tN, tD = _terms(theta, logN, logD)
    pred = E + tN + tD
    J_nx5 = np.stack([np.full_like(tN, E), tN, -logN * tN, tD, -logD * tD], axis=1)
    return J_nx5 / pred[:, None]


def _starts(logN, logD, L, keep: int = 6, fixed_E: float | None = None) -> list[np.ndarray]:
    """Grid over (E, alpha, beta); A, B by non-negative least squares; the `keep` best in log error."""
    found = []
    fracs = (0.05, 0.3, 0.6, 0.8, 0.95) if fixed_E is None else (fixed_E / L.min(),)
    for frac, alpha, beta in itertools.product(fracs, np.geomspace(0.05, 2.0, 8), np.geomspace(0.05, 2.0, 8)):
        E = frac * L.min()
        X_nx2 = np.stack([np.exp(-alpha * logN), np.exp(-beta * logD)], axis=1)
        scale_2 = X_nx2.max(axis=0)
        coef_2, _ = nnls(X_nx2 / scale_2, L - E)
        A, B = np.maximum(coef_2 / scale_2, 1e-30)
        pred = E + X_nx2 @ np.array([A, B])
        found.append((float(np.sum((np.log(pred) - np.log(L)) ** 2)), [np.log(E), np.log(A), alpha, np.log(B), beta]))
    found.sort(key=lambda x: x[0])
    return [np.asarray(t) for _, t in found[:keep]]


def fit_law(N, D, L, fixed_E: float | None = None) -> LawFit:
    """Fits L = E + A/N^alpha + B/D^beta to points (N_i, D_i, L_i) (see the module docstring);
    with `fixed_E`, E is that value and the four other parameters are fitted."""
    N, D, L = (np.asarray(x, float).ravel() for x in (N, D, L))
    if not (len(N) == len(D) == len(L)):
        raise ValueError(f"fit_law: N, D and L differ in length ({len(N)}, {len(D)}, {len(L)})")
    if not (np.all(np.isfinite(N + D + L)) and np.all(N > 0) and np.all(D > 0) and np.all(L > 0)):
        raise ValueError("fit_law: N, D and L must be finite and positive")
    fix = fixed_E is not None
    if fix and not (np.isfinite(fixed_E) and 0 < fixed_E < L.min()):
        raise ValueError(f"fit_law: fixed_E must be positive and below the smallest loss {L.min():.4g}, got {fixed_E}")
    check_points(N, D, L, fix)
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    lo_e, hi_e = np.log(L.min()) - 12.0, np.log(L.max()) + 1.0
    lower = np.array([lo_e, -30.0, EXPONENT_BOUNDS[0], -30.0, EXPONENT_BOUNDS[0]])
    upper = np.array([hi_e, 120.0, EXPONENT_BOUNDS[1], 120.0, EXPONENT_BOUNDS[1]])
    free = slice(1, 5) if fix else slice(0, 5)
    e0 = np.log(fixed_E) if fix else 0.0

    def full(th):
        return np.concatenate([[e0], th]) if fix else th

    def res_fn(th, *args):
        return _residuals(full(th), *args)

    def jac_fn(th, *args):
        return _jacobian(full(th), *args)[:, free]

    best = None
    for theta0 in _starts(logN, logD, L, fixed_E=fixed_E):
        theta0 = np.clip(theta0, lower + 1e-9, upper - 1e-9)[free]
        res = least_squares(res_fn, theta0, jac=jac_fn, bounds=(lower[free], upper[free]), loss="huber",
                            f_scale=HUBER_SCALE, args=(logN, logD, logL), x_scale="jac", max_nfev=2000)
        if best is None or res.cost < best.cost:
            best = res
    theta = full(best.x)
    r = _residuals(theta, logN, logD, logL)
    J = jac_fn(best.x, logN, logD, logL)
    n_free = len(PARAMS) - fix
    dof = len(L) - n_free
    s2 = float(np.sum(r**2) / dof)
    _, sv, Vt_5x5 = np.linalg.svd(J, full_matrices=False)
    rank = int(np.sum(sv > RANK_TOL * sv[0]))
    if rank < n_free:
        raise NoFit(f"the law's Jacobian at the fit has rank {rank} < {n_free} (condition number "
                    f"{sv[0] / sv[-1]:.3g}): these points do not determine the law's parameters; add model sizes "
                    "or token counts")
    cov_5x5 = np.zeros((5, 5))
    cov_5x5[free, free] = s2 * (Vt_5x5.T / sv**2) @ Vt_5x5
    var = np.diag(cov_5x5)[free]
    if not np.all(np.isfinite(var) & (var > 0)):
        raise NoFit(f"no error estimate: parameter variances {var.tolist()} are not all positive "
                    f"(residual variance {s2:.3g})")
    se_theta = np.sqrt(np.diag(cov_5x5))
    t = float(stats.t.ppf(0.975, dof))
    value, se, ci = {}, {}, {}
    for i, name in enumerate(PARAMS):
        if name in ("alpha", "beta"):
            value[name] = float(theta[i])
            se[name] = float(se_theta[i])
            ci[name] = (float(theta[i] - t * se_theta[i]), float(theta[i] + t * se_theta[i]))
        else:  # fitted in log space
            value[name] = float(np.exp(theta[i]))
            se[name] = float(value[name] * se_theta[i])
            with np.errstate(over="ignore"):
                ci[name] = (float(np.exp(theta[i] - t * se_theta[i])), float(np.exp(theta[i] + t * se_theta[i])))
    at_bound = tuple(name for name, active in zip(PARAMS[free], best.active_mask) if active != 0)
    fit = LawFit(**value, se=se, ci95=ci, rmse=0.0, n_points=len(L), n_sizes=len(set(N.tolist())),
                 n_token_counts=len(set(D.tolist())), at_bound=at_bound, cov=tuple(map(tuple, cov_5x5.tolist())),
                 N_range=(float(N.min()), float(N.max())), C_range=(float((6 * N * D).min()), float((6 * N * D).max())),
                 t95=t, dof=dof, fixed_E=fix)
    return dataclasses.replace(fit, rmse=float(np.sqrt(np.mean((fit.predict(N, D) - L) ** 2))))


def exponent_ratio(fit: LawFit) -> tuple[float, tuple[float, float]]:
    """a = beta / (alpha + beta) (N_opt ~ C^a) and its 95 % interval (delta method, the fit's t)."""
    a = fit.beta / (fit.alpha + fit.beta)
    if not fit.cov:
        return a, (float("nan"), float("nan"))
    s = fit.alpha + fit.beta
    grad = np.array([0.0, 0.0, -fit.beta / s**2, 0.0, fit.alpha / s**2])
    se = float(np.sqrt(max(grad @ np.asarray(fit.cov) @ grad, 0.0)))
    return a, (a - fit.t95 * se, a + fit.t95 * se)


def _frontier_at(theta, K):
    """(log N_opt, log D_opt, L) at K = C / 6 for theta = (log E, log A, alpha, log B, beta)."""
    e, a, alpha, b, beta = theta
    log_G = (np.log(alpha) + a - np.log(beta) - b) / (alpha + beta)
    log_N = log_G + beta / (alpha + beta) * np.log(K)
    log_D = np.log(K) - log_N
    return np.stack([log_N, log_D, np.exp(e) + np.exp(a - alpha * log_N) + np.exp(b - beta * log_D)])


def frontier(fit: LawFit, C) -> dict:
    """Compute-optimal N, D and the predicted loss at compute C, with C = 6 N D; with the fit's
    covariance also their 95 % intervals (`N_opt_ci95` ...: rows of (low, high), delta method)
    and `extrapolated` (C or N_opt outside the fitted points)."""
    C = np.asarray(C, float)
    theta = np.array([np.log(fit.E), np.log(fit.A), fit.alpha, np.log(fit.B), fit.beta])
    log_N, log_D, L = _frontier_at(theta, C / 6.0)
    out = {"C": C, "N_opt": np.exp(log_N), "D_opt": np.exp(log_D), "L": L}
    if not fit.cov:
        return out
    h = 1e-6 * np.maximum(1.0, np.abs(theta))
    grad_5x3xC = np.stack([(_frontier_at(theta + h[i] * np.eye(5)[i], C / 6.0)
                            - _frontier_at(theta - h[i] * np.eye(5)[i], C / 6.0)) / (2 * h[i]) for i in range(5)])
    var_3xC = np.einsum("ikc,ij,jkc->kc", grad_5x3xC, np.asarray(fit.cov), grad_5x3xC)
    half_3xC = fit.t95 * np.sqrt(np.maximum(var_3xC, 0.0))
    with np.errstate(over="ignore"):
        out["N_opt_ci95"] = np.stack([np.exp(log_N - half_3xC[0]), np.exp(log_N + half_3xC[0])], axis=1)
        out["D_opt_ci95"] = np.stack([np.exp(log_D - half_3xC[1]), np.exp(log_D + half_3xC[1])], axis=1)
    out["L_ci95"] = np.stack([L - half_3xC[2], L + half_3xC[2]], axis=1)
    def outside(x, lo_hi):
        return (x < lo_hi[0] * (1 - 1e-9)) | (x > lo_hi[1] * (1 + 1e-9))

    out["extrapolated"] = outside(C, fit.C_range) | outside(out["N_opt"], fit.N_range)
    return out


def frontier_compute_grid(C_sweep, decades: int = 2) -> np.ndarray:
    """The sweep's own compute values plus every power of ten `decades` either side of them."""
    C_sweep = np.unique(np.asarray(C_sweep, float))
    lo, hi = np.floor(np.log10(C_sweep.min())) - decades, np.ceil(np.log10(C_sweep.max())) + decades
    return np.unique(np.concatenate([C_sweep, 10.0 ** np.arange(lo, hi + 1)]))
