"""Show a run's progress and report in the terminal."""

from __future__ import annotations

import math
from typing import Any

from rich.markup import escape

from cli.console import console, fmt, table
from common import messages as k
from common.privacy.display import epsilon_text


def fmt_epsilon(value: object, decimals: int = 3) -> str:
    """Epsilon for people, rounded up (:func:`common.privacy.display.epsilon_shown`, as the
    report does): missing or infinite means no DP guarantee at all."""
    if value is None or value == float("inf"):
        return "none (no DP)"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return epsilon_text(float(value), decimals)
    return fmt(value)


def _estimate(value: Any) -> str:
    if not isinstance(value, dict) or value.get("value") is None:
        return "-"
    lo, hi = value.get("lower"), value.get("upper")
    ci = f" ({fmt(lo)}–{fmt(hi)})" if lo is not None and hi is not None else ""
    return f"{fmt(value['value'])}{ci}"


def operating_point_line(point: Any) -> str:
    """One sentence: the threshold the test metrics are computed at, and where it came from."""
    if not isinstance(point, dict):
        return ""
    method = point.get("method")
    if method == "youden":
        rule = "Youden's J"
    elif method == "target-sensitivity":
        rule = f"target sensitivity {fmt(point.get('target_sensitivity'), 'g')}"
    else:
        rule = str(method)
    cal = point.get("calibration")
    scale = "calibrated probability" if cal and cal != "none" else "score"
    text = (f"Operating point: {scale} ≥ {fmt(point.get('calibrated_threshold'), '.4f')} "
            f"(model score ≥ {fmt(point.get('threshold'), '.4f')}), {rule}, chosen on "
            f"{point.get('chosen_on', 'validation')}")
    val = point.get("validation")
    if isinstance(val, dict):
        text += (f": sensitivity {fmt(val.get('sensitivity'))}, specificity "
                 f"{fmt(val.get('specificity'))}, J {fmt(val.get('youden_j'))}")
    if cal and cal != "none":
        text += (f"; {cal} scaling (T = {fmt(point.get('temperature'))}, intercept "
                 f"{fmt(point.get('intercept'))})")
    return text


def _calibration_rows(section: dict[str, Any]) -> list[tuple[str, str]]:
    """ECE and Brier before and after recalibration (or the plain values)."""
    cal = section.get("calibration")
    metrics = section.get("metrics") or {}
    if isinstance(cal, dict) and isinstance(cal.get("before"), dict) and cal.get("after"):
        before, after = cal["before"], cal["after"]
        fit = cal.get("fit") if isinstance(cal.get("fit"), dict) else {}
        if fit.get("status") == "failed":  # the map is the identity: say so, not "uncalibrated"
            return [(name, f"{fmt(after.get(name))} (not recalibrated: the fit failed, "
                     "see the report)") for name in ("brier", "ece")]
        return [(name, f"{fmt(after.get(name))} (uncalibrated {fmt(before.get(name))})")
                for name in ("brier", "ece")]
    return [(name, fmt(metrics[name])) for name in ("brier", "ece")
            if isinstance(metrics.get(name), (int, float))]


def print_multiclass_inference(section: dict[str, Any]) -> None:
    """Pooled multi-class test metrics with 95% CIs at the arg-max class (``inference``)."""
    mc = section.get("multiclass") or {}
    if mc:
        auc = mc.get("auc") or {}
        t = table(f"Pooled test inference (multiclass, {section.get('classes', '?')} classes, "
                  f"arg-max class) over {len(section.get('sites', []))} site(s), "
                  f"n={section.get('n', 0)} (95% CI)", ["metric", "estimate (95% CI)"])
        t.add_row("macro AUC (one-vs-rest)", _estimate(auc.get("macro")))
        t.add_row("accuracy", _estimate(mc.get("accuracy")))
        t.add_row("balanced accuracy", _estimate(mc.get("balanced_accuracy")))
        console.print(t)
        per_class = auc.get("per_class") or []
        c = table("Per class (one-vs-rest, 95% CI)",
                  ["class", "patients", "AUC", "sensitivity", "precision"])
        for i, (sens, prec) in enumerate(zip(mc.get("sensitivity") or [],
                                             mc.get("precision") or [], strict=False)):
            counts = mc.get("class_counts") or []
            c.add_row(str(i), str(counts[i]) if i < len(counts) else "-",
                      _estimate(per_class[i]) if i < len(per_class) else "-",
                      _estimate(sens), _estimate(prec))
        console.print(c)
        confusion = mc.get("confusion") or []
        if confusion:
            m = table("Confusion matrix (rows: true class, columns: arg-max class)",
                      ["true \\ predicted", *[str(j) for j in range(len(confusion))]])
            for i, row in enumerate(confusion):
                m.add_row(str(i), *[str(v) for v in row])
            console.print(m)
        console.print("Decision: the arg-max class (no threshold, no recalibration).",
                      highlight=False)
    for fail in section.get("failures", []):
        console.print(f"  [yellow]{fail.get('query')}: {escape(str(fail.get('reason')))}[/yellow]")
    for key in ("metrics_note", "auc_note"):
        if section.get(key):
            console.print(f"  [yellow]{escape(str(section[key]))}[/yellow]")
    if section.get("status") == "failed":
        console.print(f"  [yellow]pooled inference failed: {section.get('reason')}[/yellow]")


