"""Show a run's progress and report in the terminal."""

from __future__ import annotations

from typing import Any

from cli.console import console, fmt, table
from common import messages as k
from server.strategies.fedavg import RoundLog


def _eps(value: float | None) -> str:
    """Epsilon for people: missing or infinite means no DP guarantee at all."""
    if value is None or value == float("inf"):
        return "none (no DP)"
    return fmt(value, ".3f")


def print_round(entry: RoundLog, total: int) -> None:
    """One line per finished round: validation AUC and each site's epsilon so far."""
    m = entry.evaluate_metrics
    eps = ", ".join(f"{r.site} ε={_eps(r.metrics.get(k.EPSILON))}" for r in sorted(entry.train, key=lambda r: r.site))
    console.print(
        f"round {entry.round}/{total}: val AUC {fmt(m.get(k.AUC))}  acc {fmt(m.get(k.ACCURACY))}"
        f"  loss {fmt(m.get(k.LOSS), '.4f')}  |  {eps or 'no site trained'}"
    )
    for err in entry.errors:
        console.print(f"  [yellow]{err['site']} ({err['phase']}): {err['reason']}[/yellow]")


def print_report(doc: dict[str, Any]) -> None:
    """Per-round metrics, per-site privacy spend and the final pooled test AUC."""
    rounds = table("Federated evaluation (validation splits)", ["round", "AUC", "accuracy", "loss", "train loss"])
    for r in doc.get("rounds", []):
        m = r["metrics"]
        rounds.add_row(str(r["round"]), fmt(m.get(k.AUC)), fmt(m.get(k.ACCURACY)),
                       fmt(m.get(k.LOSS), ".4f"), fmt(m.get(k.TRAIN_LOSS), ".4f"))
    console.print(rounds)
    sites = table("Privacy spent per hospital (patient-level DP, RDP accountant)",
                  ["site", "patients", "ε", "δ", "noise σ"])
    for s in doc.get("sites", []):
        sites.add_row(s["site"], str(s["num_examples"]), _eps(s["epsilon"]),
                      fmt(s["delta"], ".1e"), fmt(s["noise_multiplier"], ".3f"))
    console.print(sites)
    final = doc.get("final")
    if final:
        per_site = ", ".join(f"{s['site']} {fmt(s.get(k.AUC))}" for s in final.get("sites", []))
        pooled = final.get("auc_pooled")
        if pooled is not None:
            headline = f"Final test AUC pooled over hospitals: {fmt(pooled)}"
        else:  # some node declined to release score histograms
            headline = f"Final test AUC, weighted mean of sites: {fmt(final['metrics'].get(k.AUC))}"
        console.print(f"[bold]{headline}[/bold]  (per site: {per_site})")
    status = doc.get("status")
    if status != "completed":
        console.print(f"[red]run {status}: {doc.get('reason', '')}[/red]")
