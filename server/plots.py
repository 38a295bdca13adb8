"""Figures for the run report, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Every plot function takes the JSON-ready structures of the ``inference`` section of
``report.json`` (see :mod:`server.report_html`) and returns a :class:`matplotlib.figure.Figure`;
:func:`figure_png` turns one into PNG bytes. Figures are created with the object-oriented API
(``Figure`` + ``FigureCanvasAgg``), so nothing touches pyplot's global state or a display,
and no figure outlives the call that renders it.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.errors import DataError
from common.stats.histogram import auc_from_histograms

_SIZE = (5.0, 4.2)
_DPI = 100


def figure_png(fig: Figure) -> bytes:
    """Render ``fig`` to PNG bytes (no metadata, so nothing names a tool or a URL)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight",
                metadata={"Software": None})
    return buf.getvalue()


def roc_from_histograms(pos: npt.ArrayLike, neg: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """ROC points (FPR, TPR) from per-class histograms, thresholds from the top bin down.

    Starts at (0, 0) and ends at (1, 1); one point per bin.
    """
    p = np.asarray(pos, dtype=np.float64)
    q = np.asarray(neg, dtype=np.float64)
    if p.ndim != 1 or p.shape != q.shape or np.any(p < 0) or np.any(q < 0):
        raise DataError("ROC histograms must be two non-negative 1-D arrays of equal length",
                        safe_reason="invalid report data")
    if p.sum() == 0 or q.sum() == 0:
        raise DataError("ROC needs both classes", safe_reason="invalid report data")
    tpr = np.concatenate([[0.0], np.cumsum(p[::-1]) / p.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(q[::-1]) / q.sum()])
    return fpr, tpr


def _curve(entry: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
    """(fpr, tpr, auc) from ``{"pos", "neg"}`` histograms or precomputed ``{"fpr", "tpr"}``."""
    if "pos" in entry and "neg" in entry:
        fpr, tpr = roc_from_histograms(entry["pos"], entry["neg"])
        return fpr, tpr, auc_from_histograms(entry["pos"], entry["neg"])
    if "fpr" in entry and "tpr" in entry:
        fpr = np.asarray(entry["fpr"], dtype=np.float64)
        tpr = np.asarray(entry["tpr"], dtype=np.float64)
        return fpr, tpr, float(np.trapezoid(tpr, fpr))
    raise DataError("ROC entry needs pos/neg histograms or fpr/tpr",
                    safe_reason="invalid report data")


def plot_roc(roc: Mapping[str, Any], *, title: str = "ROC") -> Figure:
    """Pooled ROC curve (thick) and one thin curve per site.

    Parameters
    ----------
    roc
        ``{"pooled": {"pos": [...], "neg": [...]}, "sites": {name: {"pos", "neg"}}}``; either
        part may be absent; ``{"fpr", "tpr"}`` may replace ``{"pos", "neg"}``.
    """
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    for name, entry in sorted((roc.get("sites") or {}).items()):
        fpr, tpr, auc = _curve(entry)
        ax.plot(fpr, tpr, lw=1.0, alpha=0.8, label=f"{name} (AUC {auc:.3f})")
    if roc.get("pooled"):
        fpr, tpr, auc = _curve(roc["pooled"])
        ax.plot(fpr, tpr, lw=2.5, color="black", label=f"pooled (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity",
           title=title)
    ax.legend(loc="lower right", fontsize=7)
    return fig


def plot_calibration(cal: Mapping[str, Any], *, title: str = "Calibration") -> Figure:
    """Reliability diagram: observed frequency vs mean predicted probability per bin.

    ``cal`` is :func:`common.stats.calibration.reliability_diagram` output (``mean_score``,
    ``observed``, ``count``; empty bins are ``None``). Marker area grows with the bin count.
    """
    ms, ob, ct = cal.get("mean_score"), cal.get("observed"), cal.get("count")
    if ms is None or ob is None or ct is None or not len(ms) == len(ob) == len(ct):
        raise DataError("calibration needs mean_score, observed and count lists of equal length",
                        safe_reason="invalid report data")
    keep = [i for i in range(len(ms)) if ms[i] is not None and ob[i] is not None and ct[i]]
    x = np.array([ms[i] for i in keep], dtype=float)
    y = np.array([ob[i] for i in keep], dtype=float)
    c = np.array([ct[i] for i in keep], dtype=float)
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8, label="perfect calibration")
    if x.size:
        ax.plot(x, y, color="tab:blue", lw=1.2)
        ax.scatter(x, y, s=20 + 200 * c / c.max(), color="tab:blue", zorder=3, label="bins")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability",
           ylabel="observed frequency", title=title)
    ax.legend(loc="upper left", fontsize=7)
    return fig


