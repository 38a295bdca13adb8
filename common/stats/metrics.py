"""Threshold metrics with confidence intervals from pooled confusion counts.

Node side: :func:`confusion_counts` returns ``tp, fp, tn, fn`` for the node's held-out
patients (additive over nodes). Coordinator side: :func:`proportion_ci` and
:func:`classification_metrics` turn the summed counts into accuracy, sensitivity (recall),
specificity, precision and F1, each with a two-sided interval. Because every metric is a
function of the four pooled counts only, the result equals the same computation on the pooled
patients exactly.

Intervals
---------
* ``"wilson"``: Wilson score interval; ``"beta"``: Clopper-Pearson exact interval. Both are
  computed by :func:`statsmodels.stats.proportion.proportion_confint` (methods ``"wilson"`` and
  ``"beta"``).
* F1 is not a binomial proportion. Its interval is the delta method on the logit scale:
  with multinomial cell proportions ``(a, b, c)`` = (tp, fp, fn) / n and
  ``F1 = 2a / (2a + b + c)``, ``Var(F1) = g' Sigma g / n`` with ``g`` the gradient of F1 and
  ``Sigma`` the multinomial covariance (Takahashi et al., "Confidence interval for
  micro-averaged F1 and macro-averaged F1 scores", Applied Intelligence 2022); the interval is
  ``expit(logit(F1) +- z * se / (F1 (1 - F1)))``, which stays in (0, 1). It is undefined (NaN)
  when F1 is 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import expit, logit
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from common.errors import ConfigError
from common.stats._checks import alpha_level, as_labels, as_scores, count, require_keys
from common.stats.estimate import Estimate

CONFUSION_KEYS = ("tp", "fp", "tn", "fn")
CI_METHODS = ("wilson", "beta")


def confusion_counts(
    scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float = 0.5
) -> dict[str, int]:
    """Node-side confusion counts at ``score >= threshold`` (predicted positive).

    Returns
    -------
    dict
        ``{"tp", "fp", "tn", "fn"}`` integer counts; additive over nodes.
    """
    s = as_scores(scores)
    y = as_labels(labels, s.size)
    if not math.isfinite(threshold):
        raise ConfigError(f"threshold must be finite, got {threshold!r}")
    pred = s >= threshold
    return {
        "tp": int(np.sum(pred & y)),
        "fp": int(np.sum(pred & ~y)),
        "tn": int(np.sum(~pred & ~y)),
        "fn": int(np.sum(~pred & y)),
    }


def proportion_ci(
    successes: int, trials: int, *, alpha: float = 0.05, method: str = "wilson"
) -> Estimate:
    """Proportion ``successes / trials`` with a Wilson or Clopper-Pearson (``"beta"``) interval.

    ``se`` is the binomial standard error ``sqrt(p (1 - p) / n)``. All fields are NaN when
    ``trials`` is 0.
    """
    k, n = count(successes, "successes"), count(trials, "trials")
    a = alpha_level(alpha)
    if method not in CI_METHODS:
        raise ConfigError(f"CI method must be one of {CI_METHODS}, got {method!r}")
    if k > n:
        raise ConfigError(f"successes ({k}) exceed trials ({n})")
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, math.nan, 0, method)
    lo, hi = proportion_confint(k, n, alpha=a, method=method)
    p = k / n
    return Estimate(p, float(lo), float(hi), math.sqrt(p * (1 - p) / n), n, method)


def f1_ci(tp: int, fp: int, fn: int, tn: int, *, alpha: float = 0.05) -> Estimate:
    """F1 with a delta-method interval on the logit scale (see the module docstring)."""
    a_, b_, c_, d_ = (count(v, name) for v, name in ((tp, "tp"), (fp, "fp"), (fn, "fn"),
                                                      (tn, "tn")))
    z = float(norm.ppf(1 - alpha_level(alpha) / 2))
    n = a_ + b_ + c_ + d_
    denom = 2 * a_ + b_ + c_
    if denom == 0 or n == 0:
        return Estimate(math.nan, math.nan, math.nan, math.nan, n, "delta-logit")
    f1 = 2 * a_ / denom
    p = np.array([a_, b_, c_]) / n
    dd = (2 * p[0] + p[1] + p[2]) ** 2
    grad = np.array([2 * (p[1] + p[2]) / dd, -2 * p[0] / dd, -2 * p[0] / dd])
    sigma = np.diag(p) - np.outer(p, p)  # multinomial covariance of one draw
    var = float(grad @ sigma @ grad) / n
    se = math.sqrt(max(var, 0.0))
    if f1 <= 0.0 or f1 >= 1.0:
        return Estimate(f1, math.nan, math.nan, se, n, "delta-logit")
    half = z * se / (f1 * (1 - f1))
    lo, hi = expit(logit(f1) - half), expit(logit(f1) + half)
    return Estimate(f1, float(lo), float(hi), se, n, "delta-logit")


def classification_metrics(
    counts: Mapping[str, Any], *, alpha: float = 0.05, method: str = "wilson"
) -> dict[str, Estimate]:
    """Accuracy, sensitivity (= recall), specificity, precision and F1 from pooled counts.

    Parameters
    ----------
    counts
        Summed ``{"tp", "fp", "tn", "fn"}`` from :func:`confusion_counts` over nodes.
    alpha
        1 - confidence level.
    method
        ``"wilson"`` or ``"beta"`` (Clopper-Pearson) for the proportions; F1 always uses
        the delta method on the logit scale.

    Returns
    -------
    dict
        ``accuracy, sensitivity, recall, specificity, precision, f1`` -> :class:`Estimate`.
    """
    require_keys(counts, CONFUSION_KEYS, "confusion counts")
    tp, fp, tn, fn = (count(counts[k_], k_) for k_ in CONFUSION_KEYS)
    sens = proportion_ci(tp, tp + fn, alpha=alpha, method=method)
    return {
        "accuracy": proportion_ci(tp + tn, tp + fp + tn + fn, alpha=alpha, method=method),
        "sensitivity": sens,
        "recall": sens,
        "specificity": proportion_ci(tn, tn + fp, alpha=alpha, method=method),
        "precision": proportion_ci(tp, tp + fp, alpha=alpha, method=method),
        "f1": f1_ci(tp, fp, fn, tn, alpha=alpha),
    }
