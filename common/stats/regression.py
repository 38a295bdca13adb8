"""Regression (a continuous target, e.g. bone age or a volume) from pooled sums.

Node side: :func:`regression_node_stats` releases, over its held-out patients with target
``y`` and prediction ``yhat`` (error ``e = d = yhat - y``), only

    n, sum y, sum yhat, sum y^2, sum yhat^2, sum y yhat, sum |e|, sum e^2, sum e,

and a histogram of ``|e|`` on fixed equal-width bins over ``[0, abs_error_upper]`` (plus the
count above it), as a :class:`RegressionSums`; they add over nodes. (``e`` and the
Bland-Altman difference ``d`` are the same quantity, so ``sum d^2 = sum e^2`` is released once.)

Coordinator side: :func:`regression_metrics` on the merged sums gives, exactly as on the
pooled patients,

* MAE ``sum |e| / n`` (``sklearn.metrics.mean_absolute_error``) with a t interval for the
  mean of ``|e|`` (``sd(|e|)^2 = (sum e^2 - n MAE^2) / (n - 1)``): a normal-approximation
  interval (Student 1908), which leans on the central limit theorem because ``|e|`` is skewed;
* MSE and RMSE (``sklearn.metrics.mean_squared_error``, point estimates only);
* R^2 ``= 1 - SSE / SST`` with ``SST = sum y^2 - n ybar^2`` around the *pooled* mean
  (``sklearn.metrics.r2_score``; NaN when the pooled targets are constant, where sklearn
  returns 0 or 1 by convention);
* Pearson r with the Fisher z interval ``tanh(atanh r +- z / sqrt(n - 3))`` (Fisher,
  Metron 1921; 1:3-32; as ``scipy.stats.pearsonr(...).confidence_interval()``);
* Bland-Altman agreement (Bland & Altman, Lancet 1986; 327:307-310, and Stat. Methods Med.
  Res. 1999; 8:135-160): bias ``dbar`` with ``dbar +- t_{n-1} s / sqrt(n)``, and limits of
  agreement ``dbar +- 1.96 s`` (``s`` the SD of ``d``, ddof = 1) with their approximate CIs
  ``LoA +- t_{n-1} s sqrt(1/n + 1.96^2 / (2 (n - 1)))``, from ``Var(dbar) = s^2 / n`` and
  ``Var(s) ~ s^2 / (2 (n - 1))`` (which Bland & Altman round to ``3 s^2 / n``).

:func:`abs_error_quantile` locates a quantile of the pooled ``|e|`` (e.g. the median absolute
error) within one histogram bin.

Numerical note: raw sums of squares lose precision when ``|mean| / SD`` of the target exceeds
about 1e6; subtract a fixed, configured offset from targets and predictions first if needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from scipy.stats import norm, t

from common.errors import ConfigError, DataError
from common.stats._checks import alpha_level, as_scores
from common.stats._records import (
    Record,
    as_array,
    get_array,
    get_count,
    get_float,
    int_list,
    same,
)
from common.stats.estimate import Estimate

__all__ = [
    "ABS_ERROR_BINS",
    "BinnedQuantile",
    "RegressionMetrics",
    "RegressionSums",
    "abs_error_quantile",
    "regression_metrics",
    "regression_node_stats",
]

ABS_ERROR_BINS = 1000
BLAND_ALTMAN_Z = 1.96
_SAFE = "invalid statistics input"


@dataclass(frozen=True, eq=False)
class RegressionSums:
    """Node-side sums for regression (add over nodes with ``+``).

    Attributes
    ----------
    n : int
        Patients.
    sum_y, sum_pred, sum_y2, sum_pred2, sum_y_pred : float
        Sums of targets, predictions, their squares and products.
    sum_abs_error, sum_sq_error, sum_error : float
        Sums of ``|e|``, ``e^2`` and ``e`` with ``e = prediction - target``.
    abs_error_hist : numpy.ndarray
        int64 counts of ``|e|`` in equal-width bins over ``[0, abs_error_upper]`` (the last
        bin closed on the right).
    abs_error_overflow : int
        Patients with ``|e| > abs_error_upper``.
    abs_error_upper : float
        The histogram's upper edge (a configured constant, in the target's units).

    Notes
    -----
    With ``n = 1`` the sums are that patient's target and prediction: the node's release
    rules (minimum count) apply. The histogram places each patient's error within a bin;
    small cells are suppressed by those rules.
    """

    n: int
    sum_y: float
    sum_pred: float
    sum_y2: float
    sum_pred2: float
    sum_y_pred: float
    sum_abs_error: float
    sum_sq_error: float
    sum_error: float
    abs_error_hist: np.ndarray
    abs_error_overflow: int
    abs_error_upper: float

    _SUMS: ClassVar[tuple[str, ...]] = (
        "sum_y", "sum_pred", "sum_y2", "sum_pred2", "sum_y_pred", "sum_abs_error",
        "sum_sq_error", "sum_error")

    def __post_init__(self) -> None:
        hist = np.asarray(self.abs_error_hist)
        if hist.ndim != 1 or hist.size == 0:
            raise DataError("abs_error_hist must be a non-empty 1-D array", safe_reason=_SAFE)
        object.__setattr__(self, "abs_error_hist", as_array(hist, hist.shape, counts=True,
                                                            name="abs_error_hist"))
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        object.__setattr__(self, "n", get_count(record, "n"))
        object.__setattr__(self, "abs_error_overflow", get_count(record, "abs_error_overflow"))
        for name in (*self._SUMS, "abs_error_upper"):
            object.__setattr__(self, name, get_float(record, name))
        if self.abs_error_upper <= 0:
            raise DataError("abs_error_upper must be > 0", safe_reason=_SAFE)
        if int(self.abs_error_hist.sum()) + self.abs_error_overflow != self.n:
            raise DataError("the |error| histogram does not count every patient",
                            safe_reason=_SAFE)

    def merge(self, other: RegressionSums) -> RegressionSums:
        """Sums over the union of both sets of patients."""
        same("|error| histogram range", self.abs_error_upper, other.abs_error_upper)
        same("|error| histogram bins", self.abs_error_hist.size, other.abs_error_hist.size)
        sums = {name: getattr(self, name) + getattr(other, name) for name in self._SUMS}
        return RegressionSums(
            n=self.n + other.n, abs_error_hist=self.abs_error_hist + other.abs_error_hist,
            abs_error_overflow=self.abs_error_overflow + other.abs_error_overflow,
            abs_error_upper=self.abs_error_upper, **sums)

    __add__ = merge

    def to_record(self) -> Record:
        """Flat record: ``n``, ``abs_error_overflow`` (int), the sums and ``abs_error_upper``
        (float), ``abs_error_hist`` (list of int)."""
        out: Record = {"n": self.n, "abs_error_overflow": self.abs_error_overflow,
                       "abs_error_upper": self.abs_error_upper,
                       "abs_error_hist": int_list(self.abs_error_hist)}
        for name in self._SUMS:
            out[name] = float(getattr(self, name))
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RegressionSums:
        """Inverse of :meth:`to_record`."""
        hist = record.get("abs_error_hist")
        if not isinstance(hist, list):
            raise DataError("regression record lacks abs_error_hist", safe_reason=_SAFE)
        return cls(n=get_count(record, "n"),
                   abs_error_hist=get_array(record, "abs_error_hist", (len(hist),),
                                            counts=True),
                   abs_error_overflow=get_count(record, "abs_error_overflow"),
                   abs_error_upper=get_float(record, "abs_error_upper"),
                   **{name: get_float(record, name) for name in cls._SUMS})

    def edges(self) -> np.ndarray:
        """The histogram's bin edges."""
        return np.linspace(0.0, self.abs_error_upper, self.abs_error_hist.size + 1)


