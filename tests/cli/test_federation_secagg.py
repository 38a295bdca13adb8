"""`vesalius federation run --secure-aggregation ... --min-survivors N --secagg-neighbours K`.

Usage errors come before anything starts; a simulated federation of three synthetic
hospitals (full sharing), and one of five whose hospitals share with two neighbours each
(SecAgg+), train under secure aggregation and their pooled models equal, within the
quantisation bound, the ones the same non-private runs train without it.
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
    (["--secagg-neighbours", "1"], "secagg-neighbours must be 0 (default) or at least 2"),
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
    assert "--secagg-neighbours" in result.output
    assert "auto|on|off" in result.output


@pytest.mark.slow
@pytest.mark.parametrize(("sites", "extra"), [(3, []), (5, ["--secagg-neighbours", "2"])],
                         ids=["full", "sparse"])
def test_a_secure_simulation_trains_the_model_of_a_plain_one(tmp_path: Path, sites: int,
                                                             extra: list[str]) -> None:
    # Prepare: synthetic hospitals; non-private so that both runs train the same steps. With
    # 5 hospitals and 2 neighbours each, every session is sparse (SecAgg+): a ring of groups
    data = tmp_path / "data"
    made = CliRunner().invoke(app, ["synth", "--sites", str(sites), "--patients", "24", "--out",
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
                                          "--secure-aggregation", mode, *extra],
                                 terminal_width=200)
        assert result.exit_code == 0, result.output[-3000:]
        runs[mode] = json.loads((out / "report.json").read_text())
    # Assert: the report says how the round was aggregated ...
    on, off = runs["on"], runs["off"]
    section = on["secure_aggregation"]
    assert section["enabled"] and section["min_survivors"] == (3 if sites == 3 else 4)
    assert section["sessions"][0] == {
        **section["sessions"][0], "round": 1, "phase": "train", "status": "ok",
        "survivors": sites, "participants": sites, "dropped": []}
    assert all(row["status"] == "ok" for row in section["sessions"])
    assert len(section["sessions"]) >= 3  # the round's train and validation, the statistics
    assert all(row["num_examples"] is None for row in on["sites"])  # hidden per site
    assert not off["secure_aggregation"]["enabled"]
    summary = (tmp_path / "on" / "summary.txt").read_text()
    assert "secure aggregation: on" in summary
    if sites == 3:
        assert section["neighbours"] == 2 and "neighbours" not in section["sessions"][0]
        assert "shared its mask secrets with every other" in summary
    else:
        assert section["neighbours"] == 2 and section["sessions"][0]["neighbours"] == 2
        assert section["sessions"][0]["share_threshold"] == 2
        assert "2 randomly drawn neighbours, not all 4 others (SecAgg+" in summary
    # ... and the pooled model is plain FedAvg's within the quantisation bound
    a = torch.load(tmp_path / "on" / "checkpoints" / "round-1.pt")
    b = torch.load(tmp_path / "off" / "checkpoints" / "round-1.pt")
    patients = sum(row["num_examples"] for row in off["sites"])
    for name in b:
        diff = (a[name].double() - b[name].double()).abs().max().item()
        assert diff <= quantisation_bound(sites, 8) / patients + 1e-6, name
