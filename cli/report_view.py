"""Show a run's progress and report in the terminal."""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from cli.console import console, fmt, table
from common import messages as k


def fmt_epsilon(value: object, spec: str = ".3f") -> str:
    """Epsilon for people: missing or infinite means no DP guarantee at all."""
    if value is None or value == float("inf"):
        return "none (no DP)"
    return fmt(value, spec)


def _estimate(value: Any) -> str:
    if not isinstance(value, dict) or value.get("value") is None:
        return "-"
    lo, hi = value.get("lower"), value.get("upper")
    ci = f" ({fmt(lo)}–{fmt(hi)})" if lo is not None and hi is not None else ""
    return f"{fmt(value['value'])}{ci}"


def print_inference(section: Any) -> None:
    """Pooled test metrics with 95% confidence intervals (the report's ``inference``)."""
    if not isinstance(section, dict):
        return
    metrics = section.get("metrics") or {}
    if metrics:
        names = ["auc", "accuracy", "sensitivity", "specificity", "precision", "f1"]
        t = table(f"Pooled test inference over {len(section.get('sites', []))} site(s), "
                  f"n={section.get('n', 0)} (95% CI)", ["metric", "estimate (95% CI)"])
        for name in names:
            if name in metrics:
                t.add_row(name, _estimate(metrics[name]))
        for name in ("brier", "ece"):
            if isinstance(metrics.get(name), (int, float)):
                t.add_row(name, fmt(metrics[name]))
        console.print(t)
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
    rounds = table("Federated evaluation (validation splits)", ["round", "AUC", "accuracy", "loss", "train loss"])
    for r in doc.get("rounds", []):
        m = r["metrics"]
        rounds.add_row(str(r["round"]), fmt(m.get(k.AUC)), fmt(m.get(k.ACCURACY)),
                       fmt(m.get(k.LOSS), ".4f"), fmt(m.get(k.TRAIN_LOSS), ".4f"))
    console.print(rounds)
    sites = table("Privacy spent per hospital (patient-level DP)",
                  ["site", "patients", "ε run (RDP)", "ε run (PRV)", "ε dataset / cap", "δ",
                   "noise σ"])
    for s in doc.get("sites", []):
        cap = s.get("epsilon_cap")
        dataset = fmt_epsilon(s.get("epsilon_dataset")) + (f" / {fmt(cap, 'g')}" if cap else "")
        sites.add_row(s["site"], str(s["num_examples"]), fmt_epsilon(s["epsilon"]),
                      fmt_epsilon(s.get("epsilon_prv")), dataset, fmt(s["delta"], ".1e"),
                      fmt(s["noise_multiplier"], ".3f"))
    console.print(sites)
    for row in doc.get("excluded", []):
        console.print(f"[yellow]excluded node {row['node_id']}: {escape(str(row['reason']))}[/yellow]")
    final = doc.get("final")
    if final:
        per_site = ", ".join(f"{s['site']} {fmt(s.get(k.AUC))}" for s in final.get("sites", []))
        pooled = final.get("auc_pooled")
        if pooled is not None:
            headline = f"Final test AUC pooled over hospitals: {fmt(pooled)}"
        else:  # some node declined to release score histograms
            headline = f"Final test AUC, weighted mean of sites: {fmt(final['metrics'].get(k.AUC))}"
        console.print(f"[bold]{headline}[/bold]  (per site: {per_site})")
    print_inference(doc.get("inference"))
    status = doc.get("status")
    if status != "completed":
        console.print(f"[red]run {status}: {escape(str(doc.get('reason', '')))}[/red]")
