"""`vesalius federation run --secure-aggregation ... --min-survivors N`.

Usage errors come before anything starts; a simulated federation of three synthetic
hospitals (Flower's Ray runtime) trains under secure aggregation and its pooled model equals,
within the quantisation bound, the one the same non-private run trains without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from common.secagg.encoding import quantisation_bound


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def _sites(tmp_path: Path, n: int) -> Path:
    for i in range(1, n + 1):
        (tmp_path / "data" / f"site-{i}").mkdir(parents=True)
    return tmp_path / "data"


@pytest.mark.parametrize(("args", "expected"), [
    (["--secure-aggregation", "maybe"], "'maybe' is not one of"),
    (["--min-survivors", "1"], "secagg-min-survivors must be 0 (default) or at least 2"),
    (["--min-survivors", "-3"], "--min-survivors"),
    (["--min-survivors", "4"], "4 survivors cannot be reached with 3 hospitals"),
])
def test_bad_secure_aggregation_options_are_usage_errors(args: list[str], expected: str,
                                                         tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["federation", "run", "--data-root", str(_sites(tmp_path, 3)),
                                      "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert expected in _flat(result.output)
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_help_lists_the_secure_aggregation_options() -> None:
    result = CliRunner().invoke(app, ["federation", "run", "--help"], terminal_width=200)
    assert "--secure-aggregation" in result.output and "--min-survivors" in result.output
    assert "auto|on|off" in result.output


@pytest.mark.slow
def test_a_secure_simulation_trains_the_model_of_a_plain_one(tmp_path: Path) -> None:
    # Prepare: three synthetic hospitals; non-private so that both runs train the same steps
    data = tmp_path / "data"
    made = CliRunner().invoke(app, ["synth", "--sites", "3", "--patients", "24", "--out",
                                    str(data), "--seed", "6"])
    assert made.exit_code == 0, made.output
    base = ["federation", "run", "--data-root", str(data), "--image-size", "16",
            "--batch-size", "8", "--rounds", "1", "--non-private", "--min-release-count", "1",
            "--format", "json"]
    # Execute
    runs = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        result = CliRunner().invoke(app, [*base, "--out", str(out), "--ledger-dir",
                                          str(tmp_path / f"ledgers-{mode}"),
                                          "--secure-aggregation", mode], terminal_width=200)
        assert result.exit_code == 0, result.output[-3000:]
        runs[mode] = json.loads((out / "report.json").read_text())
    # Assert: the report says how the round was aggregated ...
    on, off = runs["on"], runs["off"]
    assert on["secure_aggregation"]["enabled"] and on["secure_aggregation"]["min_survivors"] == 3
    assert on["secure_aggregation"]["sessions"][0] == {
        **on["secure_aggregation"]["sessions"][0], "round": 1, "phase": "train", "status": "ok",
        "survivors": 3, "participants": 3, "dropped": []}
    assert all(row["num_examples"] is None for row in on["sites"])  # hidden per site
    assert not off["secure_aggregation"]["enabled"]
    assert "secure aggregation: on" in (tmp_path / "on" / "summary.txt").read_text()
    # ... and the pooled model is plain FedAvg's within the quantisation bound
    a = torch.load(tmp_path / "on" / "checkpoints" / "round-1.pt")
    b = torch.load(tmp_path / "off" / "checkpoints" / "round-1.pt")
    patients = sum(row["num_examples"] for row in off["sites"])
    for name in b:
        diff = (a[name].double() - b[name].double()).abs().max().item()
        assert diff <= quantisation_bound(3, 8) / patients + 1e-6, name
