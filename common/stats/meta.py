"""Random-effects meta-analysis of per-site estimates (DerSimonian & Laird 1986).

Given per-site estimates ``y_i`` with within-site variances ``v_i`` (e.g. per-site AUC with its
DeLong variance, or per-site sensitivity on the logit scale), :func:`random_effects` returns the
fixed-effect (inverse-variance) estimate, Cochran's ``Q``, the DerSimonian-Laird between-site
variance ``tau^2 = max(0, (Q - (k - 1)) / (sum w - sum w^2 / sum w))``,
``I^2 = max(0, (Q - (k - 1)) / Q)``
(Higgins & Thompson 2002) and the random-effects estimate with weights ``1 / (v_i + tau^2)``,
its SE and Wald CI. The result equals
``statsmodels.stats.meta_analysis.combine_effects(y, v, method_re="dl")`` whenever
``Q >= k - 1``; when ``Q < k - 1`` statsmodels 0.15 leaves ``tau^2`` negative, whereas we
truncate it at 0 as DerSimonian & Laird (and R's metafor) do, which gives the fixed-effect
result.

Helpers put per-site quantities on a scale where the normal approximation is reasonable:

* :func:`site_auc_effects`: AUC and DeLong variance on the raw scale (as commonly reported);
* :func:`logit_proportion_effects`: ``logit(x/n)`` with variance ``1/x + 1/(n - x)`` (delta
  method for a binomial proportion), adding 0.5 to both cells when ``x`` is 0 or ``n``
  (Haldane-Anscombe); back-transform with :func:`scipy.special.expit`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import expit
from scipy.stats import chi2, norm

from common.errors import DataError
from common.stats._checks import alpha_level, count


@dataclass(frozen=True)
class MetaResult:
    """Random-effects meta-analysis result (all on the analysis scale unless stated)."""

    estimate: float
    se: float
    lower: float
    upper: float
    fixed_estimate: float
    fixed_se: float
    tau2: float
    i2: float
    q: float
    q_pvalue: float
    k: int
    site_estimates: list[float]
    site_variances: list[float]
    site_names: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    scale: str = "raw"
    alpha: float = 0.05

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (what the forest plot and the report consume)."""
        z = float(norm.ppf(1 - self.alpha / 2))

        def num(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        back = expit if self.scale == "logit" else (lambda v: v)
        sites = [
            {"site": nm, "estimate": num(back(e)), "lower": num(back(e - z * math.sqrt(v))),
             "upper": num(back(e + z * math.sqrt(v))), "weight": num(w)}
            for nm, e, v, w in zip(self.site_names, self.site_estimates, self.site_variances,
                                   self.weights, strict=True)
        ]
        return {
            "pooled": {"estimate": num(back(self.estimate)), "lower": num(back(self.lower)),
                       "upper": num(back(self.upper))},
            "se": num(self.se), "fixed_estimate": num(back(self.fixed_estimate)),
            "fixed_se": num(self.fixed_se), "tau2": num(self.tau2), "i2": num(self.i2),
            "q": num(self.q), "q_pvalue": num(self.q_pvalue), "k": self.k, "scale": self.scale,
            "alpha": self.alpha, "sites": sites, "method": "dersimonian-laird",
        }


def random_effects(
    estimates: npt.ArrayLike,
    variances: npt.ArrayLike,
    *,
    alpha: float = 0.05,
    site_names: Sequence[str] | None = None,
    scale: str = "raw",
) -> MetaResult:
    """DerSimonian-Laird random-effects pooling of per-site estimates.

    Parameters
    ----------
    estimates, variances
        Per-site estimates and their within-site variances (> 0), same length k >= 2.
    alpha
        1 - confidence level.
    site_names
        Names for the forest plot (default ``site-1`` ...).
    scale
        ``"raw"`` or ``"logit"`` (only affects :meth:`MetaResult.as_dict` back-transform).
    """
    y = np.asarray(estimates, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    a = alpha_level(alpha)
    if y.ndim != 1 or v.shape != y.shape:
        raise DataError("estimates and variances must be 1-D of the same length",
                        safe_reason="invalid statistics input")
    if y.size < 2:
        raise DataError("meta-analysis needs at least two sites",
                        safe_reason="too few sites for a meta-analysis")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(v)) and np.all(v > 0)):
        raise DataError("estimates must be finite and variances finite and > 0",
                        safe_reason="invalid statistics input")
    if scale not in ("raw", "logit"):
        raise DataError(f"scale must be 'raw' or 'logit', got {scale!r}",
                        safe_reason="invalid statistics input")
    names = list(site_names) if site_names is not None else [f"site-{i + 1}" for i in range(y.size)]
    if len(names) != y.size:
        raise DataError("one site name per estimate", safe_reason="invalid statistics input")
    k = y.size
    w = 1.0 / v
    fe = float(np.sum(w * y) / np.sum(w))
    q = float(np.sum(w * (y - fe) ** 2))
    c = float(np.sum(w) - np.sum(w * w) / np.sum(w))
    tau2 = max(0.0, (q - (k - 1)) / c) if c > 0 else 0.0
    i2 = max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
    wr = 1.0 / (v + tau2)
    re = float(np.sum(wr * y) / np.sum(wr))
    se = math.sqrt(1.0 / float(np.sum(wr)))
    z = float(norm.ppf(1 - a / 2))
    return MetaResult(
        estimate=re, se=se, lower=re - z * se, upper=re + z * se, fixed_estimate=fe,
        fixed_se=math.sqrt(1.0 / float(np.sum(w))), tau2=tau2, i2=i2, q=q,
        q_pvalue=float(chi2.sf(q, k - 1)), k=k, site_estimates=y.tolist(),
        site_variances=v.tolist(), site_names=names, weights=(wr / wr.sum()).tolist(),
        scale=scale, alpha=a,
    )


