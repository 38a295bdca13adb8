"""Tables of ``report.html``: metrics, meta-analyses, cross-validation, any other JSON part.

Helpers of :mod:`server.report_html`, which assembles the page. Each function turns one part
of ``report.json`` into escaped HTML with human labels (:mod:`server.report_text`); keys in
:data:`INTERNAL` (log-likelihoods, noise flags, node ids, file paths) are never shown, nor are
empty values.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from common.errors import VesaliusError
from server.plots import figure_png, plot_forest
from server.report_sections import operating_point_section
from server.report_text import METHODS, cv_table_html, fmt, format_cell, label, scrub, site_label

__all__ = ["INTERNAL", "config", "cv", "generic", "glm", "img", "is_estimate", "is_meta",
           "kv_table", "meta", "performance", "safe"]

log = logging.getLogger("server.report_html")

INTERNAL = frozenset({"loglik", "mean_loglik", "noised", "ledger_heads", "node_id",
                       "unit-weight", "report", "source", "html",
                       "roc"})  # per-class histograms: drawn as ROC curves, never tabulated

CONFIG_KEYS = ("model", "num-server-rounds", "local-epochs", "batch-size", "learning-rate",
                "target-epsilon", "max-grad-norm", "noise-multiplier", "image-size", "seed",
                "min-nodes", "fraction-train", "fraction-evaluate", "hospital-dp-noise",
                "hospital-dp-clip", "cv-folds", "cv-leave-one-site-out", "target-sensitivity",
                "task", "num-classes", "samples", "init-from")
CONFIG_LABELS = {
    "model": "Model", "num-server-rounds": "Rounds", "local-epochs": "Local epochs per round",
    "batch-size": "Expected batch size", "learning-rate": "Learning rate",
    "target-epsilon": "Target ε per hospital", "max-grad-norm": "Per-patient clipping norm",
    "noise-multiplier": "Fixed noise multiplier σ (0: derived from the target ε)",
    "image-size": "Image size (pixels)", "seed": "Seed", "min-nodes": "Minimum hospitals",
    "fraction-train": "Share of hospitals training each round",
    "fraction-evaluate": "Share of hospitals evaluating each round",
    "hospital-dp-noise": "Hospital-level DP noise multiplier",
    "hospital-dp-clip": "Hospital-level DP clipping norm", "cv-folds": "Folds",
    "cv-leave-one-site-out": "Leave one hospital out", "target-sensitivity": "Target sensitivity",
    "task": "Learning task", "num-classes": "Classes, grades or findings (K)",
    "samples": "What one sample is", "init-from": "Initialised from checkpoint",
}

def img(fig: Figure, alt: str) -> str:
    data = base64.b64encode(figure_png(fig)).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def empty(v: Any) -> bool:
    return v is None or v == "" or v == [] or v == {}


def kv_table(d: Mapping[str, Any]) -> str:
    rows = []
    for key, v in d.items():
        if empty(v) or str(key) in INTERNAL:
            continue
        if isinstance(v, (list, tuple)) and len(v) > 20:
            v = f"({len(v)} values)"
        rows.append(f"<tr><th>{label(str(key))}</th><td>{format_cell(v)}</td></tr>")
    return f"<table>{''.join(rows)}</table>" if rows else ""


def safe(render: Callable[[], str], what: str) -> str:
    """Render one part; a malformed part becomes a note instead of failing the whole page."""
    try:
        return render()
    except (VesaliusError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("report.html: %s not rendered: %s", what, exc)
        return f'<p class="note">{html.escape(what)} could not be rendered.</p>'


METRIC_ORDER = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1")


def metrics_table(m: Mapping[str, Any], *, skip: frozenset[str] = frozenset()) -> str:
    head = ("<tr><th>Metric</th><th>Estimate [95% CI]</th><th>Patients</th>"
            "<th>Interval</th></tr>")
    names = [n for n in METRIC_ORDER if n in m] + [n for n in m if n not in METRIC_ORDER]
    rows = []
    for name in names:
        v = m[name]
        if name in skip or name == "recall" and "sensitivity" in m:
            continue
        if isinstance(v, Mapping):
            rows.append(f"<tr><td>{label(name)}</td><td>{format_cell(v)}</td>"
                        f"<td>{fmt(v.get('n'))}</td><td>{format_cell(v.get('method'))}</td></tr>")
        else:
            rows.append(f"<tr><td>{label(name)}</td><td>{format_cell(v)}</td><td></td>"
                        "<td></td></tr>")
    return f'<table class="metrics">{head}{"".join(rows)}</table>'


def confusion(c: Mapping[str, Any]) -> str:
    return ("<table><tr><th></th><th>Disease present</th><th>Disease absent</th></tr>"
            f"<tr><th>Predicted positive</th><td>{fmt(c.get('tp'))}</td><td>{fmt(c.get('fp'))}"
            f"</td></tr><tr><th>Predicted negative</th><td>{fmt(c.get('fn'))}</td>"
            f"<td>{fmt(c.get('tn'))}</td></tr></table>")


def performance(inf: Mapping[str, Any]) -> str:
    metrics: dict[str, Any] = {}
    if is_estimate(inf.get("auc")):
        metrics["auc"] = inf["auc"]
    if isinstance(inf.get("metrics"), Mapping):
        metrics.update(inf["metrics"])
    if not metrics:
        return ""
    parts = [safe(lambda: operating_point_section({"inference": inf}), "operating point")]
    if not inf.get("operating_point") and inf.get("threshold") is not None:
        parts.append(f"<p>Threshold metrics count a patient as positive when the model's score "
                     f"is at least {fmt(inf['threshold'])}.</p>")
    n, sites = inf.get("n"), inf.get("sites")
    if n is not None:
        where = f" from {len(sites)} hospitals" if isinstance(sites, list) and sites else ""
        parts.append(f"<p>{fmt(n)} {html.escape(str(inf.get('split') or 'held-out'))} "
                     f"patients{where}; intervals are 95% confidence intervals.</p>")
    skip = frozenset({"brier", "ece"}) if isinstance(inf.get("calibration"), Mapping) else \
        frozenset()
    parts.append(safe(lambda: metrics_table(metrics, skip=skip), "metrics"))
    if isinstance(inf.get("confusion"), Mapping):
        parts.append("<h3>Confusion counts</h3>" + confusion(inf["confusion"]))
    if inf.get("metrics_note"):
        parts.append(f'<p class="note">{fmt(inf["metrics_note"])}.</p>')
    if inf.get("noised") is True:
        parts.append('<p class="note">The hospitals released these statistics with Gaussian '
                     "noise (differentially private); the figures are computed from the noisy "
                     "sums.</p>")
    elif inf.get("noised") is False:
        supp = inf.get("suppressed_cells") or 0
        parts.append('<p class="note">The hospitals released these statistics exactly (no noise,'
                     " no ε guarantee for them: see the privacy section)"
                     + (f"; {fmt(supp)} small cell(s) were suppressed" if supp else "")
                     + ".</p>")
    return "".join(parts)


def meta(name: str, meta: Mapping[str, Any]) -> str:
    """Forest plot plus the same numbers as a table (site, estimate [CI], weight)."""
    rows = ""
    for r in meta.get("sites") or []:
        if isinstance(r, Mapping):
            ci = {"value": r.get("estimate"), "lower": r.get("lower"), "upper": r.get("upper")}
            rows += (f"<tr><td>{html.escape(site_label(r.get('site')))}</td>"
                     f"<td>{format_cell(ci)}</td><td>{fmt(r.get('weight'))}</td></tr>")
    pooled = meta.get("pooled") or {}
    rows += ('<tr class="pooled"><td>pooled (random effects)</td>'
             f"<td>{format_cell({'value': pooled.get('estimate'), **pooled})}</td><td>1</td></tr>")
    stats = {key: meta.get(key) for key in ("tau2", "i2", "q", "q_pvalue", "k") if key in meta}
    head = "<tr><th>Hospital</th><th>Estimate [95% CI]</th><th>Weight</th></tr>"
    scale = " (logit scale, back-transformed)" if meta.get("scale") == "logit" else ""
    title = label(name).split(" (")[0]
    return (f"<div><h3>{title} by hospital{scale}</h3>"
            + img(plot_forest(meta, title=f"{scrub(name).upper() if name == 'auc' else scrub(name)}"
                               " by hospital"), f"forest plot {name}")
            + f"<table>{head}{rows}</table>{kv_table(stats)}</div>")


def glm(g: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{fmt(c.get('name'))}</td><td>{fmt(c.get('coef'))}</td>"
        f"<td>{fmt(c.get('se'))}</td><td>{fmt(c.get('ci_lower'))}, "
        f"{fmt(c.get('ci_upper'))}</td><td>{fmt(c.get('p'))}</td></tr>"
        for c in g.get("coefficients", []))
    head = ("<tr><th>Term</th><th>Coefficient</th><th>Standard error</th><th>Wald 95% CI</th>"
            "<th>p-value</th></tr>")
    rest = {key: v for key, v in g.items() if key != "coefficients"}
    return f"<table>{head}{rows}</table>{kv_table(rest)}"


def is_meta(v: Any) -> bool:
    return isinstance(v, Mapping) and "pooled" in v and "sites" in v


def is_estimate(v: Any) -> bool:
    return isinstance(v, Mapping) and "value" in v and "lower" in v


def site_table(rows: Any, columns: Sequence[tuple[str, str]]) -> str:
    """One row per hospital of a task's ``per_site`` list: ``columns`` are ``(key, title)``;
    estimates with their intervals, missing values as a dash. A note in place of the list
    (e.g. "hidden by secure aggregation") is shown as such."""
    if isinstance(rows, str) and rows:
        return f"<p class=\"note\">Per-hospital rows: {html.escape(rows)}.</p>"
    if not isinstance(rows, list) or not rows:
        return ""
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join(
        f"<tr><td>{html.escape(site_label(r.get('site')))}</td>"
        + "".join(f"<td>{format_cell(r.get(key)) if r.get(key) is not None else fmt(None)}"
                  "</td>" for key, _ in columns) + "</tr>"
        for r in rows if isinstance(r, Mapping))
    return f"<table><tr><th>Hospital</th>{head}</tr>{body}</table>"


def rows_table(rows: list[Mapping[str, Any]]) -> str:
    """A list of dicts as one table (columns: union of keys, in order of appearance)."""
    cols: list[str] = []
    for r in rows:
        cols += [str(c) for c in r if str(c) not in cols and str(c) not in INTERNAL
                 and not all(empty(x.get(c)) for x in rows)]
    head = "".join(f"<th>{label(c)}</th>" for c in cols)

    def cell(r: Mapping[str, Any], c: str) -> str:
        if c == "site":
            return html.escape(site_label(r.get(c), r.get("reason")))
        return format_cell(r.get(c))

    body = "".join("<tr>" + "".join(f"<td>{cell(r, c)}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def generic(value: Any) -> str:
    """Any JSON value as HTML: tables for dicts and lists of dicts, escaped text otherwise."""
    if isinstance(value, Mapping):
        value = {key: v for key, v in value.items() if str(key) not in INTERNAL}
        flat = {key: v for key, v in value.items()
                if not (isinstance(v, Mapping) and not is_estimate(v))
                and not (isinstance(v, list) and v and isinstance(v[0], Mapping))}
        nested = [(key, v) for key, v in value.items() if key not in flat and not empty(v)]
        return (kv_table(flat)
                + "".join(f"<h3>{label(str(key))}</h3>{generic(v)}" for key, v in nested))
    if isinstance(value, list) and value and all(isinstance(r, Mapping) for r in value):
        return rows_table(value)
    return f"<p>{format_cell(value)}</p>"


def fold_details(d: Mapping[str, Any]) -> str:
    parts = []
    if d.get("holdout_site"):
        parts.append(f"<p>Held-out hospital: {html.escape(site_label(d['holdout_site']))}.</p>")
    if d.get("reason"):
        parts.append(f"<p>{fmt(d['reason'])}</p>")
    sites = [r for r in d.get("heldout_by_site") or [] if isinstance(r, Mapping)]
    if sites:
        parts.append("<table><tr><th>Hospital</th><th>Held-out patients</th>"
                     "<th>AUC [95% CI]</th></tr>" + "".join(
                         f"<tr><td>{html.escape(site_label(r.get('site')))}</td>"
                         f"<td>{fmt(r.get('n'))}</td><td>{format_cell(r.get('auc'))}</td></tr>"
                         for r in sites) + "</table>")
    rest = {key: d.get(key) for key in ("run_id", "status", "n_pos", "n_neg",
                                        "train_patients_by_site", "suppressed_cells")}
    parts.append(kv_table(rest))
    if isinstance(d.get("confusion"), Mapping):
        parts.append(confusion(d["confusion"]))
    errors = [e for e in d.get("errors") or [] if isinstance(e, Mapping)]
    if errors:
        parts.append(rows_table(errors))
    return "".join(parts)


def _threshold(point: Any) -> str:
    if not isinstance(point, Mapping) or point.get("threshold") is None:
        return "0.5"
    shown = f"{float(point['threshold']):.4g}"
    return shown if point.get("chosen_on") else f"{shown} ({point.get('note') or 'default'})"


def cv(cv: Mapping[str, Any]) -> str:
    mode = METHODS.get(str(cv.get("mode")), str(cv.get("mode") or "k-fold"))
    out = (f"<p>Design: {html.escape(mode)} cross-validation"
           + (f" with {fmt(cv.get('num_folds'))} folds" if cv.get("num_folds") else "")
           + ". Each fold trains a fresh model and tests it on patients it never saw.</p>")
    out += cv_table_html(cv)
    if cv.get("auc_method"):
        out += f'<p class="note">{label("auc_method")}: {fmt(cv["auc_method"])}.</p>'
    method = str(cv.get("metric_ci_method", ""))
    if "wilson" in method:
        points = [d.get("operating_point") for d in cv.get("fold_details") or []
                  if isinstance(d, Mapping)]
        chosen = [p for p in points if isinstance(p, Mapping) and p.get("chosen_on")]
        where = ("at the score threshold 0.5" if "0.5" in method or not chosen else
                 "at each fold's decision threshold on its model's score, chosen on the "
                 "validation patients of the fold's training hospitals (Youden's J, or the "
                 "run's target sensitivity), never on the held-out ones: "
                 + ", ".join(f"fold {fmt(d.get('fold'))} {_threshold(d.get('operating_point'))}"
                             for d in cv.get("fold_details") or [] if isinstance(d, Mapping))
                 + "; the pooled row adds the folds' counts")
        out += ('<p class="note">Accuracy, sensitivity and specificity: Wilson score '
                f"intervals, {html.escape(where)}.</p>")
    out += ('<p class="note">The pooled row pools all held-out patients, each scored by its own '
            "fold's model; differences between the folds' score scales lower its AUC.</p>")
    from server.report_tasks import CV_RAW_THRESHOLD_NOTE, cv_notes  # it imports this module

    if CV_RAW_THRESHOLD_NOTE in cv_notes(cv):
        note = CV_RAW_THRESHOLD_NOTE[0].upper() + CV_RAW_THRESHOLD_NOTE[1:]
        out += f'<p class="note">{html.escape(note)}</p>'
    for d in cv.get("fold_details") or []:
        if isinstance(d, Mapping):
            out += (f"<details><summary>fold {fmt(d.get('fold'))} details</summary>"
                    f"{fold_details(d)}</details>")
    return out


def config(report: Mapping[str, Any]) -> str:
    cfg = report.get("config")
    if not isinstance(cfg, Mapping):
        return ""
    rows = "".join(f"<tr><th>{html.escape(CONFIG_LABELS.get(key, key))}</th>"
                   f"<td>{fmt(cfg[key])}</td></tr>" for key in CONFIG_KEYS
                   if key in cfg and not empty(cfg[key])
                   and not (key.startswith(("hospital-dp", "target-sens")) and not cfg[key]))
    return f"<table>{rows}</table>" if rows else ""
