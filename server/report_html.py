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

The calibration part may also hold ``before`` and ``after`` reliability diagrams (both are
plotted) and ``inference.operating_point`` the decision threshold (method, threshold,
temperature, validation counts); both are optional.

Besides ``inference`` the page has, in this order (:data:`SECTION_IDS`, each a ``<section
id=...>`` with an ``<h2>``): the headline (one pooled AUC with how it was pooled, and every
other AUC labelled with what it estimates, :mod:`server.report_sections`), the privacy section
(ε per hospital and per round, δ, σ, cap, dataset ε, accountants, ledger heads, hospital-level
DP; :mod:`server.report_privacy`), training curves per round and the final model's selection
(``model_selection``), test performance, ROC and calibration, results by hospital, the
between-hospital meta-analyses, cross-validation, problems (refusals and errors by site name)
and the run configuration. No internal key and no Flower node id is shown
(:mod:`server.report_text`); all text from the report is HTML-escaped.
"""

from __future__ import annotations

import html
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy.typing as npt

from common.stats.calibration import (
    brier_from_sums,
    expected_calibration_error,
    reliability_diagram,
)
from common.stats.glm import LogisticFit
from common.stats.histogram import compress_histograms
from server import report_tables as tables
from server.plots import plot_roc
from server.report_privacy import privacy_section
from server.report_sections import (
    calibration_section_html,
    headline_section,
    problems_section,
    selection_section,
    site_results_section,
    training_section,
)
from server.report_text import fmt, label, site_label

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"

SECTION_IDS = {
    "result": "Result", "privacy": "Privacy", "training": "Training",
    "performance": "Test performance (pooled over hospitals)", "figures": "ROC and calibration",
    "sites": "Results by hospital", "heterogeneity": "Differences between hospitals",
    "cv": "Cross-validation", "problems": "Problems during the run",
    "configuration": "Run configuration",
}
"""Anchor id -> heading of the page's fixed sections (in page order; absent parts are
skipped)."""

# Keys of ``inference`` that are shown by a dedicated part of the page, or are internal
# (log-likelihoods, noise flags, node ids, notes rendered as sentences).
_HANDLED = frozenset({
    "split", "auc", "metrics", "roc", "calibration", "meta", "cv", "glm", "operating_point",
    "auc_sites", "sites", "failures", "ledger_heads", "status", "reason", "n", "alpha",
    "threshold", "auc_note", "metrics_note", "noised", "suppressed_cells", "confusion",
    "loglik", "mean_loglik",
})
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1000px;
color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.6em}
h3{font-size:1.02em;margin-top:1.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr.pooled{font-weight:bold;background:#f8f8ff}
img{max-width:100%;height:auto}.figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.note{color:#666;font-size:.85em}.warn{background:#fff4d6;border-left:4px solid #e0a000;padding:.5em .8em}pre{background:#f6f6f6;padding:.5em;overflow-x:auto}
.headline{font-size:1.25em}code{font-size:.85em;word-break:break-all}
.numbers td{white-space:nowrap}.figs>div{flex:1 1 440px;min-width:0}
"""


def _section(key: str, body: str, title: str | None = None) -> str:
    heading = title or SECTION_IDS.get(key, key)
    return f'<section id="{html.escape(key)}"><h2>{html.escape(heading)}</h2>{body}</section>'