def print_task_inference(section: dict[str, Any], view: Any) -> None:
    """A task's pooled test inference as ``(metric, value)`` rows (:mod:`server.report_tasks`)."""
    rows = view.rows(section)
    if rows:
        t = table(f"Pooled test inference ({section.get('task')}) over "
                  f"{len(section.get('sites', []))} site(s), n={section.get('n', 0)} (95% CI)",
                  ["metric", "estimate (95% CI)"])
        for name, value in rows:
            t.add_row(escape(str(name)), escape(str(value)))
        console.print(t)
    for fail in section.get("failures", []):
        console.print(f"  [yellow]{fail.get('query')}: {escape(str(fail.get('reason')))}[/yellow]")
    for key in ("note", "metrics_note", "auc_note"):
        if section.get(key):
            console.print(f"  [yellow]{escape(str(section[key]))}[/yellow]")
    if section.get("status") in ("failed", "not applicable") and section.get("reason"):
        console.print(f"  [yellow]pooled inference {section['status']}: "
                      f"{escape(str(section.get('reason')))}[/yellow]")


def print_inference(section: Any) -> None:
    """Pooled test metrics with 95% confidence intervals at the operating point (``inference``).

    A multi-class run's section (``task`` "multiclass") is shown by
    :func:`print_multiclass_inference` instead.
    """
    if not isinstance(section, dict):
        return
    if section.get("task") == "multiclass":
        print_multiclass_inference(section)
        return
    from server.report_tasks import task_view

    view = task_view(section.get("task"))
    if view is not None:
        print_task_inference(section, view)
        return
    metrics = section.get("metrics") or {}
    if metrics:
        names = ["auc", "accuracy", "sensitivity", "specificity", "precision", "f1"]
        t = table(f"Pooled test inference over {len(section.get('sites', []))} site(s), "
                  f"n={section.get('n', 0)} (95% CI)", ["metric", "estimate (95% CI)"])
        for name in names:
            if name in metrics:
                t.add_row(name, _estimate(metrics[name]))
        for name, text in _calibration_rows(section):
            t.add_row(name, text)
        console.print(t)
    line = operating_point_line(section.get("operating_point"))
    if line:
        console.print(line, highlight=False)
    note = (section.get("operating_point") or {}).get("note")
    if note:
        console.print(f"  [yellow]{escape(str(note))}[/yellow]")
    for fail in section.get("failures", []):
        console.print(f"  [yellow]{fail.get('query')}: {escape(str(fail.get('reason')))}[/yellow]")
    if section.get("metrics_note"):
        console.print(f"  [yellow]{section['metrics_note']}[/yellow]")
    if section.get("auc_note"):
        console.print(f"  [yellow]{section['auc_note']}[/yellow]")
    if section.get("status") == "failed":
        console.print(f"  [yellow]pooled inference failed: {section.get('reason')}[/yellow]")


