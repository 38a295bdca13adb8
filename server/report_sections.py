"""Sections of ``report.html`` beyond the statistics library's: the headline, training, choices.

* :func:`headline_section`: one pooled AUC with its interval and a sentence on how it was
  pooled, and every other AUC in the report labelled with what it estimates.
* :func:`training_section`: train loss, validation loss and AUC per round (plot and table).
* :func:`selection_section`: which round's model is the final one, and why.
* :func:`operating_point_section`: the decision threshold and the recalibration map.
* :func:`calibration_section_html`: reliability diagrams before and after recalibration.
* :func:`site_results_section`: per-hospital test results.
* :func:`problems_section`: refusals, exclusions, errors and unanswered queries, by site name.

Each returns ``""`` when the report has nothing for it; all text is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping
from typing import Any

from server.report_text import (
    METHODS,
    fmt,
    fmt_interval,
    format_cell,
    label,
    site_label,
    strip_site_prefix,
)

__all__ = ["calibration_section_html", "headline_auc", "headline_section",
           "operating_point_section", "problems_section", "selection_section",
           "site_results_section", "training_rows", "training_section"]

ImgFn = Callable[[Any, str], str]

COARSE_BINS = 1000
"""Equal-width bins of the nodes' final evaluation histograms (``final.auc_pooled``)."""


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _inf(report: Mapping[str, Any]) -> Mapping[str, Any]:
    inf = report.get("inference")
    return inf if isinstance(inf, Mapping) else {}


def _is_estimate(v: Any) -> bool:
    return isinstance(v, Mapping) and "value" in v


