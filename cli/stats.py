"""``vesalius stats``: planning numbers for review boards (sample size and power).

Thin wiring of :mod:`common.stats.power`; the formulas and their references are there.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from cli.console import console, err_console, fmt, table
from common.errors import ConfigError

stats_app = typer.Typer(help="Study planning: patients needed for a target precision or power.",
                        no_args_is_help=True)
power_app = typer.Typer(help="Sample size for an AUC interval, an AUC difference or McNemar.",
                        no_args_is_help=True)
stats_app.add_typer(power_app, name="power")

_FORMAT = typer.Option("table", "--format", help="table or json.")
_ALPHA = typer.Option(0.05, "--alpha", help="1 - confidence level (two-sided).")
_POWER = typer.Option(0.8, "--power", help="Power to detect the difference.")
_PREVALENCE = typer.Option(0.5, "--prevalence", help="Expected share of positive patients.")


def _show(title: str, result: dict[str, Any], output_format: str) -> None:
    if output_format == "json":
        console.print_json(json.dumps(result))
        return
    t = table(title, ["quantity", "value"])
    for key, value in result.items():
        t.add_row(key.replace("_", " "), fmt(value) if isinstance(value, float) else str(value))
    console.print(t)


def _run(title: str, output_format: str, compute: Any) -> None:
    if output_format not in ("table", "json"):
        raise typer.BadParameter("--format must be table or json")
    try:
        result = compute()
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    _show(title, result, output_format)


@power_app.command("auc")
def auc_halfwidth(
    auc: float = typer.Option(..., "--auc", help="Expected AUC."),
    halfwidth: float = typer.Option(..., "--half-width", help="Target half-width of its CI."),
    prevalence: float = _PREVALENCE,
    alpha: float = _ALPHA,
    output_format: str = _FORMAT,
) -> None:
    """Patients needed for an AUC confidence interval of a given half-width (Hanley-McNeil)."""
    from common.stats.power import n_for_auc_halfwidth

    _run("Patients for the AUC interval", output_format,
         lambda: n_for_auc_halfwidth(auc, halfwidth, prevalence=prevalence, alpha=alpha))


@power_app.command("auc-diff")
def auc_difference(
    auc1: float = typer.Option(..., "--auc1"),
    auc2: float = typer.Option(..., "--auc2"),
    r: float = typer.Option(0.0, "--r", help="Correlation of the two AUCs (0: independent "
                            "samples, counts per sample; > 0: paired, shared patients)."),
    prevalence: float = _PREVALENCE,
    alpha: float = _ALPHA,
    power: float = _POWER,
    output_format: str = _FORMAT,
) -> None:
    """Patients needed to detect an AUC difference (Hanley-McNeil / Obuchowski-McClish)."""
    from common.stats.power import n_for_auc_difference

    _run("Patients to detect the AUC difference", output_format,
         lambda: n_for_auc_difference(auc1, auc2, r=r, prevalence=prevalence, alpha=alpha,
                                      power=power))


@power_app.command("mcnemar")
def mcnemar(
    p10: float = typer.Option(..., "--p10", help="Share of pairs only model A gets right."),
    p01: float = typer.Option(..., "--p01", help="Share of pairs only model B gets right."),
    alpha: float = _ALPHA,
    power: float = _POWER,
    output_format: str = _FORMAT,
) -> None:
    """Paired patients needed for McNemar's test (Connor 1987)."""
    from common.stats.power import n_for_mcnemar

    _run("Pairs for McNemar's test", output_format,
         lambda: n_for_mcnemar(p10, p01, alpha=alpha, power=power))