def _intro(report: Mapping[str, Any], inf: Mapping[str, Any]) -> str:
    is_cv = report.get("kind") == "cross-validation"
    title = "Vesalius report: federated cross-validation" if is_cv else \
        "Vesalius report: federated training run"
    bits = [f"status: {fmt(report.get('status'))}"]
    if report.get("run_id"):
        bits.append(f"run: {fmt(report.get('run_id'))}")
    names = sorted({site_label(r.get("site")) for r in report.get("sites") or []
                    if isinstance(r, Mapping)})
    if not names and isinstance(inf.get("sites"), list):
        names = sorted(site_label(s) for s in inf["sites"])
    if names:
        bits.append(f"{len(names)} hospitals: {html.escape(', '.join(names))}")
    if inf.get("split") and not is_cv:
        bits.append(f"held-out split: {fmt(inf.get('split'))}")
    out = f"<h1>{title}</h1><p>{' &middot; '.join(bits)}</p>"
    if report.get("reason"):
        out += f'<p class="note">{fmt(report.get("reason"))}</p>'
    if inf.get("status") == "failed" and inf.get("reason"):
        out += (f'<p class="note">The pooled statistics could not be computed: '
                f"{fmt(inf.get('reason'))}</p>")
    return out


def _overlays(report: Mapping[str, Any], path: Path) -> str:
    """Segmentation overlays of the final model on synthetic phantoms (no patient image)."""
    from common.config import TrainPlan
    from server.report_task_measures import segmentation_overlays_html

    inf = report.get("inference") or {}
    checkpoint = path.parent / "checkpoints" / "final.pt"
    if not (isinstance(inf, Mapping) and inf.get("task") == "segmentation"
            and checkpoint.is_file()):
        return ""
    import torch

    plan = TrainPlan.from_record(dict(report.get("config") or {}))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return tables.safe(lambda: segmentation_overlays_html(state, plan), "overlays")


def _task_parts(report: Mapping[str, Any], inf: Mapping[str, Any],
                overlays_html: str) -> tuple[str | None, str]:
    """``(headline, section)`` of a task with its own view (:mod:`server.report_tasks`)."""
    from server.report_tasks import task_view

    view = task_view(inf.get("task"))
    if view is None:
        return None, ""
    lines = tables.safe(lambda: "\n".join(view.summary(inf)), "summary")
    head, _, rest = lines.partition("\n")
    headline = (f'<p class="headline">{html.escape(head)}</p>'
                + "".join(f"<p>{html.escape(line)}</p>" for line in rest.split("\n") if line))
    body = tables.safe(lambda: view.html(inf, overlays_html), view.title)
    return headline, _section(view.key, body, view.title)


