"""`vesalius stats power`: the planning numbers of common.stats.power, as a command."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cli.app import app
from common.stats.power import n_for_auc_difference, n_for_auc_halfwidth, n_for_mcnemar


def _json(args: list[str]) -> dict[str, object]:
    result = CliRunner().invoke(app, ["stats", "power", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    doc: dict[str, object] = json.loads(result.output)
    return doc


def test_power_commands_return_the_library_results() -> None:
    assert _json(["auc", "--auc", "0.85", "--half-width", "0.05", "--prevalence", "0.3"]) == \
        n_for_auc_halfwidth(0.85, 0.05, prevalence=0.3)
    assert _json(["auc-diff", "--auc1", "0.85", "--auc2", "0.9", "--r", "0.5"]) == \
        n_for_auc_difference(0.85, 0.9, r=0.5)
    assert _json(["mcnemar", "--p10", "0.1", "--p01", "0.05", "--power", "0.9"]) == \
        n_for_mcnemar(0.1, 0.05, power=0.9)


def test_impossible_inputs_get_a_clear_error() -> None:
    result = CliRunner().invoke(app, ["stats", "power", "auc", "--auc", "1.5",
                                      "--half-width", "0.05"])
    assert result.exit_code == 2 and "auc must lie strictly between 0 and 1" in result.output