def logit_proportion_effects(
    successes: Sequence[int], trials: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-site ``logit(x / n)`` and its variance ``1/x + 1/(n - x)`` (0.5 added at 0 or n)."""
    if len(successes) != len(trials) or len(successes) == 0:
        raise DataError("one success count per trial count", safe_reason="invalid statistics input")
    est, var = [], []
    for xs, ns in zip(successes, trials, strict=True):
        x, n = count(xs, "successes"), count(ns, "trials")
        if n == 0 or x > n:
            raise DataError("each site needs trials > 0 and successes <= trials",
                            safe_reason="invalid statistics input")
        xf, ff = float(x), float(n - x)
        if x == 0 or x == n:
            xf, ff = xf + 0.5, ff + 0.5
        est.append(math.log(xf / ff))
        var.append(1.0 / xf + 1.0 / ff)
    return np.array(est), np.array(var)


def logit_auc_effects(
    aucs: Sequence[float], variances: Sequence[float], sizes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-site ``logit(AUC)`` and its delta-method variance ``var / (AUC (1 - AUC))^2``.

    Pooling AUCs on the logit scale keeps the pooled value and its interval inside (0, 1)
    (on the raw scale a site AUC near 1 with a symmetric CI pushes the bound past 1). An AUC
    of exactly 0 or 1 is moved half a patient inside the interval, ``1 / (2 n)`` for a site of
    ``n`` patients, as a continuity correction, so that its logit and variance are finite.
    """
    if not len(aucs) == len(variances) == len(sizes) or len(aucs) == 0:
        raise DataError("one AUC, variance and size per site", safe_reason="invalid statistics input")
    est, var = [], []
    for auc, v, n in zip(aucs, variances, sizes, strict=True):
        if not (0.0 <= auc <= 1.0 and v >= 0 and n >= 1):
            raise DataError("AUCs must lie in [0, 1] with variances >= 0 and sizes >= 1",
                            safe_reason="invalid statistics input")
        edge = 1.0 / (2.0 * n)
        a = edge if auc <= 0.0 else (1.0 - edge if auc >= 1.0 else float(auc))
        est.append(math.log(a / (1.0 - a)))
        var.append(max(float(v), edge * (1.0 - edge) / n) / (a * (1.0 - a)) ** 2)
    return np.array(est), np.array(var)


def site_auc_effects(
    results: Sequence[tuple[float, float]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-site ``(AUC, DeLong variance)`` pairs -> arrays for :func:`random_effects`."""
    if len(results) == 0:
        raise DataError("no site AUCs", safe_reason="invalid statistics input")
    arr = np.asarray(results, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DataError("expected (auc, variance) pairs", safe_reason="invalid statistics input")
    return arr[:, 0].copy(), arr[:, 1].copy()