def headline_auc(report: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The AUC the page leads with: the pooled test AUC of the statistics queries (with its
    DeLong interval), a cross-validation's pooled held-out AUC, else None."""
    inf = _inf(report)
    metrics = inf.get("metrics") if isinstance(inf.get("metrics"), Mapping) else {}
    for est in (metrics.get("auc"), inf.get("auc"),
                ((inf.get("cv") or {}).get("pooled") or {}).get("auc")):
        if _is_estimate(est) and _num(est.get("value")) is not None:
            return est
    return None


def _meta_auc(inf: Mapping[str, Any]) -> Mapping[str, Any] | None:
    meta = (inf.get("meta") or {}).get("auc") if isinstance(inf.get("meta"), Mapping) else None
    meta = meta or inf.get("meta_auc")
    pooled = meta.get("pooled") if isinstance(meta, Mapping) else None
    return pooled if isinstance(pooled, Mapping) and pooled.get("estimate") is not None else None


def _other_aucs(report: Mapping[str, Any], head: float | None) -> list[tuple[str, str, str]]:
    """(what, value, how it differs from the headline) for every other AUC in the report."""
    inf = _inf(report)
    final = report.get("final") if isinstance(report.get("final"), Mapping) else {}
    rows: list[tuple[str, str, str]] = []
    coarse = _num(final.get("auc_pooled"))
    if coarse is not None:
        if head is not None and abs(coarse - head) < 5e-5:
            why = "the same figure, from the final evaluation step"
        else:
            why = ("the same test patients and model, but from the score histograms of the "
                   f"final evaluation step, which use {COARSE_BINS:,} equal-width bins instead "
                   "of the statistics queries' 10,000 finer bins: patients of both classes "
                   "whose scores share a bin count as ties (one half), so the two differ in "
                   "the third or fourth decimal; the headline uses the finer bins")
        rows.append(("AUC of the pooled test scores, final evaluation step", fmt(coarse, 4), why))
    weighted = _num((final.get("metrics") or {}).get("auc")) if final else None
    if weighted is not None:
        rows.append(("Mean of the hospitals' own test AUCs, weighted by their patients",
                     fmt(weighted, 4), "not an AUC of the pooled patients: each hospital "
                     "ranks only its own patients, so it ignores differences between "
                     "hospitals' score scales"))
    meta = _meta_auc(inf)
    if meta is not None:
        rows.append(("Random-effects meta-analysis of the per-hospital AUCs (DerSimonian–Laird)",
                     fmt_interval({"value": meta.get("estimate"), "lower": meta.get("lower"),
                                   "upper": meta.get("upper")}),
                     "a different estimand: the AUC of an average hospital, not of the pooled "
                     "patients (see the forest plot)"))
    pooled_cv = (inf.get("cv") or {}).get("pooled") or {}
    if _num(pooled_cv.get("auc_mean")) is not None:
        sd = _num(pooled_cv.get("auc_sd"))
        rows.append(("Mean of the folds' own held-out AUCs",
                     fmt(pooled_cv["auc_mean"], 3) + (f" ± {fmt(sd, 3)} (SD)" if sd else ""),
                     "each fold's model scores only its own held-out patients; the headline "
                     "pools all held-out patients, scored by their own fold's model"))
    return rows


def _multiclass_headline(inf: Mapping[str, Any]) -> str | None:
    """The headline of a multi-class run: the pooled macro one-vs-rest AUC, or None."""
    section = inf.get("multiclass") if isinstance(inf.get("multiclass"), Mapping) else None
    auc = (section or {}).get("auc") if section else None
    macro = auc.get("macro") if isinstance(auc, Mapping) else None
    if not (_is_estimate(macro) and _num(macro.get("value")) is not None):
        return None
    sites = inf.get("sites") if isinstance(inf.get("sites"), list) else []
    n = inf.get("n")
    ci = (f" (95% CI {fmt(macro.get('lower'), 3)}&ndash;{fmt(macro.get('upper'), 3)})"
          if macro.get("lower") is not None else "")
    extra = []
    for key, name in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy")):
        est = section.get(key)
        if _is_estimate(est) and _num(est.get("value")) is not None:
            extra.append(f"{name} {fmt(est.get('value'), 3)}")
    return (f'<p class="headline">Pooled test macro one-vs-rest AUC: '
            f'<strong>{fmt(macro.get("value"), 3)}</strong>{ci}'
            + (f" on {fmt(n)} test patients" if n else "")
            + (f" from {len(sites)} hospitals" if len(sites) > 1 else "") + ".</p>"
            + (f"<p>At the most probable class: {', '.join(extra)}.</p>" if extra else "")
            + "<p>How it was pooled: each hospital scored its own test patients with the final "
            "model and released only its confusion counts and, per class, counts of the "
            "one-vs-rest scores on fixed fine bins; the counts were added over hospitals. Each "
            "class's AUC and DeLong interval come from the summed histograms and placement "
            "sums; the macro AUC is their mean, its interval from their DeLong covariance.</p>")


def headline_section(report: Mapping[str, Any]) -> str:
    """One pooled AUC with its interval and how it was pooled; other AUCs labelled below."""
    inf = _inf(report)
    multiclass = _multiclass_headline(inf) if inf.get("task") == "multiclass" else None
    if multiclass is not None:
        return multiclass
    est = headline_auc(report)
    is_cv = report.get("kind") == "cross-validation"
    head = _num(est.get("value")) if est is not None else None
    parts: list[str] = []
    if est is not None:
        n = est.get("n") or inf.get("n")
        sites = inf.get("sites") if isinstance(inf.get("sites"), list) else []
        who = (f" on {fmt(n)} {'held-out' if is_cv else 'test'} patients" if n else "")
        who += f" from {len(sites)} hospitals" if len(sites) > 1 else ""
        method = " DeLong" if est.get("method") == "delong" else ""
        what = "Pooled held-out AUC over all folds" if is_cv else "Pooled test AUC"
        parts.append(f'<p class="headline">{what}: <strong>{fmt(est.get("value"), 3)}</strong>'
                     + (f" (95%{method} CI {fmt(est.get('lower'), 3)}&ndash;"
                        f"{fmt(est.get('upper'), 3)})" if est.get("lower") is not None else "")
                     + f"{who}.</p>")
        if is_cv:
            parts.append("<p>How it was pooled: in each fold, every hospital scored its own "
                         "held-out patients with that fold's model and released only per-class "
                         "counts of the scores on fixed bins; the counts were added over "
                         "hospitals and folds, and the AUC computed from the sum, with DeLong's "
                         "interval on the binned scores.</p>")
            from server.report_tasks import CV_POOLING_NOTE, cv_notes

            cv = inf.get("cv") if isinstance(inf.get("cv"), Mapping) else {}
            if CV_POOLING_NOTE in cv_notes(cv):
                parts.append(f'<p class="note">{html.escape(CV_POOLING_NOTE[0].upper() + CV_POOLING_NOTE[1:])}</p>')
        else:
            parts.append(
                "<p>How it was pooled: each hospital scored its own test patients with the "
                "final model and released only per-class counts of the scores on fixed, fine "
                "bins (10,000 of them), never an individual score. The counts were added over "
                "hospitals and the AUC computed from the sum, which equals the AUC of all test "
                "patients' scores pooled together up to ties within a bin. The confidence "
                "interval is DeLong's, from sums of placement values the hospitals released in "
                "a second round.</p>")
        if inf.get("auc_note"):
            parts.append(f'<p class="note">{fmt(inf["auc_note"])}.</p>')
    else:
        parts.append('<p class="note">No pooled AUC is available for this report'
                     + (f": {fmt(inf.get('auc_note'))}" if inf.get("auc_note") else "")
                     + ".</p>")
    others = _other_aucs(report, head)
    if others:
        rows = "".join(f"<tr><td>{html.escape(w)}</td><td>{v}</td><td>{html.escape(d)}</td></tr>"
                       for w, v, d in others)
        parts.append("<h3>Other AUC figures in this report</h3>"
                     "<table><tr><th>Figure</th><th>AUC</th><th>How it differs from the "
                     f"headline</th></tr>{rows}</table>")
    return "".join(parts)


def _task(report: Mapping[str, Any]) -> str:
    return str((report.get("config") or {}).get("task") or "binary")


def training_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-round ``round, train_loss, val_loss, val_auc, val_accuracy, trained, problems``,
    and ``metrics``: the task's validation metrics (:data:`server.report_tasks.ROUND_METRICS`)."""
    from server.report_tasks import round_metrics, round_value

    shown = round_metrics(_task(report))
    out = []
    for entry in report.get("rounds") or []:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("round"), int):
            continue
        m = entry.get("metrics") or {}
        auc = _num(m.get("auc-pooled"))
        out.append({"round": entry["round"], "train_loss": _num(m.get("train-loss")),
                    "val_loss": _num(m.get("loss")),
                    "val_auc": auc if auc is not None else _num(m.get("auc")),
                    "val_accuracy": _num(m.get("accuracy")),
                    "metrics": {key: _num(round_value(m, key)) for _, key in shown},
                    "trained": len(entry.get("train") or []),
                    "problems": len(entry.get("errors") or [])})
    return out


