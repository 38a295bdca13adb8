"""Coordinator side of pooled regression inference: the final model's errors and agreement.

One query round (``regression-metrics``, :mod:`client.queries.regression`): every node clips
its held-out patients' targets and predictions to the coordinator's range
``[value-lower, value-upper]`` and releases the sums of
:class:`common.stats.regression.RegressionSums` and a coarse histogram of ``|error|``. The
pooled sums give, exactly as on the pooled (clipped) patients
(:func:`common.stats.regression.regression_metrics`):

* MAE with a t interval, MSE, RMSE and R² (``sklearn.metrics.mean_absolute_error``,
  ``mean_squared_error``, ``r2_score``);
* Pearson's r with the Fisher z interval (``scipy.stats.pearsonr``);
* Bland-Altman agreement (Bland & Altman, Lancet 1986; 327:307-310, and Stat. Methods Med.
  Res. 1999; 8:135-160): the bias (mean of prediction - target) with its t interval and the
  95% limits of agreement ``bias -+ 1.96 s`` with their approximate intervals;
* the median absolute error, located within one bin of the pooled histogram
  (:func:`common.stats.regression.abs_error_quantile`).

No per-patient point reaches the coordinator, so the Bland-Altman *plot* cannot show the
patients: the report draws the bias and the limits with their intervals as bands, and the
pooled ``|error|`` histogram (``bland_altman`` and ``abs_error_histogram`` in the section).

A node's refusal or silence never raises: it becomes an entry of ``failures`` and the other
nodes are pooled (the section names how many answered).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common import messages as k
from common.config import TrainPlan
from common.errors import VesaliusError
from common.stats.regression import (
    BLAND_ALTMAN_Z,
    RegressionSums,
    abs_error_quantile,
    regression_metrics,
)
from server.inference import QueryRound, query_nodes, secure_note
from server.inference_secure import HIDDEN, is_secure
from server.inference_labels import release_flags

__all__ = ["DEFAULT_BINS", "DEFAULT_LOWER", "DEFAULT_UPPER", "regression_inference"]

log = logging.getLogger(__name__)

DEFAULT_LOWER = 0.0
"""Default clipping range, target units (as the node's defaults: the demo's lesion area, cm²)."""
DEFAULT_UPPER = 60.0
DEFAULT_BINS = 20

_SUMS = (k.NUM_EXAMPLES, k.REG_SUM_Y, k.REG_SUM_PRED, k.REG_SUM_Y2, k.REG_SUM_PRED2,
         k.REG_SUM_Y_PRED, k.REG_SUM_ABS_ERROR, k.REG_SUM_SQ_ERROR, k.REG_SUM_ERROR)


def _count(value: Any) -> int:
    return max(int(round(float(value))), 0)


def _sums(values: dict[str, Any], width: float) -> RegressionSums:
    """:class:`RegressionSums` of released values; the histogram is replaced by one bin of
    ``n`` patients (the moment estimators do not read it, and noised counts need not add up).

    Sums of non-negative terms (squares, ``|e|``) are clipped at 0: a noised release can make
    them negative, and clipping is post-processing (it costs no privacy). Exact releases are
    never negative, so they are unchanged.
    """
    n = _count(values[k.NUM_EXAMPLES])

    def nonneg(key: str) -> float:
        return max(float(values[key]), 0.0)

    return RegressionSums(
        n=n, sum_y=float(values[k.REG_SUM_Y]), sum_pred=float(values[k.REG_SUM_PRED]),
        sum_y2=nonneg(k.REG_SUM_Y2), sum_pred2=nonneg(k.REG_SUM_PRED2),
        sum_y_pred=float(values[k.REG_SUM_Y_PRED]),
        sum_abs_error=nonneg(k.REG_SUM_ABS_ERROR), sum_sq_error=nonneg(k.REG_SUM_SQ_ERROR),
        sum_error=float(values[k.REG_SUM_ERROR]),
        abs_error_hist=np.array([n]), abs_error_overflow=0, abs_error_upper=width)


def _histogram(res: QueryRound, bins: int, width: float) -> dict[str, Any] | None:
    """Pooled ``|error|`` histogram (nodes that released one) and the binned median."""
    hists = [np.asarray(v[k.REG_ABS_ERROR_HIST], dtype=np.float64).reshape(-1)
             for v in res.values.values() if k.REG_ABS_ERROR_HIST in v]
    if not hists or any(h.size != bins for h in hists):
        return None
    counts = np.maximum(np.rint(np.sum(hists, axis=0)), 0).astype(np.int64)
    out: dict[str, Any] = {"edges": np.linspace(0.0, width, bins + 1).tolist(),
                           "counts": counts.tolist(), "sites": len(hists), "median": None}
    total = int(counts.sum())
    if total:
        hist_only = RegressionSums(n=total, sum_y=0.0, sum_pred=0.0, sum_y2=0.0, sum_pred2=0.0,
                                   sum_y_pred=0.0, sum_abs_error=0.0, sum_sq_error=0.0,
                                   sum_error=0.0, abs_error_hist=counts, abs_error_overflow=0,
                                   abs_error_upper=width)
        med = abs_error_quantile(hist_only, 0.5)
        out["median"] = {"lower": med.lower, "upper": med.upper, "n": med.n}
    return out


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _site_rows(res: QueryRound, width: float) -> list[dict[str, Any]]:
    rows = []
    for nid, values in res.values.items():
        n = _count(values[k.NUM_EXAMPLES])
        s = _sums(values, width)
        # SE of the site's MAE: sd(|e|) / sqrt(n), sd from sum |e|^2 = sum e^2 (ddof = 1)
        mae_var = ((s.sum_sq_error - s.sum_abs_error ** 2 / n) / (n - 1) / n) if n > 1 else math.nan
        rows.append({"site": res.sites[nid], "n": n,
                     "mae": _finite(s.sum_abs_error / n) if n else None,
                     "mae_se": _finite(math.sqrt(mae_var)) if mae_var > 0 else None,
                     "bias": _finite(s.sum_error / n) if n else None,
                     "rmse": _finite(math.sqrt(max(s.sum_sq_error, 0.0) / n)) if n else None})
    return rows


def _bland_altman(metrics: dict[str, Any], z: float) -> dict[str, Any]:
    """What the Bland-Altman figure needs: the bias and the limits with their intervals."""
    return {"bias": metrics["bias"], "loa_lower": metrics["loa_lower"],
            "loa_upper": metrics["loa_upper"], "sd_difference": metrics["sd_difference"],
            "z": z, "difference": "prediction - target"}


def regression_inference(
    grid: Grid,
    node_ids: Sequence[int],
    arrays: ArrayRecord,
    plan: TrainPlan,
    *,
    split: str = k.SPLIT_TEST,
    timeout: float,
    alpha: float = 0.05,
    value_lower: float = DEFAULT_LOWER,
    value_upper: float = DEFAULT_UPPER,
    abs_error_bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """Pooled regression inference on one model over the nodes' held-out patients.

    Parameters
    ----------
    grid, node_ids
        Flower grid and the nodes to ask.
    arrays
        The model's weights (one output).
    plan
        Run plan (task ``regression``, model, image size, CV fields).
    split
        ``"val"``, ``"test"`` or ``"heldout"``.
    timeout
        Seconds for the query round.
    alpha
        1 - confidence level of every interval.
    value_lower, value_upper
        Clipping range of targets and predictions at every node (target units); it bounds
        each patient's influence on the released sums (their DP sensitivity).
    abs_error_bins
        Equal-width bins of the ``|error|`` histogram over ``[0, value_upper - value_lower]``.

    Returns
    -------
    dict
        ``task`` ("regression"), ``status`` ("completed" / "failed"), ``reason``, ``split``,
        ``alpha``, ``value_range`` (``lower``, ``upper``, ``units`` = "target units"),
        ``n``, ``sites``, ``failures``, ``ledger_heads``, ``noised``, ``suppressed_cells``,
        ``note`` and ``regression``: ``mae`` (estimate dict: ``value``, ``lower``, ``upper``,
        ``se``, ``n``, ``method``; the t interval cut at 0), ``mse``, ``rmse``, ``r2``,
        ``pearson_r`` (Fisher z interval), ``bias``, ``loa_lower``, ``loa_upper``
        (Bland-Altman, estimate dicts), ``sd_difference``, ``median_abs_error``
        (``lower``/``upper`` of its bin, or ``None``),
        ``bland_altman`` (``bias``, ``loa_lower``, ``loa_upper``, ``sd_difference``, ``z``,
        ``difference``), ``abs_error_histogram`` (``edges``, ``counts``, ``sites``,
        ``median``; ``None`` when no node released one) and ``per_site`` (``site``, ``n``,
        ``mae`` with its ``mae_se``, ``bias``, ``rmse``).
    """
    width = float(value_upper) - float(value_lower)
    base: dict[str, Any] = {**plan.to_record(), k.SPLIT: split, k.WITH_HISTOGRAMS: True,
                            k.VALUE_LOWER: float(value_lower), k.VALUE_UPPER: float(value_upper),
                            k.ABS_ERROR_BINS: int(abs_error_bins)}
    res = query_nodes(grid, node_ids, "regression-metrics", base, timeout=timeout,
                      records={k.ARRAYS: arrays}, required=_SUMS)
    out: dict[str, Any] = {
        "task": "regression", "split": split, "alpha": alpha,
        "value_range": {"lower": float(value_lower), "upper": float(value_upper),
                        "units": "target units"},
        "failures": list(res.failures), "ledger_heads": dict(res.heads)}
    if not res.values:
        out.update(status="failed", reason="no node answered the regression-metrics query"
                   + (" (every node refused or failed: see failures)" if res.failures else ""))
        return out
    noised, suppressed = release_flags(res)
    pooled = _sums(res.pooled(_SUMS), width)
    try:
        metrics = regression_metrics(pooled, alpha=alpha).as_dict()
    except (VesaliusError, ValueError, ZeroDivisionError) as exc:  # noised sums: never raise
        out.update(status="failed", reason=f"regression metrics: {exc}", n=pooled.n,
                   noised=noised)
        return out
    mae = metrics["mae"]
    if mae.get("lower") is not None and mae["lower"] < 0:  # |e| >= 0: the t interval is cut at 0
        mae["lower"] = 0.0
    notes = []
    if res.failures:
        notes.append(f"pooled over the {len(res.nodes())} of {len(node_ids)} sites that answered")
    if suppressed and not noised:
        notes.append(f"{suppressed} small |error| histogram cell(s) were suppressed (released "
                     "as 0): the binned median is located on suppressed counts")
    hist = _histogram(res, int(abs_error_bins), width)
    out.update(status="completed", reason="", n=pooled.n,
               sites=res.site_names(), noised=noised,
               suppressed_cells=suppressed, note="; ".join(notes))
    out["regression"] = {**metrics, "median_abs_error": (hist or {}).get("median"),
                         "bland_altman": _bland_altman(metrics, BLAND_ALTMAN_Z),
                         "abs_error_histogram": hist,
                         "per_site": HIDDEN if is_secure(res) else _site_rows(res, width)}
    if res.secure is not None:
        out["secure_aggregation"] = secure_note(res)
    return out
