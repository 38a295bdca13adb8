"""Report fragments for the multi-class, ordinal and multi-label tasks.

Each function reads one ``inference`` section (:func:`server.inference_multiclass.
multiclass_inference`, :func:`server.inference_ordinal.ordinal_inference`,
:func:`server.inference_multilabel.multilabel_inference`) and renders it for people:

* ``report.html``: :func:`ordinal_section_html`, :func:`multilabel_section_html` and
  :func:`multiclass_plots_html` (escaped HTML; plots drawn with matplotlib's Agg canvas and
  embedded as PNG by :func:`server.report_tables.img`);
* ``summary.txt``: :func:`ordinal_summary_lines`, :func:`multilabel_summary_lines`;
* the CLI: :func:`ordinal_rows`, :func:`multilabel_rows` (``(label, value)`` pairs of plain
  text for a two-column table).

A missing or failed section gives ``""`` (HTML) or a one-line reason; no function raises on a
partial section. Every number shown is a pooled count or an estimate computed from pooled
sums (no hospital released a per-patient value); site names and notes are escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from server.plots import roc_from_histograms
from server.report_tables import img
from server.report_tables import site_table
from server.report_text import fmt, fmt_interval, format_cell

__all__ = ["multiclass_plots_html", "multilabel_rows", "multilabel_section_html",
           "multilabel_summary_lines", "ordinal_rows", "ordinal_section_html",
           "ordinal_summary_lines", "plot_confusion", "plot_label_aucs", "plot_ovr_roc"]

_SIZE = (5.0, 4.2)


# --- small readers ----------------------------------------------------------------------------

def _part(section: Mapping[str, Any] | None, key: str) -> Mapping[str, Any]:
    part = section.get(key) if isinstance(section, Mapping) else None
    return part if isinstance(part, Mapping) else {}


def _value(est: Any) -> float | None:
    v = est.get("value") if isinstance(est, Mapping) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _text(est: Any, digits: int = 3) -> str:
    """``0.812 (95% CI 0.70-0.90)`` as plain text; ``-`` when undefined."""
    v = _value(est)
    if v is None:
        return "-"
    lo, hi = est.get("lower"), est.get("upper")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        return f"{v:.{digits}f} (95% CI {lo:.{digits}f}-{hi:.{digits}f})"
    return f"{v:.{digits}f}"


def _cell(est: Any) -> str:
    return fmt_interval(est) if _value(est) is not None else fmt(None)


def _notes(section: Mapping[str, Any]) -> str:
    return "".join(f'<p class="note">{fmt(section[key])}.</p>'
                   for key in ("metrics_note", "auc_note") if section.get(key))


def _failed(section: Mapping[str, Any], what: str) -> str:
    return (f'<p class="note">No pooled {html.escape(what)} results: '
            f'{fmt(section.get("reason") or "the section is missing")}.</p>')


# --- plots ---------------------------------------------------------------------------------

def plot_confusion(confusion: Sequence[Sequence[int]], *, title: str, true_label: str,
                   predicted_label: str) -> Figure:
    """Heat map of a confusion matrix: colour = share of the row (true class), text = count."""
    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black")
    ticks = list(range(cm.shape[0]))
    ax.set(xticks=ticks, yticks=ticks, xlabel=predicted_label, ylabel=true_label, title=title)
    fig.colorbar(im, ax=ax, label="share of the true class's patients")
    return fig


def plot_ovr_roc(curves: Sequence[tuple[str, Any, Any]], *, title: str) -> Figure:
    """One ROC curve per ``(name, positive histogram, negative histogram)``."""
    from common.stats.histogram import auc_from_histograms

    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    for name, pos, neg in curves:
        fpr, tpr = roc_from_histograms(pos, neg)
        ax.plot(fpr, tpr, lw=1.4, label=f"{name} (AUC {auc_from_histograms(pos, neg):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity",
           title=title)
    ax.legend(loc="lower right", fontsize=7)
    return fig


def plot_label_aucs(names: Sequence[str], estimates: Sequence[Any], macro: Any, *,
                    title: str) -> Figure:
    """Forest-style plot: each finding's AUC with its interval, and the macro AUC."""
    fig = Figure(figsize=(_SIZE[0], 1.2 + 0.35 * (len(names) + 1)))
    ax = fig.add_subplot()
    rows = [*zip(names, estimates, strict=True), ("macro", macro)]
    for y, (name, est) in enumerate(reversed(rows)):
        v = _value(est)
        if v is None:
            continue
        lo, hi = est.get("lower"), est.get("upper")
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            ax.plot([lo, hi], [y, y], color="black", lw=1.2)
        ax.plot([v], [y], marker="D" if name == "macro" else "s", color="black")
    ax.axvline(0.5, ls=":", color="grey", lw=0.8)
    ax.set(yticks=list(range(len(rows))), yticklabels=[n for n, _ in reversed(rows)],
           xlim=(0, 1), xlabel="AUC (95% CI)", title=title)
    return fig


