"""Query ``regression-metrics``: clipped regression sums of the held-out patients.

It serves plans of the ``regression`` task. A patient's prediction and target are the means
over its images (:meth:`common.tasks.regression.RegressionTask.patient_prediction`, through
:func:`client.queries.scoring.patient_outputs`). Both are **clipped** to the coordinator's
range ``[value-lower, value-upper]`` (target units) before anything is summed, and the node
releases only the :class:`common.stats.regression.RegressionSums` of the clipped values:

    n, sum y, sum yhat, sum y^2, sum yhat^2, sum y yhat, sum |e|, sum e^2, sum e

(``e = yhat - y``) and, where ``with-histograms`` is set, the patients per bin of ``|e|`` on
``abs-error-bins`` equal-width bins over ``[0, value-upper - value-lower]`` (no error of
clipped values can exceed that width, so no patient overflows). The histogram is a coarse
contingency count: in an exact release its cells of 1 .. ``min-release-count - 1`` patients
are suppressed (:mod:`client.release`, rule 2).

Why clip. Without a bound on ``y`` and ``yhat`` the sums of ``y``, ``y^2``, ... have no
finite sensitivity, so no noise can protect them; a model's outlying prediction would also
reach the coordinator unchanged in an exact release of one outlier's square. Clipping is a
bias where the range is too narrow: choose it to cover the targets (the section reports it).

Defaults: :data:`DEFAULT_LOWER` = 0 and :data:`DEFAULT_UPPER` = 60 (cm²), chosen for the
synthetic demo's target (:mod:`client.dicom.synth_tasks`: the largest cross-section of a liver
lesion, 0 without one, radius at most 40 mm, so at most ``pi 4^2 = 50.3 cm²``).

Sensitivities per patient (adding or removing one patient), with ``R = max(|lower|, |upper|)``
and ``W = upper - lower``: ``n`` 1; ``sum y`` and ``sum yhat`` ``R``; ``sum y^2``,
``sum yhat^2`` and ``sum y yhat`` ``R^2``; ``sum |e|`` and ``sum e`` ``W``; ``sum e^2`` ``W^2``;
the histogram 1 (one patient, one cell).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.queries.registry import Query, QueryRequest, register_query
from client.queries.scoring import patient_outputs
from client.release import Statistic
from common import messages as k
from common.errors import ConfigError
from common.stats.regression import regression_node_stats

__all__ = ["DEFAULT_BINS", "DEFAULT_LOWER", "DEFAULT_UPPER", "MAX_BINS", "MAX_MAGNITUDE",
           "RegressionMetricsQuery", "ValueRange", "value_range"]

DEFAULT_LOWER = 0.0
"""Default lower clip (target units; the synthetic demo's lesion area in cm²)."""

DEFAULT_UPPER = 60.0
"""Default upper clip (target units; covers the synthetic demo's largest lesion, 50.3 cm²)."""

DEFAULT_BINS = 20
"""Default number of ``|error|`` histogram bins."""

MAX_BINS = 200
"""Largest ``abs-error-bins`` a node serves (bounds the size of a release)."""

MAX_MAGNITUDE = 1e6
"""Largest clipping bound in magnitude (sums of squares stay exact in float64 below it)."""


@dataclass(frozen=True)
class ValueRange:
    """The coordinator's clipping range and histogram bins of one ``regression-metrics`` query.

    Attributes
    ----------
    lower, upper : float
        Targets and predictions are clipped to ``[lower, upper]`` (target units).
    bins : int
        Equal-width ``|error|`` bins over ``[0, upper - lower]``.
    """

    lower: float
    upper: float
    bins: int

    @property
    def width(self) -> float:
        """``W = upper - lower``: the largest error of clipped values."""
        return self.upper - self.lower

    @property
    def magnitude(self) -> float:
        """``R = max(|lower|, |upper|)``: the largest clipped value in magnitude."""
        return max(abs(self.lower), abs(self.upper))


def _malformed(detail: str) -> ConfigError:
    return ConfigError(detail, safe_reason=f"malformed query: {detail}")


def value_range(req: QueryRequest) -> ValueRange:
    """The clipping range of the request (defaults where absent), checked; no patient value."""
    if req.plan.task != "regression":
        raise ConfigError(
            f"query {req.name!r} with a {req.plan.task} plan",
            safe_reason=f"malformed query: {req.name!r} serves the regression task, the plan "
            f"names {req.plan.task}")
    try:
        lower = float(req.config.get(k.VALUE_LOWER, DEFAULT_LOWER))  # type: ignore[arg-type]
        upper = float(req.config.get(k.VALUE_UPPER, DEFAULT_UPPER))  # type: ignore[arg-type]
        bins = req.config.get(k.ABS_ERROR_BINS, DEFAULT_BINS)
    except (TypeError, ValueError):
        raise _malformed("'value-lower' and 'value-upper' must be numbers") from None
    if not all(math.isfinite(v) and abs(v) <= MAX_MAGNITUDE for v in (lower, upper)):
        raise _malformed(f"'value-lower' and 'value-upper' must be finite, |v| <= "
                         f"{MAX_MAGNITUDE:g}")
    if not lower < upper:
        raise _malformed("'value-lower' must be below 'value-upper'")
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
        raise _malformed(f"'abs-error-bins' must be an integer in 1..{MAX_BINS}")
    return ValueRange(lower, upper, bins)


def _with_histogram(req: QueryRequest) -> bool:
    return bool(req.config.get(k.WITH_HISTOGRAMS, True))


@register_query("regression-metrics")
class RegressionMetricsQuery(Query):
    """Clipped regression sums and the ``|error|`` histogram (see the module docstring)."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        vr = value_range(req)
        r, w = vr.magnitude, vr.width
        stats = [Statistic(k.NUM_EXAMPLES, 1.0, integer=True),
                 Statistic(k.REG_SUM_Y, r), Statistic(k.REG_SUM_PRED, r),
                 Statistic(k.REG_SUM_Y2, r * r), Statistic(k.REG_SUM_PRED2, r * r),
                 Statistic(k.REG_SUM_Y_PRED, r * r),
                 Statistic(k.REG_SUM_ABS_ERROR, w), Statistic(k.REG_SUM_SQ_ERROR, w * w),
                 Statistic(k.REG_SUM_ERROR, w)]
        if _with_histogram(req):
            stats.append(Statistic(k.REG_ABS_ERROR_HIST, 1.0, (vr.bins,), small_cells=True,
                                   integer=True))
        return stats

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        vr = value_range(req)
        pred, target = patient_outputs(req, data, k.ARRAYS)
        y = np.clip(np.asarray(target, dtype=np.float64).reshape(-1), vr.lower, vr.upper)
        p = np.clip(np.asarray(pred, dtype=np.float64).reshape(-1), vr.lower, vr.upper)
        sums = regression_node_stats(y, p, abs_error_upper=vr.width, bins=vr.bins)
        out: dict[str, Any] = {
            k.NUM_EXAMPLES: sums.n, k.REG_SUM_Y: sums.sum_y, k.REG_SUM_PRED: sums.sum_pred,
            k.REG_SUM_Y2: sums.sum_y2, k.REG_SUM_PRED2: sums.sum_pred2,
            k.REG_SUM_Y_PRED: sums.sum_y_pred, k.REG_SUM_ABS_ERROR: sums.sum_abs_error,
            k.REG_SUM_SQ_ERROR: sums.sum_sq_error, k.REG_SUM_ERROR: sums.sum_error}
        if _with_histogram(req):
            out[k.REG_ABS_ERROR_HIST] = sums.abs_error_hist
        return out