def training_section(report: Mapping[str, Any], img: ImgFn) -> str:
    """Train loss, validation loss and validation AUC per round: a plot and a table."""
    from server.plots import plot_training
    from server.report_tasks import (BOUNDED, LOSS_LABELS, RAW_THRESHOLD_NOTE, raw_threshold_misleads,
                                     round_metrics)

    rows = training_rows(report)
    if not rows:
        return ""
    task = _task(report)
    shown = round_metrics(task)
    pooled = any(_num((e.get("metrics") or {}).get("auc-pooled")) is not None
                 for e in report.get("rounds") or [] if isinstance(e, Mapping))
    auc_what = ("AUC of the validation patients pooled over hospitals" if pooled else
                "mean of the hospitals' validation AUCs, weighted by their patients")
    what = (f" the validation AUC is the {auc_what}." if task == "binary" else
            " the other validation metrics are means over the hospitals' patients.")
    titles = [name.removeprefix("val ") for name, _ in shown]
    head = ("<tr><th>Round</th><th>Training loss</th><th>Validation loss</th>"
            + "".join(f"<th>Validation {html.escape(t)}</th>" for t in titles)
            + "<th>Hospitals trained</th><th>Problems</th></tr>")
    body = "".join(
        f"<tr><td>{r['round']}</td><td>{fmt(r['train_loss'])}</td><td>{fmt(r['val_loss'])}</td>"
        + "".join(f"<td>{fmt(r['metrics'].get(key))}</td>" for _, key in shown)
        + f"<td>{r['trained']}</td><td>{r['problems'] or ''}</td></tr>" for r in rows)
    metric = shown[0] if shown else None
    curves = [{**r, "val_metric": r["metrics"].get(metric[1]) if metric else None}
              for r in rows]
    figure = plot_training(curves, loss_label=LOSS_LABELS.get(task, "loss"),
                           metric_label=metric[0].removeprefix("val ") if metric else None,
                           bounded=bool(metric and metric[1] in BOUNDED))
    return (f"<p>After each round the hospitals evaluated the new global model on their "
            f"validation patients. Losses ({html.escape(LOSS_LABELS.get(task, 'loss'))}) are "
            f"means over patients, weighted by each hospital's patients;{what} The training "
            "loss is measured on the noisy, clipped DP-SGD batches.</p>"
            + img(figure, "training and validation loss and the validation metric per round")
            + f'<table class="rounds">{head}{body}</table>'
            + (f'<p class="note">{html.escape(RAW_THRESHOLD_NOTE[0].upper() + RAW_THRESHOLD_NOTE[1:])}</p>'
               if raw_threshold_misleads(task, [e.get("metrics") or {} for e in report.get("rounds") or []
                                               if isinstance(e, Mapping)]) else ""))


