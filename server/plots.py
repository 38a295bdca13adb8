"""Figures for the run report, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Every plot function takes the JSON-ready structures of the ``inference`` section of
``report.json`` (see :mod:`server.report_html`) and returns a :class:`matplotlib.figure.Figure`;
:func:`figure_png` turns one into PNG bytes. Figures are created with the object-oriented API
(``Figure`` + ``FigureCanvasAgg``), so nothing touches pyplot's global state or a display,
and no figure outlives the call that renders it.
"""

from __future__ import annotations

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
from server.report_text import cv_table_html, format_cell

__all__ = ["cv_table_html", "figure_png", "format_cell", "plot_calibration", "plot_epsilon",
           "plot_forest", "plot_roc", "plot_training", "roc_from_histograms"]

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


#: Above this many sites, their curves are thin faint lines sharing one legend entry.
ROC_LABELLED_SITES = 12


def _has_both_classes(entry: Mapping[str, Any]) -> bool:
    if "pos" in entry and "neg" in entry:
        return float(np.sum(entry["pos"])) > 0 and float(np.sum(entry["neg"])) > 0
    return True


def plot_roc(roc: Mapping[str, Any], *, title: str = "ROC") -> Figure:
    """Pooled ROC curve (thick) and one thin curve per site.

    A site whose held-out patients are all of one class has no curve; the legend says how
    many were left out. Beyond :data:`ROC_LABELLED_SITES` sites, their curves are drawn thin
    and faint under one legend entry (a legend of 100 hospitals hides the plot).

    Parameters
    ----------
    roc
        ``{"pooled": {"pos": [...], "neg": [...]}, "sites": {name: {"pos", "neg"}}}``; either
        part may be absent; ``{"fpr", "tpr"}`` may replace ``{"pos", "neg"}``.
    """
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    sites = sorted((roc.get("sites") or {}).items())
    drawable = [(name, entry) for name, entry in sites if _has_both_classes(entry)]
    many = len(drawable) > ROC_LABELLED_SITES
    for i, (name, entry) in enumerate(drawable):
        fpr, tpr, auc = _curve(entry)
        if many:
            ax.plot(fpr, tpr, lw=0.6, alpha=0.35, color="tab:blue",
                    label=f"{len(drawable)} sites, one line each" if i == 0 else None)
        else:
            ax.plot(fpr, tpr, lw=1.0, alpha=0.8, label=f"{name} (AUC {auc:.3f})")
    if len(drawable) < len(sites):
        ax.plot([], [], " ", label=f"{len(sites) - len(drawable)} site(s) with one class "
                "only: no curve")
    if roc.get("pooled"):
        fpr, tpr, auc = _curve(roc["pooled"])
        ax.plot(fpr, tpr, lw=2.5, color="black", label=f"pooled (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity",
           title=title)
    ax.legend(loc="lower right", fontsize=7)
    return fig


