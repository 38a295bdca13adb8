"""``report.html``: one self-contained page for people (images inline, CSS inline, no links).

:func:`render_report_html` reads the report dict (the content of ``report.json``) and writes a
single HTML file whose figures are PNGs embedded as ``data:image/png;base64,...`` URIs. The
page loads nothing from anywhere, so it can be archived or mailed to a review board as is.
It is written atomically (temporary file in the same folder, then :func:`os.replace`).

Schema of the ``inference`` section (every part optional; a part that is absent is skipped,
unknown parts are shown as a plain key/value table)::

    "inference": {
      "split": "test",
      "metrics": {                                  # common.stats Estimate.as_dict()
        "auc": {"value": 0.81, "lower": 0.77, "upper": 0.85, "se": 0.02, "n": 900,
                "method": "delong"},
        "accuracy": {...}, "sensitivity": {...}, "specificity": {...},
        "precision": {...}, "f1": {...}, "brier": 0.17, "ece": 0.03
      },
      "roc": {                                      # per-class histograms on the same edges
        "pooled": {"pos": [...], "neg": [...]},     # or {"fpr": [...], "tpr": [...]}
        "sites": {"site-a": {"pos": [...], "neg": [...]}, ...}
      },
      "calibration": {                              # calibration.reliability_diagram() output
        "bin_lower": [...], "bin_upper": [...], "mean_score": [...], "observed": [...],
        "count": [...],
        "brier": 0.17, "ece": 0.03,                 # optional extras shown under the plot
        "intercept": {...Estimate...}, "slope": {...Estimate...}
      },
      "meta": {"auc": MetaResult.as_dict(), "sensitivity": MetaResult.as_dict()},
      "cv": {"metric": "auc",
             "folds": [{"fold": 1, "auc": {...Estimate...}, "n": 180, "epsilon": 2.1}, ...],
             "pooled": {"auc": {...Estimate...}, "n": 900}},
      "tests": {"paired_delong": {"auc_a": ..., "p": ...}, "mcnemar": {...}},
      "selection": SelectionResult.as_dict(),
      "glm": LogisticFit.as_dict(),
      "conformal": {...}, "uncertainty": {...}, "power": {...}
    }

Besides ``inference`` the page shows ``status``, ``run_id`` and, if present, ``final.auc_pooled``.
All text from the report is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy.typing as npt
from matplotlib.figure import Figure

from common.errors import VesaliusError
from common.stats.calibration import (
    brier_from_sums,
    expected_calibration_error,
    reliability_diagram,
)
from common.stats.glm import LogisticFit
from common.stats.histogram import compress_histograms
from server.plots import (
    format_cell,
    cv_table_html,
    figure_png,
    plot_calibration,
    plot_forest,
    plot_roc,
)

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1000px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}tr.pooled{font-weight:bold;background:#f8f8ff}
img{max-width:100%;height:auto}.figs{display:flex;flex-wrap:wrap;gap:1em}
.note{color:#666;font-size:.85em}pre{background:#f6f6f6;padding:.5em;overflow-x:auto}
"""


def _img(fig: Figure, alt: str) -> str:
    data = base64.b64encode(figure_png(fig)).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _kv_table(d: Mapping[str, Any]) -> str:
    rows = []
    for key, v in d.items():
        if isinstance(v, (list, tuple)) and len(v) > 20:
            v = f"({len(v)} values)"
        elif isinstance(v, (list, tuple)):
            v = ", ".join(str(x) for x in v)
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td>{format_cell(v)}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _safe(render: Callable[[], str], what: str) -> str:
    """Render one part; a malformed part becomes a note instead of failing the whole page."""
    try:
        return render()
    except (VesaliusError, ValueError, TypeError, KeyError) as exc:
        log.warning("report.html: %s not rendered: %s", what, exc)
        return f'<p class="note">{html.escape(what)} could not be rendered.</p>'


def _metrics(m: Mapping[str, Any]) -> str:
    head = "<tr><th>metric</th><th>estimate [95% CI]</th><th>n</th><th>method</th></tr>"
    rows = []
    for name, v in m.items():
        if isinstance(v, Mapping):
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{format_cell(v)}</td>"
                        f"<td>{format_cell(v.get('n'))}</td>"
                        f"<td>{format_cell(v.get('method'))}</td></tr>")
        else:
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{format_cell(v)}</td><td></td>"
                        "<td></td></tr>")
    return f'<table class="metrics">{head}{"".join(rows)}</table>'


def _calibration(cal: Mapping[str, Any]) -> str:
    extras = {k: cal[k] for k in ("brier", "ece", "intercept", "slope") if k in cal}
    return _img(plot_calibration(cal), "calibration plot") + (_kv_table(extras) if extras else "")