def plot_forest(meta: Mapping[str, Any], *, title: str = "Forest plot") -> Figure:
    """Forest plot of per-site estimates with CIs and the pooled random-effects estimate.

    ``meta`` is :meth:`common.stats.meta.MetaResult.as_dict` output (``sites`` with
    ``site``/``estimate``/``lower``/``upper``/``weight``; ``pooled``; ``tau2``; ``i2``).
    """
    sites: Sequence[Mapping[str, Any]] = meta.get("sites") or []
    pooled = meta.get("pooled")
    if not sites or not pooled:
        raise DataError("forest plot needs per-site estimates and a pooled estimate",
                        safe_reason="invalid report data")
    k = len(sites)
    fig = Figure(figsize=(5.5, 1.2 + 0.35 * (k + 2)))
    ax = fig.add_subplot()
    ys = np.arange(k, 0, -1) + 1
    for yv, row in zip(ys, sites, strict=True):
        est, lo, hi = row.get("estimate"), row.get("lower"), row.get("upper")
        if est is None:
            continue
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [yv, yv], color="black", lw=1)
        w = row.get("weight") or 1.0 / k
        ax.plot(est, yv, "s", color="tab:blue", markersize=4 + 10 * math.sqrt(w))
    pe, pl, pu = pooled.get("estimate"), pooled.get("lower"), pooled.get("upper")
    if pe is not None and pl is not None and pu is not None:
        ax.fill([pl, pe, pu, pe], [1, 1.25, 1, 0.75], color="tab:red")
        ax.axvline(pe, color="tab:red", ls="--", lw=0.7)
    labels = [str(r.get("site", "")) for r in sites] + ["pooled (RE)"]
    ax.set_yticks(list(ys) + [1], labels)
    ax.set_ylim(0.4, k + 1.6)
    tau2, i2 = meta.get("tau2"), meta.get("i2")
    sub = ""
    if tau2 is not None and i2 is not None:
        sub = f"  (tau2 {tau2:.2g}, I2 {100 * i2:.0f}%)"
    ax.set_title(title + sub, fontsize=9)
    ax.set_xlabel("estimate (95% CI)" if meta.get("alpha", 0.05) == 0.05 else "estimate")
    return fig


def _fmt(v: Any) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "&ndash;" if not math.isfinite(v) else f"{v:.4g}"
    return html.escape(str(v))


def format_cell(v: Any) -> str:
    """A value or an interval dict ``{"value", "lower", "upper"}`` as table-cell HTML."""
    if isinstance(v, Mapping) and "value" in v:
        lo, hi = v.get("lower"), v.get("upper")
        ci = f" [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None and hi is not None else ""
        return f"{_fmt(v.get('value'))}{ci}"
    if isinstance(v, Mapping):
        return ", ".join(f"{html.escape(str(a))}: {format_cell(b)}" for a, b in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(format_cell(x) for x in v)
    return _fmt(v)


def cv_table_html(cv: Mapping[str, Any]) -> str:
    """HTML table of cross-validation results: one row per fold and a pooled row.

    ``cv = {"folds": [{"fold": 1, "auc": {"value", "lower", "upper"}, "n": ..., ...}],
    "pooled": {"auc": {...}, ...}}``; columns are the union of keys over rows (``fold`` first),
    intervals render as ``value [lower, upper]``. All text is HTML-escaped.
    """
    folds: Sequence[Mapping[str, Any]] = cv.get("folds") or []
    pooled: Mapping[str, Any] = cv.get("pooled") or {}
    cols: list[str] = []
    for row in [*folds, pooled]:
        for key in row:
            if key != "fold" and key not in cols:
                cols.append(key)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["fold", *cols])
    body = []
    for row in folds:
        cells = "".join(f"<td>{format_cell(row.get(c))}</td>" for c in cols)
        body.append(f"<tr><td>{_fmt(row.get('fold'))}</td>{cells}</tr>")
    if pooled:
        cells = "".join(f"<td>{format_cell(pooled.get(c))}</td>" for c in cols)
        body.append(f'<tr class="pooled"><td>pooled</td>{cells}</tr>')
    return (f'<table class="cv"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")