def regression_node_stats(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    *,
    abs_error_upper: float,
    bins: int = ABS_ERROR_BINS,
) -> RegressionSums:
    """Node-side sums of the held-out patients' targets and predictions.

    Parameters
    ----------
    y_true, y_pred
        Targets and predictions (finite, same length, in the target's units).
    abs_error_upper
        Upper edge of the ``|error|`` histogram, in the target's units; the same configured
        value at every node (errors above it are only counted).
    bins
        Number of equal-width bins over ``[0, abs_error_upper]``.
    """
    y = as_scores(y_true, "targets")
    p = as_scores(y_pred, "predictions")
    if p.size != y.size:
        raise DataError("targets and predictions differ in length", safe_reason=_SAFE)
    upper = float(abs_error_upper)
    if not (math.isfinite(upper) and upper > 0):
        raise ConfigError(f"abs_error_upper must be finite and > 0, got {abs_error_upper!r}")
    if int(bins) != bins or bins < 1:
        raise ConfigError(f"bins must be a positive integer, got {bins!r}")
    e = p - y
    a = np.abs(e)
    inside = a <= upper
    edges = np.linspace(0.0, upper, int(bins) + 1)  # as RegressionSums.edges()
    idx = np.minimum(np.searchsorted(edges, a[inside], side="right") - 1, int(bins) - 1)
    return RegressionSums(
        n=int(y.size), sum_y=float(y.sum()), sum_pred=float(p.sum()),
        sum_y2=float(y @ y), sum_pred2=float(p @ p), sum_y_pred=float(y @ p),
        sum_abs_error=float(a.sum()), sum_sq_error=float(e @ e), sum_error=float(e.sum()),
        abs_error_hist=np.bincount(idx, minlength=int(bins)),
        abs_error_overflow=int(np.count_nonzero(~inside)), abs_error_upper=upper)