def selection_section(report: Mapping[str, Any]) -> str:
    """The final model's round and the rule that chose it (``model_selection``)."""
    sel = report.get("model_selection")
    if not isinstance(sel, Mapping):
        sel = {key: report[key] for key in ("final_round", "selection") if key in report}
    if not sel or sel.get("final_round") is None:
        return ""
    text = f"<p>The final model is the global model after round {fmt(sel.get('final_round'))}"
    if sel.get("last_round") is not None:
        text += f" of {fmt(sel.get('last_round'))}"
    if sel.get("selection"):
        text += f", chosen by {fmt(sel.get('selection'))}"
        if _num(sel.get("value")) is not None:
            text += f" ({fmt(sel.get('value'), 3)})"
    text += " on the validation patients; the test patients played no part in the choice.</p>"
    if sel.get("note"):
        text += f'<p class="note">{fmt(sel["note"])}.</p>'
    cands = [c for c in sel.get("candidates") or [] if isinstance(c, Mapping)]
    if cands:
        metric = ("Validation loss" if "loss" in str(sel.get("metric"))
                  else "Validation AUC")
        text += (f"<table><tr><th>Round</th><th>{metric}</th></tr>"
                 + "".join(f"<tr><td>{fmt(c.get('round'))}</td><td>{fmt(c.get('value'))}</td>"
                           "</tr>" for c in cands) + "</table>")
    return text


