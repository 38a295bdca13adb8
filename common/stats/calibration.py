"""Calibration from summed node statistics: Brier score, ECE, reliability diagram, slope.

Node side: :func:`calibration_bin_sums` returns, per fixed bin of predicted probability,
the patient count, the sum of scores and the sum of labels, plus the total squared error
``sum (score - label)^2`` (for the Brier score). All are additive over nodes, so the
coordinator-side results equal the pooled computation:

* :func:`brier_from_sums` = ``sklearn.metrics.brier_score_loss`` on the pooled patients;
* :func:`expected_calibration_error` = ``sum_b (n_b / n) |mean label_b - mean score_b|`` on the
  pooled patients binned on the same edges (Naeini et al., AAAI 2015);
* :func:`reliability_diagram` = per-bin (mean score, observed frequency, count);
* calibration intercept and slope (Cox, Biometrika 1958): the logistic regression of the label
  on ``logit(score)``, fitted by :func:`common.stats.glm.fit_logistic` on
  :func:`calibration_glm_stats`; calibration-in-the-large is the intercept with ``logit(score)``
  as an offset (:func:`calibration_in_the_large_stats`).

Recalibration (post-hoc, fitted on validation patients; :class:`ScoreCalibration`) maps a score
``s`` to ``expit(a + b logit(s))``:

* *Platt scaling* (Platt 1999, "Probabilistic outputs for support vector machines"): both
  ``a`` and ``b``, i.e. the calibration regression above used as a recalibration map. It is
  the default here: it corrects a shift of every score (calibration-in-the-large, e.g. a
  model trained with DP-SGD whose probabilities all lie below 0.5 although 40 % of the
  patients are positive) as well as over- or under-confidence. Temperature scaling cannot
  correct a shift: ``expit(logit(s) / T)`` keeps every score on its side of 0.5.
* *Temperature scaling* (Guo et al., "On calibration of modern neural networks", ICML 2017):
  ``a = 0`` and ``b = 1 / T`` only (:func:`fit_temperature`); one parameter, the safer choice
  with very few validation patients.

With ``b > 0`` both maps are strictly increasing, so the ranking of the patients, the ROC
curve and the AUC are unchanged; a fitted ``b <= 0`` would reverse the ranking and is refused
by the caller. Both fits are the Newton-Raphson of :func:`common.stats.glm.fit_logistic` on
summed :func:`calibration_glm_stats` (temperature on its ``b`` coordinate alone, through
:func:`temperature_stats_fn`), so nodes answer the same query for either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import expit, logit

from common.errors import ConfigError, DataError
from common.stats._checks import as_labels, as_scores, count, counts_array, require_keys
from common.stats.bins import bin_index, check_edges, uniform_edges
from common.stats.glm import (
    ConstantCovariateError,
    LogisticFit,
    StatsFn,
    fit_logistic,
    logistic_node_stats,
)

CALIBRATION_BINS = 10
CALIBRATION_KEYS = ("count", "score_sum", "label_sum", "sq_error_sum")
LOGIT_CLIP = 1e-12  # scores are clipped to [1e-12, 1 - 1e-12] before the logit


def _probabilities(scores: npt.ArrayLike) -> np.ndarray:
    s = as_scores(scores)
    if np.any((s < 0) | (s > 1)):
        raise DataError("scores must be probabilities in [0, 1]",
                        safe_reason="invalid statistics input")
    return s


def calibration_bin_sums(
    scores: npt.ArrayLike, labels: npt.ArrayLike, *, edges: npt.ArrayLike | None = None
) -> dict[str, Any]:
    """Node-side per-bin calibration sums.

    Parameters
    ----------
    scores
        Predicted probabilities in [0, 1].
    labels
        Binary labels.
    edges
        Bin edges on [0, 1]; default 10 equal-width bins.

    Returns
    -------
    dict
        ``count`` (int per bin), ``score_sum`` and ``label_sum`` (per bin), ``sq_error_sum``
        (float, ``sum (score - label)^2`` over the node's patients).
    """
    s = _probabilities(scores)
    y = as_labels(labels, s.size).astype(np.float64)
    e = uniform_edges(CALIBRATION_BINS) if edges is None else check_edges(edges)
    idx = bin_index(s, e)
    nb = e.size - 1
    return {
        "count": np.bincount(idx, minlength=nb).astype(np.int64),
        "score_sum": np.bincount(idx, weights=s, minlength=nb),
        "label_sum": np.bincount(idx, weights=y, minlength=nb),
        "sq_error_sum": float(np.sum((s - y) ** 2)),
    }


def _pooled(sums: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    require_keys(sums, CALIBRATION_KEYS, "calibration sums")
    n = counts_array(sums["count"], "count")
    ss = np.asarray(sums["score_sum"], dtype=np.float64)
    ls = np.asarray(sums["label_sum"], dtype=np.float64)
    if ss.shape != n.shape or ls.shape != n.shape:
        raise DataError("calibration sums have mismatched bin counts",
                        safe_reason="invalid statistics input")
    if np.any(ls < 0) or np.any(ls > n + 1e-9) or np.any(ss < -1e-9) or np.any(ss > n + 1e-9):
        raise DataError("calibration sums are inconsistent with the counts",
                        safe_reason="invalid statistics input")
    if n.sum() == 0:
        raise DataError("no patients in the calibration sums", safe_reason="no data")
    return n, ss, ls


def brier_from_sums(sums: Mapping[str, Any]) -> float:
    """Brier score ``sum (score - label)^2 / n`` of the pooled patients."""
    n, _, _ = _pooled(sums)
    sq = float(sums["sq_error_sum"])
    if not math.isfinite(sq) or sq < 0:
        raise DataError("sq_error_sum must be finite and >= 0",
                        safe_reason="invalid statistics input")
    return sq / float(n.sum())


def reliability_diagram(
    sums: Mapping[str, Any], *, edges: npt.ArrayLike | None = None
) -> dict[str, list[float | None]]:
    """Per-bin mean predicted probability, observed frequency and count (empty bins: None).

    Returns
    -------
    dict
        ``bin_lower``, ``bin_upper``, ``mean_score``, ``observed``, ``count`` (lists).
    """
    n, ss, ls = _pooled(sums)
    e = uniform_edges(n.size) if edges is None else check_edges(edges)
    if e.size - 1 != n.size:
        raise DataError("edges do not match the number of bins",
                        safe_reason="invalid statistics input")
    with np.errstate(invalid="ignore", divide="ignore"):
        ms, ob = ss / n, ls / n
    return {
        "bin_lower": e[:-1].tolist(),
        "bin_upper": e[1:].tolist(),
        "mean_score": [float(v) if c > 0 else None for v, c in zip(ms, n, strict=True)],
        "observed": [float(v) if c > 0 else None for v, c in zip(ob, n, strict=True)],
        "count": [int(c) for c in n],
    }


def expected_calibration_error(sums: Mapping[str, Any]) -> float:
    """ECE ``sum_b (n_b / n) |mean label_b - mean score_b|``.

    Equals ``sum_b |label_sum_b - score_sum_b| / n``.
    """
    n, ss, ls = _pooled(sums)
    return float(np.sum(np.abs(ls - ss)) / n.sum())


def _logit_scores(scores: npt.ArrayLike) -> np.ndarray:
    s = np.clip(_probabilities(scores), LOGIT_CLIP, 1 - LOGIT_CLIP)
    return np.log(s) - np.log1p(-s)


def calibration_glm_stats(
    scores: npt.ArrayLike, labels: npt.ArrayLike, beta: npt.ArrayLike
) -> dict[str, Any]:
    """Node-side GLM statistics for ``logit P(y=1) = a + b logit(score)`` at ``beta = (a, b)``."""
    lg = _logit_scores(scores)
    return logistic_node_stats(np.column_stack([np.ones(lg.size), lg]), labels, beta)


def calibration_in_the_large_stats(
    scores: npt.ArrayLike, labels: npt.ArrayLike, beta: npt.ArrayLike
) -> dict[str, Any]:
    """Node-side GLM statistics for ``logit P(y=1) = a + logit(score)`` at ``beta = (a,)``.

    ``logit(score)`` enters as an offset (calibration-in-the-large).
    """
    lg = _logit_scores(scores)
    return logistic_node_stats(np.ones((lg.size, 1)), labels, beta, offset=lg)


def fit_calibration(stats_fn: StatsFn, **kwargs: Any) -> LogisticFit:
    """Calibration intercept and slope from summed :func:`calibration_glm_stats`.

    A perfectly calibrated model has intercept 0 and slope 1; slope < 1 signals over-fitting
    (predictions too extreme). ``kwargs`` go to :func:`common.stats.glm.fit_logistic`.

    Raises
    ------
    DataError
        The pooled scores are all equal (``logit(score)`` is constant, so the slope is
        undefined): detected on the first query round, before any Newton step. Separation
        and the other failures of :func:`~common.stats.glm.fit_logistic` as there.
    """
    try:
        return fit_logistic(stats_fn, 2, names=["intercept", "slope"], **kwargs)
    except ConstantCovariateError as exc:
        raise DataError(
            "every pooled score is the same (after clipping to [1e-12, 1 - 1e-12]), so "
            "logit(score) is constant: the calibration slope is undefined; a calibration "
            "fit needs scores that vary",
            safe_reason="calibration slope undefined: the scores are constant") from exc


def total_count(sums: Mapping[str, Any]) -> int:
    """Number of patients in calibration sums."""
    require_keys(sums, ("count",), "calibration sums")
    return count(np.sum(counts_array(sums["count"], "count")), "count")


CALIBRATION_METHODS = ("platt", "temperature", "none")


@dataclass(frozen=True)
class ScoreCalibration:
    """A recalibration map ``p = expit(intercept + slope * logit(score))`` (module docstring).

    Attributes
    ----------
    method : str
        ``"platt"``, ``"temperature"`` (intercept 0) or ``"none"`` (the identity).
    intercept, slope : float
        The map's coefficients; ``slope`` must be > 0 (a strictly increasing map).
    """

    method: str = "none"
    intercept: float = 0.0
    slope: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"calibration method must be one of {CALIBRATION_METHODS}, "
                              f"got {self.method!r}")
        if not (math.isfinite(self.intercept) and math.isfinite(self.slope) and self.slope > 0):
            raise ConfigError("a calibration map needs a finite intercept and a finite slope > 0 "
                              f"(got {self.intercept!r}, {self.slope!r})")
        if self.method == "temperature" and self.intercept != 0.0:
            raise ConfigError("temperature scaling has no intercept")

    @property
    def temperature(self) -> float:
        """``1 / slope`` (the temperature T of temperature scaling)."""
        return 1.0 / self.slope

    @property
    def coefficients(self) -> list[float]:
        """``[intercept, slope]`` (what the nodes are sent)."""
        return [float(self.intercept), float(self.slope)]

    def apply(self, scores: npt.ArrayLike) -> np.ndarray:
        """Calibrated probabilities of ``scores`` (:func:`apply_calibration`)."""
        return apply_calibration(scores, self.intercept, self.slope)

    def score_for(self, probability: float) -> float:
        """The uncalibrated score whose calibrated probability is ``probability``."""
        p = min(max(float(probability), LOGIT_CLIP), 1.0 - LOGIT_CLIP)
        return float(expit((float(logit(p)) - self.intercept) / self.slope))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: method, intercept, slope, temperature."""
        return {"method": self.method, "intercept": self.intercept, "slope": self.slope,
                "temperature": self.temperature}


def apply_calibration(scores: npt.ArrayLike, intercept: float, slope: float) -> np.ndarray:
    """``expit(intercept + slope * logit(score))``, scores clipped to ``[1e-12, 1 - 1e-12]``.

    The clipping is that of :func:`calibration_glm_stats`, so the map applied is exactly the
    one fitted.
    """
    a, b = float(intercept), float(slope)
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ConfigError("calibration coefficients must be finite")
    return np.asarray(expit(a + b * _logit_scores(scores)), dtype=np.float64)


def temperature_stats_fn(stats_fn: StatsFn) -> StatsFn:
    """Restrict summed :func:`calibration_glm_stats` to the slope: ``beta = (0, b)``.

    ``stats_fn((a, b))`` returns the statistics of ``logit P = a + b logit(score)``; on the
    line ``a = 0`` the score and information of ``b`` alone are the second entry of the
    gradient and the lower-right entry of the information matrix (the log-likelihood and the
    count are the same), so the nodes answer one query for both fits.
    """

    def fn(theta: np.ndarray) -> dict[str, Any]:
        t = np.asarray(theta, dtype=np.float64).reshape(-1)
        if t.shape != (1,):
            raise ConfigError("temperature scaling has one coefficient")
        stats = stats_fn(np.array([0.0, float(t[0])]))
        require_keys(stats, ("grad", "hessian", "loglik", "n"), "calibration statistics")
        g = np.asarray(stats["grad"], dtype=np.float64).reshape(-1)
        h = np.asarray(stats["hessian"], dtype=np.float64).reshape(2, 2)
        return {"grad": g[1:], "hessian": h[1:, 1:], "loglik": stats["loglik"],
                "n": stats["n"]}

    return fn


def fit_temperature(stats_fn: StatsFn, **kwargs: Any) -> LogisticFit:
    """Temperature scaling from summed :func:`calibration_glm_stats` (two-coefficient queries).

    Maximises the pooled log-likelihood of ``P(y=1) = expit(logit(score) / T)`` by Newton-
    Raphson on ``b = 1 / T`` (:func:`temperature_stats_fn`), starting from ``T = 1``. The one
    coefficient is named ``slope``; ``T = 1 / slope``. ``kwargs`` go to
    :func:`common.stats.glm.fit_logistic` (no intercept, so no null-model test).
    """
    kwargs.setdefault("beta0", [1.0])
    try:
        return fit_logistic(temperature_stats_fn(stats_fn), 1, names=["slope"],
                            intercept_index=None, **kwargs)
    except ConstantCovariateError as exc:
        raise DataError(
            "every pooled score is the same, so logit(score) is constant: a temperature "
            "cannot be fitted", safe_reason="temperature undefined: the scores are constant"
        ) from exc