def _histogram_curves(mc: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Per-class ``(name, pos, neg)`` from ``histograms`` (``positive``/``negative`` K x B)
    or ``roc`` (a list of ``{"pos", "neg"}``); empty when the section carries neither."""
    hists = mc.get("histograms")
    if isinstance(hists, Mapping) and "positive" in hists and "negative" in hists:
        pairs = list(zip(hists["positive"], hists["negative"], strict=True))
    elif isinstance(mc.get("roc"), list):
        pairs = [(r.get("pos"), r.get("neg")) for r in mc["roc"] if isinstance(r, Mapping)]
    else:
        return []
    out = []
    for i, (pos, neg) in enumerate(pairs):
        p, q = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
        if p.ndim == 1 and p.shape == q.shape and p.sum() > 0 and q.sum() > 0:
            out.append((f"class {i}", p, q))
    return out


# --- multi-class ---------------------------------------------------------------------------

def multiclass_plots_html(section: Mapping[str, Any]) -> str:
    """Confusion heat map and, where per-class histograms are present, one-vs-rest ROCs.

    ``section`` is the multi-class ``inference`` section (or its ``multiclass`` part); its
    per-class histograms are read from ``multiclass.histograms`` (``positive`` and
    ``negative``, K x B counts) or ``multiclass.roc`` (a list of ``{"pos", "neg"}``).
    """
    mc = _part(section, "multiclass") or (section if isinstance(section, Mapping) else {})
    confusion = mc.get("confusion")
    if not isinstance(confusion, list) or not confusion:
        return ""
    parts = [img(plot_confusion(confusion, title="Confusion matrix (test patients)",
                                true_label="true class", predicted_label="arg-max class"),
                 "confusion matrix heat map")]
    curves = _histogram_curves(mc)
    if curves:
        parts.append(img(plot_ovr_roc(curves, title="One-vs-rest ROC per class"),
                         "one-vs-rest ROC curves per class"))
    return f"<div>{''.join(parts)}</div>"


# --- ordinal -------------------------------------------------------------------------------

def _ordinal_table(od: Mapping[str, Any]) -> str:
    rows = [("Quadratic-weighted kappa (Fleiss-Cohen-Everitt CI)", od.get("kappa_quadratic")),
            ("Linear-weighted kappa", od.get("kappa_linear")),
            ("Mean absolute grade error (grades, t CI)", od.get("mae")),
            ("Accuracy (exact grade, Wilson CI)", od.get("accuracy")),
            ("Balanced accuracy", od.get("balanced_accuracy"))]
    body = "".join(f"<tr><th>{html.escape(name)}</th><td>{_cell(est)}</td></tr>"
                   for name, est in rows if isinstance(est, Mapping))
    return f"<table>{body}</table>"


def _per_grade_table(part: Mapping[str, Any], counts_key: str, what: str) -> str:
    sens = part.get("sensitivity") or []
    prec = part.get("precision") or []
    counts = part.get(counts_key) or []
    body = "".join(
        f"<tr><td>{i}</td><td>{fmt(counts[i] if i < len(counts) else None)}</td>"
        f"<td>{format_cell(s) if isinstance(s, Mapping) else fmt(None)}</td>"
        f"<td>{format_cell(prec[i]) if i < len(prec) else fmt(None)}</td></tr>"
        for i, s in enumerate(sens))
    return (f"<table><tr><th>{html.escape(what)}</th><th>Patients</th>"
            "<th>Sensitivity [95% CI]</th><th>Precision [95% CI]</th></tr>"
            f"{body}</table>") if body else ""


def ordinal_section_html(section: Mapping[str, Any]) -> str:
    """The ordinal task's pooled test results: kappa headline, metrics, confusion, sites."""
    if not isinstance(section, Mapping) or section.get("status") != "completed":
        return _failed(section if isinstance(section, Mapping) else {}, "ordinal")
    od = _part(section, "ordinal")
    kappa = od.get("kappa_quadratic")
    sites = section.get("sites") or []
    head = (f'<p class="headline">Pooled test quadratic-weighted kappa: '
            f"<strong>{_cell(kappa)}</strong> on {fmt(section.get('n'))} test patients"
            + (f" from {len(sites)} hospitals" if len(sites) > 1 else "") + ".</p>"
            "<p>A patient's predicted grade is the number of thresholds k whose mean "
            "predicted probability P(grade &gt; k) is at least 0.5. Each hospital released only "
            "its counts of patients per (true grade, predicted grade); every figure below is "
            "computed from their sum.</p>")
    plot = ""
    if isinstance(od.get("confusion"), list) and od["confusion"]:
        plot = img(plot_confusion(od["confusion"], title="True against predicted grade",
                                  true_label="true grade", predicted_label="predicted grade"),
                   "confusion matrix of true against predicted grade")
    return (head + _notes(section) + _ordinal_table(od) + plot
            + _per_grade_table(od, "class_counts", "Grade")
            + site_table(od.get("per_site"), (("n", "Test patients"),
                                               ("kappa_quadratic", "Quadratic kappa"),
                                               ("accuracy", "Accuracy"))))


def ordinal_rows(section: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` rows for the CLI (plain text)."""
    if not isinstance(section, Mapping) or section.get("status") != "completed":
        return [("status", f"failed: {(section or {}).get('reason', '')}")]
    od = _part(section, "ordinal")
    return [("patients", str(section.get("n", 0))),
            ("quadratic-weighted kappa", _text(od.get("kappa_quadratic"))),
            ("linear-weighted kappa", _text(od.get("kappa_linear"))),
            ("mean absolute grade error", _text(od.get("mae"))),
            ("accuracy (exact grade)", _text(od.get("accuracy"))),
            ("balanced accuracy", _text(od.get("balanced_accuracy")))]


def ordinal_summary_lines(section: Mapping[str, Any]) -> list[str]:
    """Lines for ``summary.txt``: kappas, grade error and accuracy (or why there are none)."""
    if not isinstance(section, Mapping) or section.get("status") != "completed":
        reason = (section or {}).get("reason") if isinstance(section, Mapping) else ""
        return [f"ordinal inference failed: {reason or 'no section'}"]
    return [f"test {name}: {value}" for name, value in ordinal_rows(section)[1:]
            if value != "-"]


# --- multi-label ---------------------------------------------------------------------------

def _finding_table(ml: Mapping[str, Any]) -> str:
    auc = _part(ml, "auc")
    per_label = auc.get("per_label") or []
    p_raw, p_holm = auc.get("p_values") or [], auc.get("p_holm") or []
    prevalence, positives = ml.get("prevalence") or [], ml.get("positives") or []
    sens, spec = ml.get("sensitivity") or [], ml.get("specificity") or []

    def at(seq: Sequence[Any], i: int) -> Any:
        return seq[i] if i < len(seq) else None

    n = max(len(prevalence), len(per_label), len(sens))
    body = "".join(
        f"<tr><td>{i}</td><td>{fmt(at(positives, i))}</td><td>{fmt(at(prevalence, i), 3)}</td>"
        f"<td>{_cell(at(per_label, i))}</td><td>{fmt(at(p_raw, i), 3)}</td>"
        f"<td>{fmt(at(p_holm, i), 3)}</td><td>{_cell(at(sens, i))}</td>"
        f"<td>{_cell(at(spec, i))}</td></tr>" for i in range(n))
    return ("<table><tr><th>Finding</th><th>Positive patients</th><th>Prevalence</th>"
            "<th>AUC (95% DeLong CI)</th><th>p (AUC = 0.5)</th><th>p, Holm-adjusted</th>"
            "<th>Sensitivity at 0.5</th><th>Specificity at 0.5</th></tr>"
            f"{body}</table>") if body else ""


def multilabel_section_html(section: Mapping[str, Any]) -> str:
    """The multi-label task's pooled test results: macro AUC, per-finding table and plots."""
    if not isinstance(section, Mapping) or section.get("status") != "completed":
        return _failed(section if isinstance(section, Mapping) else {}, "multi-label")
    ml = _part(section, "multilabel")
    auc = _part(ml, "auc")
    macro = auc.get("macro")
    sites = section.get("sites") or []
    head = (f'<p class="headline">Pooled test macro AUC over {fmt(section.get("labels"))} '
            f"findings: <strong>{_cell(macro)}</strong> on {fmt(section.get('n'))} test "
            "patients" + (f" from {len(sites)} hospitals" if len(sites) > 1 else "") + ".</p>"
            "<p>How it was pooled: each hospital released, per finding, counts of its "
            "patients' scores on fixed fine bins and DeLong placement sums; each finding's AUC "
            "and interval come from the sums, p-values of AUC = 0.5 are Holm-adjusted over the "
            "findings, and the macro AUC's interval uses the findings' DeLong covariance.</p>")
    parts = [head, _notes(section), _finding_table(ml)]
    per_label = auc.get("per_label") or []
    if per_label and _value(macro) is not None:
        names = [f"finding {i}" for i in range(len(per_label))]
        parts.append(img(plot_label_aucs(names, per_label, macro, title="AUC per finding"),
                         "AUC per finding with 95% confidence intervals"))
    curves = [(f"finding {i}", np.asarray(r.get("pos"), float), np.asarray(r.get("neg"), float))
              for i, r in enumerate(ml.get("roc") or []) if isinstance(r, Mapping)]
    curves = [c for c in curves if c[1].size and c[1].sum() > 0 and c[2].sum() > 0]
    if curves:
        parts.append(img(plot_ovr_roc(curves, title="ROC per finding"), "ROC per finding"))
    parts.append(site_table(ml.get("per_site"), (("n", "Test patients"),
                                                  ("macro_auc", "Macro AUC"))))
    return "".join(parts)


def multilabel_rows(section: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` rows for the CLI (plain text): macro AUC, then one row per finding."""
    if not isinstance(section, Mapping) or section.get("status") != "completed":
        return [("status", f"failed: {(section or {}).get('reason', '')}")]
    ml = _part(section, "multilabel")
    auc = _part(ml, "auc")
    rows = [("patients", str(section.get("n", 0))), ("macro AUC", _text(auc.get("macro")))]
    holm = auc.get("p_holm") or []
    prevalence = ml.get("prevalence") or []
    for i, est in enumerate(auc.get("per_label") or []):
        extra = []
        if i < len(prevalence) and prevalence[i] is not None:
            extra.append(f"prevalence {prevalence[i]:.3f}")
        if i < len(holm) and holm[i] is not None:
            extra.append(f"Holm p {holm[i]:.3g}")
        rows.append((f"finding {i} AUC", _text(est) + (f"; {', '.join(extra)}" if extra else "")))
    return rows


def multilabel_summary_lines(section: Mapping[str, Any]) -> list[str]:
    """Lines for ``summary.txt``: macro AUC and each finding's AUC (or why there are none)."""
    if not isinstance(section, Mapping) or section.get("status") != "completed":
        reason = section.get("reason") if isinstance(section, Mapping) else ""
        return [f"multilabel inference failed: {reason or 'no section'}"]
    return [f"test {name}: {value}" for name, value in multilabel_rows(section)[1:]
            if not value.startswith("-")]
