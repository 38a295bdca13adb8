"""Federated logistic regression by Newton-Raphson on summed gradients and Hessians.

Node side: :func:`logistic_node_stats` returns, for the node's rows and the coordinator's current
coefficients ``beta``, the score vector ``X'(y - p)``, the information matrix ``X'WX``
(``W = diag(p (1 - p))``), the log-likelihood and the row count. All four add over nodes, so the
summed statistics are exactly those of the pooled rows and Newton-Raphson on them follows the
same path as on pooled data: the fitted coefficients, standard errors (square roots of the
diagonal of the inverse information at the optimum), log-likelihood, AIC and BIC equal those of
:class:`statsmodels.api.Logit` on the pooled rows to the convergence tolerance.

Coordinator side: :func:`fit_logistic` takes a callable ``stats_fn(beta) -> summed stats`` so
that it can query the nodes once per iteration (in a simulation, a local function that sums the
sites). The intercept-only (null) model is fitted the same way by evaluating ``stats_fn`` at
coefficients that are zero except for the intercept, which gives the likelihood-ratio test.

Before the first step the summed information matrix is checked for a constant covariate or
collinear covariates, and along the path for complete or quasi-complete separation, from the
summed statistics alone and whatever the covariates' scales (:mod:`common.stats.separation`).

Written here because statsmodels fits need the rows in one place. Privacy caveat: with fewer
rows than parameters at a node, its gradient/Hessian can reveal rows; apply the node's release
rules (minimum counts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import chi2, norm

from common.errors import ConfigError, DataError
from common.stats._checks import alpha_level, as_labels, require_keys
from common.stats.pooling import sum_stats
from common.stats.separation import (
    COMPLETE_LOGLIK,
    DECREMENT_CONVERGED,
    ConstantCovariateError,
    SeparationError,
    SeparationMonitor,
    check_information,
    separation_error,
)

__all__ = ["ConstantCovariateError", "LogisticFit", "SeparationError", "add_intercept",
           "fit_logistic", "logistic_node_stats", "summing_stats_fn"]

GLM_KEYS = ("grad", "hessian", "loglik", "n")
StatsFn = Callable[[np.ndarray], Mapping[str, Any]]


def add_intercept(x: npt.ArrayLike) -> np.ndarray:
    """Prepend a column of ones (the intercept is column 0 by convention here)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    return np.column_stack([np.ones(arr.shape[0]), arr])