def _reliability_points(cal: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean score, observed frequency, count) of the non-empty bins of a reliability diagram."""
    ms, ob, ct = cal.get("mean_score"), cal.get("observed"), cal.get("count")
    if ms is None or ob is None or ct is None or not len(ms) == len(ob) == len(ct):
        raise DataError("calibration needs mean_score, observed and count lists of equal length",
                        safe_reason="invalid report data")
    keep = [i for i in range(len(ms)) if ms[i] is not None and ob[i] is not None and ct[i]]
    return (np.array([ms[i] for i in keep], dtype=float),
            np.array([ob[i] for i in keep], dtype=float),
            np.array([ct[i] for i in keep], dtype=float))


def plot_calibration(cal: Mapping[str, Any], *, title: str = "Calibration",
                     before: Mapping[str, Any] | None = None) -> Figure:
    """Reliability diagram: observed frequency vs mean predicted probability per bin.

    ``cal`` is :func:`common.stats.calibration.reliability_diagram` output (``mean_score``,
    ``observed``, ``count``; empty bins are ``None``). Marker area grows with the bin count.
    With ``before`` (the same for the scores before recalibration), both curves are drawn:
    ``before`` in orange, ``cal`` (after) in blue.
    """
    curves = [(cal, "after recalibration" if before else "bins", "tab:blue")]
    if before:
        curves.insert(0, (before, "before recalibration", "tab:orange"))
    points = [(_reliability_points(c), name, colour) for c, name, colour in curves]
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8, label="perfect calibration")
    top = max((c.max() for (_, _, c), _, _ in points if c.size), default=1.0)
    for (x, y, c), name, colour in points:
        if x.size:
            ax.plot(x, y, color=colour, lw=1.2)
            ax.scatter(x, y, s=20 + 200 * c / top, color=colour, zorder=3, label=name,
                       alpha=0.85)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability",
           ylabel="observed frequency of the disease", title=title)
    ax.legend(loc="upper left", fontsize=7)
    return fig


def plot_epsilon(series: Mapping[str, Sequence[tuple[int, float]]], *, xlabel: str = "round",
                 target: float | None = None, cap: float | None = None,
                 title: str = "Privacy spent (ε) per hospital") -> Figure:
    """ε against round (or fold) for each site, with the run's target and the cap as lines.

    Parameters
    ----------
    series
        Site name -> ``[(round, epsilon), ...]`` (this run's ε after that round).
    target, cap
        Horizontal reference lines (drawn when given; the cap only when it is within twice
        the largest ε, so that a loose cap does not flatten the curves).
    """
    fig = Figure(figsize=(5.0, 3.4))
    ax = fig.add_subplot()
    top = 0.0
    for i, (name, points) in enumerate(sorted(series.items())):
        if not points:
            continue
        xs, ys = zip(*sorted(points), strict=True)
        top = max(top, max(ys))
        # Sites often spend the same ε: distinct markers and dashes keep overlaps visible.
        ax.plot(xs, ys, marker="osD^v<>"[i % 7], markersize=7 - (i % 3) * 1.5, lw=1.4,
                ls=("-", "--", ":", "-.")[i % 4], label=str(name), alpha=0.9)
    if target is not None and math.isfinite(target):
        ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target ε = {target:g}")
        top = max(top, target)
    if cap is not None and math.isfinite(cap) and cap <= 2 * max(top, 1e-9):
        ax.axhline(cap, color="tab:red", ls=":", lw=1.0, label=f"cap ε = {cap:g}")
        top = max(top, cap)
    ax.set(xlabel=xlabel, ylabel="ε (patient level)", title=title, ylim=(0, 1.1 * top or 1))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_training(rounds: Sequence[Mapping[str, Any]], *, loss_label: str = "cross-entropy loss",
                  metric_label: str | None = "AUC", bounded: bool = True) -> Figure:
    """Per-round curves: training and validation loss (left), a validation metric (right).

    ``rounds`` are ``{"round", "train_loss", "val_loss", "val_metric"}`` rows (``None`` where
    a value is missing; ``val_auc`` is read when ``val_metric`` is absent). ``metric_label``
    names the metric (None: the loss panel alone); ``bounded`` puts it on a [0, 1] axis.
    """
    fig = Figure(figsize=(9.0, 3.4) if metric_label else (4.8, 3.4))
    left = fig.add_subplot(1, 2, 1) if metric_label else fig.add_subplot(1, 1, 1)
    right = fig.add_subplot(1, 2, 2) if metric_label else None

    def line(ax: Any, key: str, name: str, colour: str) -> None:
        pts = [(r["round"], r.get(key)) for r in rounds
               if r.get(key) is not None and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", markersize=4, color=colour, label=name)

    line(left, "train_loss", "training loss", "tab:blue")
    line(left, "val_loss", "validation loss", "tab:orange")
    left.set(xlabel="round", ylabel=loss_label, title="Loss")
    axes = [left]
    if right is not None:
        key = "val_metric" if any("val_metric" in r for r in rounds) else "val_auc"
        line(right, key, f"validation {metric_label}", "tab:green")
        right.set(xlabel="round", ylabel=metric_label, title=f"Validation {metric_label}")
        if bounded:
            right.set_ylim(0, 1.02)
        axes.append(right)
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
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
    labels = [str(r.get("site", "")) for r in sites] + ["pooled (random effects)"]
    ax.set_yticks(list(ys) + [1], labels)
    ax.set_ylim(0.4, k + 1.6)
    tau2, i2 = meta.get("tau2"), meta.get("i2")
    sub = ""
    if tau2 is not None and i2 is not None:
        sub = f"  (τ² {tau2:.2g}, I² {100 * i2:.0f}%)"
    ax.set_title(title + sub, fontsize=9)
    ax.set_xlabel("estimate (95% CI)" if meta.get("alpha", 0.05) == 0.05 else "estimate")
    return fig