def operating_point_section(report: Mapping[str, Any]) -> str:
    """The decision threshold and recalibration the test metrics use."""
    op = _inf(report).get("operating_point")
    if not isinstance(op, Mapping) or not op:
        return ""
    method = str(op.get("method") or "")
    how = METHODS.get(method, method)
    text = (f"<p>Threshold metrics (sensitivity, specificity, …) count a patient as positive "
            f"when the model's score is at least <strong>{fmt(op.get('threshold'), 3)}</strong>")
    if op.get("calibrated_threshold") is not None:
        text += f" ({fmt(op.get('calibrated_threshold'), 3)} on the recalibrated probabilities)"
    text += f", chosen on the {fmt(op.get('chosen_on') or 'validation')} patients"
    text += f" by {html.escape(how)}" if how else ""
    if _num(op.get("target_sensitivity")) is not None:
        text += f" (target sensitivity {fmt(op['target_sensitivity'], 3)})"
    text += ".</p>"
    cal = str(op.get("calibration") or "")
    if cal and cal != "none":
        text += (f"<p>The scores were recalibrated by {html.escape(METHODS.get(cal, cal))} on the "
                 f"validation patients: intercept {fmt(op.get('intercept'), 3)}, slope "
                 f"{fmt(op.get('slope'), 3)} (temperature T = "
                 f"{fmt(op.get('temperature'), 3)}).</p>")
    val = op.get("validation")
    if isinstance(val, Mapping):
        keys = [key for key in ("sensitivity", "specificity", "youden_j", "tp", "fp", "tn", "fn")
                if val.get(key) is not None]
        text += ("<table><tr><th colspan=2>At this threshold on the validation patients</th></tr>"
                 + "".join(f"<tr><th>{label(key)}</th><td>{fmt(val[key], 3)}</td></tr>"
                           for key in keys) + "</table>")
    if op.get("source"):
        text += f'<p class="note">Chosen from the {fmt(op["source"])}.</p>'
    if op.get("note"):
        text += f'<p class="note">{fmt(op["note"])}.</p>'
    return text


def calibration_section_html(cal: Mapping[str, Any], img: ImgFn) -> str:
    """Reliability diagram(s) and the calibration numbers (before and after, when present)."""
    from server.plots import plot_calibration

    if isinstance(cal.get("bins"), Mapping):
        cal = {**cal["bins"], **{key: v for key, v in cal.items() if key != "bins"}}
    before = cal.get("before") if isinstance(cal.get("before"), Mapping) else None
    after = cal.get("after") if isinstance(cal.get("after"), Mapping) and cal["after"] else cal
    before = before if before and before.get("mean_score") is not None else None
    fig = img(plot_calibration(after, before=before,
                               title="Calibration (test patients)"), "calibration plot")
    rows = []
    for key in ("brier", "ece"):
        if before is not None and (key in before or key in after):
            rows.append(f"<tr><th>{label(key)}</th><td>{fmt(before.get(key))}</td>"
                        f"<td>{fmt(after.get(key))}</td></tr>")
        elif key in after:
            rows.append(f"<tr><th>{label(key)}</th><td>{fmt(after.get(key))}</td></tr>")
    for key in ("intercept", "slope"):
        if _is_estimate(cal.get(key)):
            span = " colspan=2" if before is not None else ""
            rows.append(f"<tr><th>{label(key)}</th><td{span}>{format_cell(cal[key])}</td></tr>")
    head = ("<tr><th></th><th>Before recalibration</th><th>After</th></tr>"
            if before is not None else "")
    table = f"<table>{head}{''.join(rows)}</table>" if rows else ""
    fit = cal.get("fit") if isinstance(cal.get("fit"), Mapping) else {}
    if fit.get("status") == "failed":
        table += (f'<p class="note">Recalibration was not fitted ({fmt(fit.get("reason"))}): '
                  "the probabilities after are the model's own scores.</p>")
    return f"<div>{fig}{table}</div>"