def build_html(report: Mapping[str, Any], *, overlays_html: str = "") -> str:
    """The full HTML page for ``report`` (see the module docstring for the schema).

    Also accepted, as produced by the coordinator's pooled-metrics flow: a top-level ``auc``
    interval (shown first in the metrics table), ``calibration.bins`` holding the reliability
    diagram, and ``meta_<name>`` meta-analysis results beside ``meta``. Any other part is shown
    as tables with human labels; internal keys and node ids are never shown.
    """
    inf: Mapping[str, Any] = report.get("inference") or {}
    if not isinstance(inf, Mapping):
        inf = {}
    parts = [_intro(report, inf)]
    if isinstance(report.get("paradigm"), Mapping):
        from server.report_paradigm import paradigm_scope_html

        parts.append(paradigm_scope_html(report["paradigm"]))
    task_headline, task_section = _task_parts(report, inf, overlays_html)
    if isinstance(report.get("paradigm"), Mapping):  # a paradigm's own result, e.g. ensemble
        from server.report_paradigm import paradigm_headline_html

        task_headline = paradigm_headline_html(report["paradigm"]) or task_headline
    parts.append(_section("result", task_headline if task_headline is not None else
                          tables.safe(lambda: headline_section(report), "headline")))
    if isinstance(report.get("paradigm"), Mapping):
        from server.report_paradigm import paradigm_section_html

        body = tables.safe(lambda: paradigm_section_html(report["paradigm"], tables.img),
                           "paradigm section")
        if body:
            parts.append(_section("paradigm", body, "Learning paradigm"))
    if report.get("privacy") or report.get("sites"):
        parts.append(_section("privacy", tables.safe(
            lambda: privacy_section(report, tables.img), "privacy section")))
    training = tables.safe(lambda: training_section(report, tables.img), "training curves")
    selection = tables.safe(lambda: selection_section(report), "model selection")
    if training or selection:
        parts.append(_section("training", training + selection))
    if not inf:
        parts.append('<p class="note">This report has no inference section.</p>')
    performance = tables.performance(inf)
    if performance:
        parts.append(_section("performance", performance))
    if task_section:
        parts.append(task_section)
    figs = []
    if inf.get("task") == "multiclass" and isinstance(inf.get("multiclass"), Mapping):
        from server.report_task_classes import multiclass_plots_html

        figs.append(tables.safe(lambda: multiclass_plots_html(inf), "multiclass plots"))
    roc = inf.get("roc")
    if isinstance(roc, Mapping) and (roc.get("pooled") or roc.get("sites")):
        who = "held-out" if report.get("kind") == "cross-validation" else "test"
        figs.append(tables.safe(lambda: tables.img(
            plot_roc(roc, title=f"ROC ({who} patients)"), "ROC curves"), "ROC curves"))
    cal = inf.get("calibration")
    if isinstance(cal, Mapping) and cal:
        figs.append(tables.safe(lambda: calibration_section_html(cal, tables.img),
                                "calibration plot"))
    if figs:
        parts.append(_section("figures", f'<div class="figs">{"".join(figs)}</div>'))
    by_site = tables.safe(lambda: site_results_section(report), "per-hospital results")
    if by_site and report.get("secure_aggregation"):
        by_site += ('<p class="note">These per-hospital test figures are each hospital\'s own '
                    "final evaluation reply, which secure aggregation does not cover: every "
                    "hospital released them in the clear (exact, on its ledger). The pooled "
                    "figures above were summed securely.</p>")
    if by_site:
        parts.append(_section("sites", by_site))
    metas = {str(n): m for n, m in (inf.get("meta") or {}).items() if tables.is_meta(m)}
    for key, value in inf.items():
        if key.startswith("meta_") and tables.is_meta(value):
            metas[key[len("meta_"):]] = value
    if metas:
        forest = [tables.safe(lambda meta=meta, name=name: tables.meta(name, meta),
                              f"forest plot {name}") for name, meta in metas.items()]
        parts.append(_section("heterogeneity",
                              "<p>Random-effects meta-analysis (DerSimonian–Laird) of each "
                              "hospital's own estimate: the pooled value is the average "
                              "hospital's, and τ² and I² measure how much hospitals differ.</p>"
                              f'<div class="figs">{"".join(forest)}</div>'))
    if isinstance(inf.get("cv"), Mapping):
        parts.append(_section("cv", tables.safe(lambda: tables.cv(inf["cv"]), "CV table")))
    if isinstance(inf.get("glm"), Mapping):
        parts.append(_section("glm", tables.safe(lambda: tables.glm(inf["glm"]), "GLM table"),
                              "Logistic regression (federated Newton–Raphson)"))
    # what a task's own view shows (or what only its view needs), never as generic tables
    own = ({inf.get("task"), "task", "value_range", "hd95_units", "decision", "classes",
            "labels", "note"} if task_section else set())
    rest = [(key, v) for key, v in inf.items() if key not in _HANDLED and key not in own
            and not key.startswith("meta_") and not tables.empty(v)]
    scalars = {key: v for key, v in rest if not isinstance(v, (Mapping, list))}
    if scalars:
        parts.append(_section("details", tables.kv_table(scalars), "Details"))
    for key, value in rest:
        if key not in scalars:
            parts.append(_section(key, tables.safe(lambda value=value: tables.generic(value),
                                                   key), html.unescape(label(key))))
    problems = tables.safe(lambda: problems_section(report), "problems")
    if problems:
        parts.append(_section("problems", problems))
    config = tables.config(report)
    if config:
        parts.append(_section("configuration", config))
    parts.append('<p class="note">All figures and numbers come from statistics released by the '
                 "hospitals (sums and counts); no per-patient value is included.</p>")
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
    page = build_html(report, overlays_html=_overlays(report, path))
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