def _meta(name: str, meta: Mapping[str, Any]) -> str:
    """Forest plot plus the same numbers as a table (site, estimate [CI], weight)."""
    rows = ""
    for r in meta.get("sites") or []:
        if isinstance(r, Mapping):
            ci = {"value": r.get("estimate"), "lower": r.get("lower"), "upper": r.get("upper")}
            rows += (f"<tr><td>{html.escape(str(r.get('site')))}</td><td>{format_cell(ci)}</td>"
                     f"<td>{format_cell(r.get('weight'))}</td></tr>")
    pooled = meta.get("pooled") or {}
    rows += (f'<tr class="pooled"><td>pooled (RE)</td>'
             f"<td>{format_cell({'value': pooled.get('estimate'), **pooled})}</td><td>1</td></tr>")
    stats = {k: meta.get(k) for k in ("tau2", "i2", "q", "q_pvalue", "k", "scale")
             if k in meta}
    head = "<tr><th>site</th><th>estimate [CI]</th><th>weight</th></tr>"
    scale = " (logit scale, back-transformed)" if meta.get("scale") == "logit" else ""
    return (f"<div><h3>{html.escape(name)} by site{scale}</h3>"
            + _img(plot_forest(meta, title=f"{name} by site"), f"forest plot {name}")
            + f"<table>{head}{rows}</table>{_kv_table(stats)}</div>")


def _glm(g: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(c.get('name')))}</td><td>{format_cell(c.get('coef'))}</td>"
        f"<td>{format_cell(c.get('se'))}</td><td>{format_cell(c.get('ci_lower'))}, "
        f"{format_cell(c.get('ci_upper'))}</td><td>{format_cell(c.get('p'))}</td></tr>"
        for c in g.get("coefficients", []))
    head = "<tr><th>term</th><th>coef</th><th>SE</th><th>Wald CI</th><th>p</th></tr>"
    rest = {k: v for k, v in g.items() if k != "coefficients"}
    return f"<table>{head}{rows}</table>{_kv_table(rest)}"


def _is_meta(v: Any) -> bool:
    return isinstance(v, Mapping) and "pooled" in v and "sites" in v


def _is_estimate(v: Any) -> bool:
    return isinstance(v, Mapping) and "value" in v and "lower" in v


def _rows_table(rows: list[Mapping[str, Any]]) -> str:
    """A list of dicts as one table (columns: union of keys, in order of appearance)."""
    cols: list[str] = []
    for r in rows:
        cols += [str(c) for c in r if str(c) not in cols]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{format_cell(r.get(c))}</td>" for c in cols)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _generic(value: Any) -> str:
    """Any JSON value as HTML: tables for dicts and lists of dicts, escaped text otherwise."""
    if isinstance(value, Mapping):
        flat = {k: v for k, v in value.items()
                if not (isinstance(v, Mapping) and not _is_estimate(v))
                and not (isinstance(v, list) and v and isinstance(v[0], Mapping))}
        nested = [(k, v) for k, v in value.items() if k not in flat]
        return ((_kv_table(flat) if flat else "")
                + "".join(f"<h3>{html.escape(str(k))}</h3>{_generic(v)}" for k, v in nested))
    if isinstance(value, list) and value and all(isinstance(r, Mapping) for r in value):
        return _rows_table(value)
    return f"<p>{format_cell(value)}</p>"


def _cv(cv: Mapping[str, Any]) -> str:
    rest = {k: v for k, v in cv.items() if k not in ("folds", "pooled", "fold_details")}
    out = cv_table_html(cv) + (_kv_table(rest) if rest else "")
    for d in cv.get("fold_details") or []:
        if isinstance(d, Mapping):
            out += (f"<details><summary>fold {format_cell(d.get('fold'))} details</summary>"
                    f"{_generic(d)}</details>")
    return out