@dataclass(frozen=True)
class RegressionMetrics:
    """Pooled regression metrics (errors are ``prediction - target``, in the target's units).

    Attributes
    ----------
    n : int
    mae : Estimate
        With a t interval for the mean of ``|e|`` (method ``"t"``).
    mse, rmse, r2 : float
        Point estimates.
    pearson_r : Estimate
        With the Fisher z interval (method ``"fisher-z"``; NaN with ``n <= 3``).
    bias : Estimate
        Bland-Altman mean difference with a t interval.
    loa_lower, loa_upper : Estimate
        Limits of agreement ``bias -+ 1.96 s`` with Bland & Altman's approximate CIs.
    sd_difference : float
        ``s``, the SD of the differences (ddof = 1).
    """

    n: int
    mae: Estimate
    mse: float
    rmse: float
    r2: float
    pearson_r: Estimate
    bias: Estimate
    loa_lower: Estimate
    loa_upper: Estimate
    sd_difference: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite numbers become ``None``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Estimate):
                out[f.name] = v.as_dict()
            else:
                out[f.name] = v if not isinstance(v, float) or math.isfinite(v) else None
        return out


def _nan(n: int, method: str, value: float = math.nan) -> Estimate:
    return Estimate(value, math.nan, math.nan, math.nan, n, method)


def _t_interval(mean: float, sd: float, n: int, q: float) -> Estimate:
    se = sd / math.sqrt(n)
    return Estimate(mean, mean - q * se, mean + q * se, se, n, "t")


def _pearson(stats: RegressionSums, z: float) -> Estimate:
    n = stats.n
    sxx = stats.sum_y2 - stats.sum_y**2 / n
    syy = stats.sum_pred2 - stats.sum_pred**2 / n
    sxy = stats.sum_y_pred - stats.sum_y * stats.sum_pred / n
    if sxx <= 0 or syy <= 0:
        return _nan(n, "fisher-z")
    r = float(np.clip(sxy / math.sqrt(sxx * syy), -1.0, 1.0))
    if n <= 3 or abs(r) == 1.0:
        return _nan(n, "fisher-z", r)
    se = 1.0 / math.sqrt(n - 3)
    zr = math.atanh(r)
    return Estimate(r, math.tanh(zr - z * se), math.tanh(zr + z * se), se, n, "fisher-z")