def logistic_node_stats(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    beta: npt.ArrayLike,
    *,
    offset: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """Node-side sufficient statistics of the logistic log-likelihood at ``beta``.

    Parameters
    ----------
    x
        Design matrix ``(n, p)`` of the node's rows, including the intercept column if wanted.
    y
        Binary outcomes ``(n,)``.
    beta
        Current coefficients ``(p,)`` sent by the coordinator.
    offset
        Optional fixed linear-predictor offset ``(n,)`` (e.g. ``logit(score)`` for
        calibration-in-the-large).

    Returns
    -------
    dict
        ``grad`` ``(p,)`` = X'(y - p), ``hessian`` ``(p, p)`` = X'WX, ``loglik`` (float),
        ``n`` (int). All additive over nodes.
    """
    xa = np.asarray(x, dtype=np.float64)
    if xa.ndim != 2 or xa.shape[0] == 0:
        raise DataError(f"x must be a non-empty 2-D design matrix, got shape {xa.shape}",
                        safe_reason="invalid statistics input")
    if not np.all(np.isfinite(xa)):
        raise DataError("x contains NaN or infinite values", safe_reason="invalid statistics input")
    yb = as_labels(y, xa.shape[0], "y").astype(np.float64)
    b = np.asarray(beta, dtype=np.float64)
    if b.shape != (xa.shape[1],) or not np.all(np.isfinite(b)):
        raise ConfigError(f"beta must be finite with shape ({xa.shape[1]},), got {b.shape}")
    eta = xa @ b
    if offset is not None:
        off = np.asarray(offset, dtype=np.float64)
        if off.shape != eta.shape or not np.all(np.isfinite(off)):
            raise DataError("offset must be finite with one value per row",
                            safe_reason="invalid statistics input")
        eta = eta + off
    p = np.exp(-np.logaddexp(0.0, -eta))  # expit, overflow-safe
    w = p * (1.0 - p)
    return {
        "grad": xa.T @ (yb - p),
        "hessian": (xa * w[:, None]).T @ xa,
        "loglik": float(np.sum(yb * eta - np.logaddexp(0.0, eta))),
        "n": int(xa.shape[0]),
    }


@dataclass(frozen=True)
class LogisticFit:
    """Result of :func:`fit_logistic`; ``as_dict`` gives a JSON-ready form."""

    names: list[str]
    coef: np.ndarray
    se: np.ndarray
    z: np.ndarray
    p: np.ndarray
    ci_lower: np.ndarray
    ci_upper: np.ndarray
    cov: np.ndarray
    loglik: float
    null_loglik: float
    lr_stat: float
    lr_df: int
    lr_pvalue: float
    aic: float
    bic: float
    n: int
    iterations: int
    converged: bool
    alpha: float = 0.05
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Coefficient table and fit statistics as plain Python values."""
        def num(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        return {
            "coefficients": [
                {"name": nm, "coef": num(self.coef[i]), "se": num(self.se[i]),
                 "z": num(self.z[i]), "p": num(self.p[i]),
                 "ci_lower": num(self.ci_lower[i]), "ci_upper": num(self.ci_upper[i])}
                for i, nm in enumerate(self.names)
            ],
            "loglik": num(self.loglik), "null_loglik": num(self.null_loglik),
            "lr_stat": num(self.lr_stat), "lr_df": self.lr_df, "lr_pvalue": num(self.lr_pvalue),
            "aic": num(self.aic), "bic": num(self.bic), "n": self.n,
            "iterations": self.iterations, "converged": self.converged, "alpha": self.alpha,
        }


def _checked(stats: Mapping[str, Any], p: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    require_keys(stats, GLM_KEYS, "logistic statistics")
    g = np.asarray(stats["grad"], dtype=np.float64).reshape(-1)
    h = np.asarray(stats["hessian"], dtype=np.float64)
    if g.shape != (p,) or h.shape != (p, p):
        raise DataError(f"summed statistics have shapes {g.shape}, {h.shape}; expected "
                        f"({p},), ({p}, {p})", safe_reason="invalid statistics input")
    ll = float(stats["loglik"])
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(h)) and math.isfinite(ll)):
        raise DataError("summed statistics are not finite", safe_reason="invalid statistics input")
    return g, h, ll, int(stats["n"])


def _resolution(hf: np.ndarray, sum_error: float) -> float:
    """The largest Newton-step coordinate that a gradient error of ``sum_error`` a component
    can produce, twice over: ``2 ||H^-1||_inf sum_error``. A step below it is rounding."""
    return 2.0 * float(np.max(np.sum(np.abs(np.linalg.inv(hf)), axis=1))) * sum_error


def _newton(
    stats_fn: StatsFn, beta0: np.ndarray, free: np.ndarray, *, tol: float, max_iter: int,
    max_abs_coef: float | None = None, intercept_index: int | None = None,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, float, int, int]:
    """Newton-Raphson over the coordinates ``free`` (others fixed); step-halving on ll drops.

    Before the first step the information matrix is checked for constant or collinear
    covariates (:func:`~common.stats.separation.check_information`); along the way the path
    is checked for separation (:class:`~common.stats.separation.SeparationMonitor`).
    """
    p = beta0.size
    beta = beta0.copy()
    stats = stats_fn(beta)
    g, h, ll, n = _checked(stats, p)
    # Sums released in fixed point (secure aggregation) are exact only to this much a cell:
    # no Newton step can be resolved below what that error in the gradient moves it.
    sum_error = float(stats.get("sum_error", 0.0) or 0.0)
    check_information(h, free, intercept_index, names)
    sep = SeparationMonitor()
    step = np.zeros(free.size)
    for it in range(1, max_iter + 1):
        hf = h[np.ix_(free, free)]
        try:
            step = np.linalg.solve(hf, g[free])
        except np.linalg.LinAlgError as exc:
            if sep.streak > 0:  # the separated rows' weights have underflowed
                raise separation_error(sep, free, ll, it, names) from exc
            raise DataError(
                "the information matrix is singular: collinear covariates, a constant "
                "column or perfect separation; drop or combine covariates",
                safe_reason="logistic regression did not converge") from exc
        decrement = float(g[free] @ step)
        if decrement <= DECREMENT_CONVERGED * max(1.0, abs(ll)) or (
                sum_error > 0 and np.max(np.abs(step)) <= _resolution(hf, sum_error)):
            # ll cannot rise further in double precision, or the step is within the sums'
            # rounding; a log-likelihood of ~0 there is complete separation, not a maximum
            if -ll <= COMPLETE_LOGLIK:
                raise separation_error(sep, free, ll, it, names)
            return beta, h, ll, n, it - 1
        full = True
        for _ in range(30):  # step halving keeps the log-likelihood increasing
            cand = beta.copy()
            cand[free] += step
            g2, h2, ll2, n = _checked(stats_fn(cand), p)
            if ll2 >= ll - max(1e-12 * max(1.0, abs(ll)), 2 * sum_error):
                break
            step = step / 2
            full = False
        beta, g, h, ll = cand, g2, h2, ll2
        if max_abs_coef is not None and np.max(np.abs(beta)) > max_abs_coef:
            raise DataError(
                f"coefficients exceed max_abs_coef = {max_abs_coef:g} in absolute value (a "
                "bound set by the caller)", safe_reason="logistic regression did not converge")
        if np.max(np.abs(step)) < tol:
            return beta, h, ll, n, it
        if not full:
            sep.reset()
        elif sep.update(step, decrement):
            raise separation_error(sep, free, ll, it, names)
    raise DataError(f"Newton-Raphson did not converge in {max_iter} iterations (last max "
                    f"|step| {np.max(np.abs(step)):.3g}); possible separation",
                    safe_reason="logistic regression did not converge")


def fit_logistic(
    stats_fn: StatsFn,
    n_features: int,
    *,
    names: Sequence[str] | None = None,
    intercept_index: int | None = 0,
    beta0: npt.ArrayLike | None = None,
    tol: float = 1e-10,
    max_iter: int = 100,
    alpha: float = 0.05,
    max_abs_coef: float | None = None,
) -> LogisticFit:
    """Coordinator: fit a logistic regression from summed node statistics.

    Parameters
    ----------
    stats_fn
        ``stats_fn(beta)`` returns the node statistics of :func:`logistic_node_stats` summed
        over nodes at coefficients ``beta`` (shape ``(n_features,)``).
    n_features
        Number of coefficients ``p`` (columns of the design, intercept included).
    names
        Coefficient names (default ``x0, x1, ...``).
    intercept_index
        Column holding the intercept, used for the null (intercept-only) model; ``None``
        skips the null fit (then ``null_loglik``, ``lr_*`` are NaN).
    beta0
        Starting coefficients (default zeros).
    tol
        Convergence when the largest absolute Newton step is below ``tol`` (or when the
        Newton decrement ``g' H^-1 g`` falls below ``1e-20 max(1, |loglik|)``: the
        log-likelihood cannot rise further in double precision; or, when the statistics
        carry ``sum_error``, the absolute rounding of every summed cell, as secure
        aggregation's fixed point has, when the step is within ``2 ||H^-1||_inf sum_error``:
        the sums cannot resolve it, and ``tol`` may be unreachable).
    max_iter
        Iteration cap; reaching it raises :class:`DataError`.
    alpha
        1 - confidence level of the Wald intervals.
    max_abs_coef
        Optional bound on the coefficients' absolute values (default ``None``: no bound);
        exceeding it raises :class:`DataError`. Separation is detected from the data
        without it (see Notes), whatever the covariates' scales.

    Returns
    -------
    LogisticFit
        Coefficients, SEs, Wald z, p and CIs, log-likelihoods, LR test (df = p - 1),
        AIC = -2 ll + 2 p, BIC = -2 ll + p log n, iterations, converged.

    Raises
    ------
    ConstantCovariateError
        A covariate takes one value in every row (checked on the first statistics, before
        any Newton step).
    SeparationError
        The outcome is completely or quasi-completely separated by the covariates, so the
        maximum-likelihood estimates do not exist (Albert & Anderson, Biometrika 1984;
        71:1-10).
    DataError
        Collinear covariates (a singular information matrix), or no convergence within
        ``max_iter``.

    Notes
    -----
    Separation is recognised from the summed statistics alone (the rows never leave the
    nodes): along the Newton path the log-likelihood levels off (Newton decrement below
    ``1e-5`` nats) while the coefficients keep moving by the same step in the same direction
    (successive steps within a factor 2 of each other, cosine >= 0.99) for three
    consecutive iterations; that happens when the separated rows' fitted probabilities go to
    0 or 1 (complete separation: the log-likelihood itself goes to 0). A converging fit's
    steps shrink quadratically instead. The test is invariant to the covariates' scales, as
    Newton's method is; detecting separation takes about 15-30 iterations.

    Each Newton iteration costs one call of ``stats_fn`` (one round trip to the nodes), plus
    one per step halving (rare: only when a full step lowers the log-likelihood); the null
    fit costs as many again. Typical fits converge in 5-8 iterations.
    """
    p = int(n_features)
    if p < 1:
        raise ConfigError("n_features must be >= 1")
    a = alpha_level(alpha)
    if tol <= 0 or max_iter < 1:
        raise ConfigError("tol must be > 0 and max_iter >= 1")
    labels = list(names) if names is not None else [f"x{i}" for i in range(p)]
    if len(labels) != p:
        raise ConfigError(f"{len(labels)} names for {p} coefficients")
    start = np.zeros(p) if beta0 is None else np.asarray(beta0, dtype=np.float64).copy()
    if start.shape != (p,):
        raise ConfigError(f"beta0 must have shape ({p},)")
    if intercept_index is not None and not 0 <= intercept_index < p:
        raise ConfigError(f"intercept_index {intercept_index} out of range")
    beta, h, ll, n, iters = _newton(stats_fn, start, np.arange(p), tol=tol, max_iter=max_iter,
                                    max_abs_coef=max_abs_coef, intercept_index=intercept_index,
                                    names=labels)
    if n <= 0:
        raise DataError("no rows in the summed statistics", safe_reason="no data")
    cov = np.linalg.inv(h)
    se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    z = beta / se
    pv = 2 * norm.sf(np.abs(z))
    q = float(norm.ppf(1 - a / 2))
    null_ll, lr, lr_df, lr_p = math.nan, math.nan, p - 1, math.nan
    if intercept_index is not None:
        if p == 1:
            null_ll, lr, lr_p = ll, 0.0, 1.0
        else:
            _, _, null_ll, _, _ = _newton(stats_fn, np.zeros(p), np.array([intercept_index]),
                                          tol=tol, max_iter=max_iter, max_abs_coef=max_abs_coef,
                                          intercept_index=intercept_index, names=labels)
            lr = max(2.0 * (ll - null_ll), 0.0)
            lr_p = float(chi2.sf(lr, lr_df))
    return LogisticFit(
        names=labels, coef=beta, se=se, z=z, p=pv, ci_lower=beta - q * se,
        ci_upper=beta + q * se, cov=cov, loglik=ll, null_loglik=null_ll, lr_stat=lr,
        lr_df=lr_df, lr_pvalue=lr_p, aic=-2 * ll + 2 * p, bic=-2 * ll + p * math.log(n), n=n,
        iterations=iters, converged=True, alpha=a,
    )


def summing_stats_fn(site_fns: Sequence[StatsFn]) -> StatsFn:
    """``stats_fn`` that sums the statistics of several per-site functions (simulation/tests)."""
    if not site_fns:
        raise DataError("no sites", safe_reason="no data")

    def fn(beta: np.ndarray) -> dict[str, Any]:
        return sum_stats([f(beta) for f in site_fns])

    return fn