def build_html(report: Mapping[str, Any]) -> str:
    """The full HTML page for ``report`` (see the module docstring for the schema).

    Also accepted, as produced by the coordinator's pooled-metrics flow: a top-level ``auc``
    interval (shown first in the metrics table), ``calibration.bins`` holding the reliability
    diagram, and ``meta_<name>`` meta-analysis results beside ``meta``. Any other part is shown
    as tables.
    """
    inf: Mapping[str, Any] = report.get("inference") or {}
    parts = [f"<h1>Vesalius report</h1><p>status: {format_cell(report.get('status'))}"
             f" &middot; run: {format_cell(report.get('run_id'))}"
             + (f" &middot; held-out split: {format_cell(inf.get('split'))}"
                if inf.get("split") else "")
             + "</p>"]
    final = report.get("final") or {}
    if isinstance(final, Mapping) and final.get("auc_pooled") is not None:
        parts.append(f"<p>final pooled AUC: {format_cell(final.get('auc_pooled'))}</p>")
    if not inf:
        parts.append('<p class="note">This report has no inference section.</p>')
    handled = {"split"}
    metrics: dict[str, Any] = {}
    if _is_estimate(inf.get("auc")):
        metrics["auc"] = inf["auc"]
        handled.add("auc")
    if isinstance(inf.get("metrics"), Mapping):
        metrics.update(inf["metrics"])
        handled.add("metrics")
    if metrics:
        parts.append(_section("Metrics (pooled over sites)",
                              _safe(lambda: _metrics(metrics), "metrics")))
    figs = []
    roc = inf.get("roc")
    if isinstance(roc, Mapping):
        handled.add("roc")
        if roc.get("pooled") or roc.get("sites"):
            figs.append(_safe(lambda: _img(plot_roc(roc), "ROC curves"), "ROC curves"))
    cal = inf.get("calibration")
    if isinstance(cal, Mapping):
        handled.add("calibration")
        if isinstance(cal.get("bins"), Mapping):
            cal = {**cal["bins"], **{k: v for k, v in cal.items() if k != "bins"}}
        figs.append(_safe(lambda: _calibration(cal), "calibration plot"))
    if figs:
        parts.append(_section("ROC and calibration", f'<div class="figs">{"".join(figs)}</div>'))
    metas = {str(n): m for n, m in (inf.get("meta") or {}).items() if _is_meta(m)}
    handled.add("meta")
    for key, value in inf.items():
        if key.startswith("meta_"):
            handled.add(key)
            if _is_meta(value):
                metas[key[len("meta_"):]] = value
    if metas:
        forest = [_safe(lambda meta=meta, name=name: _meta(name, meta), f"forest plot {name}")
                  for name, meta in metas.items()]
        parts.append(_section("Between-site heterogeneity (random effects, DerSimonian-Laird)",
                              f'<div class="figs">{"".join(forest)}</div>'))
    if isinstance(inf.get("cv"), Mapping):
        metric = inf["cv"].get("metric")
        title = "Cross-validation" + (f" ({metric})" if metric else "")
        parts.append(_section(title, _safe(lambda: _cv(inf["cv"]), "CV table")))
        handled.add("cv")
    if isinstance(inf.get("glm"), Mapping):
        parts.append(_section("Logistic regression (federated Newton-Raphson)",
                              _safe(lambda: _glm(inf["glm"]), "GLM table")))
        handled.add("glm")
    scalars = {k: v for k, v in inf.items() if k not in handled
               and not isinstance(v, (Mapping, list))}
    if scalars:
        parts.append(_section("Details", _kv_table(scalars)))
    for key, value in inf.items():
        if key in handled or key in scalars or value in (None, [], {}):
            continue
        parts.append(_section(key.replace("_", " ").capitalize(),
                              _safe(lambda value=value: _generic(value), key)))
    parts.append('<p class="note">All figures and numbers come from statistics released by the '
                 "sites (sums and counts); no per-patient value is included.</p>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>Vesalius report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")


def roc_section(
    pooled: tuple[npt.ArrayLike, npt.ArrayLike],
    sites: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]] | None = None,
) -> dict[str, Any]:
    """The ``inference.roc`` part from pooled and per-site ``(pos, neg)`` histograms.

    Bins empty in both classes are dropped (:func:`common.stats.histogram.compress_histograms`),
    which keeps the curves and AUCs and keeps ``report.json`` small.
    """
    def part(h: tuple[npt.ArrayLike, npt.ArrayLike]) -> dict[str, list[int]]:
        p, n = compress_histograms(*h)
        return {"pos": p.tolist(), "neg": n.tolist()}

    out: dict[str, Any] = {"pooled": part(pooled)}
    if sites:
        out["sites"] = {str(name): part(h) for name, h in sites.items()}
    return out


def calibration_section(
    sums: Mapping[str, Any], *, edges: npt.ArrayLike | None = None,
    fit: LogisticFit | None = None,
) -> dict[str, Any]:
    """The ``inference.calibration`` part from pooled calibration sums (and optionally the
    calibration intercept/slope fit of :func:`common.stats.calibration.fit_calibration`)."""
    out: dict[str, Any] = dict(reliability_diagram(sums, edges=edges))
    out["brier"] = brier_from_sums(sums)
    out["ece"] = expected_calibration_error(sums)
    if fit is not None:
        for i, name in enumerate(fit.names):
            out[name] = {"value": float(fit.coef[i]), "lower": float(fit.ci_lower[i]),
                         "upper": float(fit.ci_upper[i]), "se": float(fit.se[i]),
                         "method": "wald"}
    return out


def render_report_html(report: Mapping[str, Any], path: Path) -> Path:
    """Write the self-contained HTML report for ``report`` to ``path`` atomically.

    Parameters
    ----------
    report
        The report dict (``report.json`` content) with an optional ``inference`` section.
    path
        Target file (e.g. ``out_dir / REPORT_HTML``); its folder must exist.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    page = build_html(report)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".report-", suffix=".html.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_report_html(report: Mapping[str, Any], path: Path) -> Path | None:
    """:func:`render_report_html`, but a failure is logged, never raised.

    The plots are an extra beside ``report.json``; a run or a cross-validation must not be lost
    because one could not be drawn.
    """
    try:
        return render_report_html(report, path)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logging.getLogger(__name__).warning("report.html could not be written: %s", exc)
        return None