def print_report(doc: dict[str, Any]) -> None:
    """Per-round metrics, per-site privacy spend and the final pooled test AUC."""
    selection = doc.get("model_selection") or {}
    final_round = selection.get("final_round")
    from server.report_tasks import round_metrics, round_value

    task = (doc.get("config") or {}).get(k.TASK, "binary")
    multiclass = task == "multiclass"
    shown = round_metrics(task)
    titles = {"binary": ["AUC", "accuracy at 0.5"],
              "multiclass": ["macro AUC (one-vs-rest)", "accuracy"]}.get(
                  task, [name.removeprefix("val ") for name, _ in shown])
    rounds = table("Federated evaluation (validation splits)",
                   ["round", *titles, "loss", "train loss"])
    for r in doc.get("rounds", []):
        m = r["metrics"]
        mark = " ◀ final" if r["round"] == final_round else ""
        rounds.add_row(f"{r['round']}{mark}", *[fmt(round_value(m, key)) for _, key in shown],
                       fmt(m.get(k.LOSS), ".4f"), fmt(m.get(k.TRAIN_LOSS), ".4f"))
    console.print(rounds)
    from server.report_tasks import RAW_THRESHOLD_NOTE, raw_threshold_misleads

    if raw_threshold_misleads(task, [r.get("metrics") or {} for r in doc.get("rounds", [])]):
        console.print(f"[dim]{RAW_THRESHOLD_NOTE}[/dim]", highlight=False)
    if final_round is not None:
        console.print(f"Final model: round {final_round} ({selection.get('selection')}"
                      + (f"; {escape(str(selection['note']))}" if selection.get("note") else "")
                      + ")", highlight=False)
    sites = table("Privacy spent per hospital (patient-level DP)",
                  ["site", "patients", "ε run (RDP)", "ε run (PRV)", "ε dataset / cap", "δ",
                   "noise σ"])
    for s in doc.get("sites", []):
        cap = s.get("epsilon_cap")
        dataset = fmt_epsilon(s.get("epsilon_dataset")) + (f" / {fmt(cap, 'g')}" if cap else "")
        patients = "hidden" if s.get("num_examples") is None else str(s["num_examples"])
        sites.add_row(s["site"], patients, fmt_epsilon(s["epsilon"]),
                      fmt_epsilon(s.get("epsilon_prv")), dataset, fmt(s["delta"], ".1e"),
                      fmt(s["noise_multiplier"], ".3f"))
    console.print(sites)
    for row in doc.get("excluded", []):
        console.print(f"[yellow]excluded node {row['node_id']}: {escape(str(row['reason']))}[/yellow]")
    for r in doc.get("rounds", []):
        if r.get("status") == "failed":
            console.print(f"[red]round {r['round']} failed: {escape(str(r.get('failure', '')))}"
                          "[/red]")
    from server.report import dropped_lines

    for line in dropped_lines(doc.get("dropped") or []):
        console.print(f"[yellow]{escape(line)}[/yellow]")
    for resumed in doc.get("resumed") or []:
        console.print(f"resumed at {resumed.get('at')} after round {resumed.get('from_round')}",
                      highlight=False)
    final = doc.get("final")
    from server.report_paradigm import paradigm_headline_text

    paradigm_headline = paradigm_headline_text(doc.get("paradigm"))
    if paradigm_headline is not None:  # the paradigm's result, e.g. an ensemble's
        console.print(f"[bold]{escape(paradigm_headline)}[/bold]", highlight=False)
    elif final and task in ("binary", "multiclass"):
        per_site = ", ".join(f"{s['site']} {fmt(s.get(k.AUC))}" for s in final.get("sites", []))
        pooled = final.get("auc_pooled")
        if multiclass:
            headline = ("Final test macro AUC (one-vs-rest), weighted mean of sites: "
                        f"{fmt(final['metrics'].get(k.AUC))}")
        elif pooled is not None:
            headline = f"Final test AUC pooled over hospitals: {fmt(pooled)}"
        else:  # some node declined to release score histograms
            headline = f"Final test AUC, weighted mean of sites: {fmt(final['metrics'].get(k.AUC))}"
        console.print(f"[bold]{headline}[/bold]  (per site: {per_site})")
    print_inference(doc.get("inference"))
    from server.report_paradigm import paradigm_lines

    for line in paradigm_lines(doc.get("paradigm")):
        console.print(escape(line), highlight=False)
    status = doc.get("status")
    if status != "completed":
        console.print(f"[red]run {status}: {escape(str(doc.get('reason', '')))}[/red]")