def regression_metrics(
    stats: RegressionSums, *, alpha: float = 0.05, loa_z: float = BLAND_ALTMAN_Z
) -> RegressionMetrics:
    """Coordinator: pooled MAE, RMSE, R^2, Pearson r and Bland-Altman agreement with CIs.

    Parameters
    ----------
    stats
        The merged :class:`RegressionSums`.
    alpha
        1 - confidence level of every interval.
    loa_z
        Multiplier of ``s`` for the limits of agreement (Bland & Altman's 1.96).

    Raises
    ------
    DataError
        No patients.
    """
    a = alpha_level(alpha)
    if not (math.isfinite(loa_z) and loa_z > 0):
        raise ConfigError(f"loa_z must be finite and > 0, got {loa_z!r}")
    n = stats.n
    if n == 0:
        raise DataError("no patients in the regression statistics", safe_reason="no data")
    mae = stats.sum_abs_error / n
    mse = stats.sum_sq_error / n
    bias = stats.sum_error / n
    sst = stats.sum_y2 - stats.sum_y**2 / n
    r2 = 1.0 - stats.sum_sq_error / sst if sst > 0 else math.nan
    z = float(norm.ppf(1 - a / 2))
    pearson = _pearson(stats, z)
    if n < 2:  # no SD: only the point estimates
        return RegressionMetrics(n, _nan(n, "t", mae), mse, math.sqrt(mse), r2, pearson,
                                 _nan(n, "t", bias), _nan(n, "bland-altman"),
                                 _nan(n, "bland-altman"), math.nan)
    q = float(t.ppf(1 - a / 2, n - 1))
    sd_abs = math.sqrt(max(stats.sum_sq_error - n * mae * mae, 0.0) / (n - 1))
    sd_d = math.sqrt(max(stats.sum_sq_error - n * bias * bias, 0.0) / (n - 1))
    se_loa = sd_d * math.sqrt(1.0 / n + loa_z**2 / (2.0 * (n - 1)))
    limits = []
    for lim in (bias - loa_z * sd_d, bias + loa_z * sd_d):
        limits.append(Estimate(lim, lim - q * se_loa, lim + q * se_loa, se_loa, n,
                               "bland-altman"))
    return RegressionMetrics(
        n=n, mae=_t_interval(mae, sd_abs, n, q), mse=mse, rmse=math.sqrt(mse), r2=r2,
        pearson_r=pearson, bias=_t_interval(bias, sd_d, n, q), loa_lower=limits[0],
        loa_upper=limits[1], sd_difference=sd_d)


@dataclass(frozen=True)
class BinnedQuantile:
    """A quantile of the pooled ``|e|`` known to lie in ``[lower, upper]``.

    ``upper`` is ``inf`` when the quantile falls among the errors above the histogram.
    """

    q: float
    lower: float
    upper: float
    n: int


def abs_error_quantile(stats: RegressionSums, q: float = 0.5) -> BinnedQuantile:
    """The bin holding the ``ceil(q n)``-th smallest pooled ``|e|`` (q = 0.5: the median).

    That order statistic is ``numpy.quantile(|e|, q, method="inverted_cdf")`` on the pooled
    errors; it lies in ``[lower, upper)`` (``[lower, upper]`` for the last bin).
    """
    if not 0.0 < float(q) <= 1.0:
        raise ConfigError(f"q must lie in (0, 1], got {q!r}")
    n = stats.n
    if n == 0:
        raise DataError("no patients in the regression statistics", safe_reason="no data")
    k = max(1, math.ceil(float(q) * n - 1e-9))
    cum = np.cumsum(stats.abs_error_hist)
    edges = stats.edges()
    if k > int(cum[-1]):
        return BinnedQuantile(float(q), float(edges[-1]), math.inf, n)
    b = int(np.searchsorted(cum, k))
    return BinnedQuantile(float(q), float(edges[b]), float(edges[b + 1]), n)