def site_results_section(report: Mapping[str, Any]) -> str:
    """Per-hospital test AUCs (with DeLong intervals where released) and patient counts."""
    inf = _inf(report)
    rows = sorted((r for r in inf.get("auc_sites") or [] if isinstance(r, Mapping)),
                  key=lambda r: site_label(r.get("site")))
    if rows:
        def auc(r: Mapping[str, Any]) -> str:
            return format_cell({"value": r.get("value", r.get("auc")), "lower": r.get("lower"),
                                "upper": r.get("upper")})

        body = "".join(
            f"<tr><td>{html.escape(site_label(r.get('site')))}</td><td>{fmt(r.get('n'))}</td>"
            f"<td>{fmt(r.get('n_pos'))}</td><td>{fmt(r.get('n_neg'))}</td>"
            f"<td>{auc(r)}</td></tr>" for r in rows)
        return ("<table><tr><th>Hospital</th><th>Test patients</th><th>Positive</th>"
                f"<th>Negative</th><th>AUC [95% DeLong CI]</th></tr>{body}</table>")
    final = report.get("final") if isinstance(report.get("final"), Mapping) else {}
    rows = sorted((r for r in final.get("sites") or [] if isinstance(r, Mapping)),
                  key=lambda r: site_label(r.get("site")))
    if not rows:
        return ""
    from server.report_tasks import round_metrics

    task = _task(report)
    shown = ([("AUC", "auc"), ("Accuracy", "accuracy")] if task == "binary" else
             [(name.removeprefix("val "), key) for name, key in round_metrics(task)])
    if task != "binary":
        shown.append(("loss", "loss"))
    head = "".join(f"<th>{html.escape(name[:1].upper() + name[1:])}</th>" for name, _ in shown)
    body = "".join(f"<tr><td>{html.escape(site_label(r.get('site')))}</td>"
                   f"<td>{fmt(r.get('num-examples'))}</td>"
                   + "".join(f"<td>{fmt(r.get(key))}</td>" for _, key in shown)
                   + "</tr>" for r in rows)
    return f"<table><tr><th>Hospital</th><th>Test patients</th>{head}</tr>{body}</table>"


def _problem_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for entry in report.get("rounds") or []:
        if not isinstance(entry, Mapping):
            continue
        for e in entry.get("errors") or []:
            if isinstance(e, Mapping):
                rows.append((f"round {entry.get('round')}, {e.get('phase', '')}".strip(", "),
                             site_label(e.get("site"), e.get("reason")),
                             strip_site_prefix(e.get("reason")) or "no reason given"))
    for entry in report.get("rounds") or []:
        if isinstance(entry, Mapping) and entry.get("status") == "failed":
            rows.append((f"round {entry.get('round')}", "all hospitals",
                         str(entry.get("failure") or "the round failed")))
    for e in report.get("dropped") or []:
        if isinstance(e, Mapping):
            back = (f"; answered again in round {e['rejoined_round']}"
                    if e.get("rejoined_round") else "")
            rows.append((f"round {e.get('round')}, {e.get('phase', '')} (at {e.get('at')})",
                         str(e.get("site")), f"stopped answering{back}"))
    for e in report.get("excluded") or []:
        if isinstance(e, Mapping):
            rows.append(("excluded from the rest of the run",
                         site_label(e.get("site"), e.get("reason")),
                         strip_site_prefix(e.get("reason")) or "no reason given"))
    final = report.get("final") if isinstance(report.get("final"), Mapping) else {}
    for e in final.get("errors") or []:
        if isinstance(e, Mapping):
            rows.append(("final evaluation", site_label(e.get("site"), e.get("reason")),
                         strip_site_prefix(e.get("reason")) or "no reason given"))
    for e in _inf(report).get("failures") or []:
        if isinstance(e, Mapping):
            what = f"statistics query {e.get('query', '')}".strip()
            rows.append((what, site_label(e.get("site"), e.get("reason")),
                         strip_site_prefix(e.get("reason")) or "no reason given"))
    return rows


def problems_section(report: Mapping[str, Any]) -> str:
    """Refusals, exclusions, errors and failed queries, each named by its hospital."""
    rows = _problem_rows(report)
    if not rows:
        return ""
    body = "".join(f"<tr><td>{html.escape(w)}</td><td>{html.escape(s)}</td>"
                   f"<td>{html.escape(r)}</td></tr>" for w, s, r in rows)
    return ("<p>What did not go as planned. A hospital that refuses a plan (for example because "
            "it would exceed its privacy cap) is left out of the rest of the run.</p>"
            f"<table><tr><th>When</th><th>Hospital</th><th>What happened</th></tr>{body}</table>")
