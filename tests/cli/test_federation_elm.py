"""`vesalius federation run --model dc-elm`: the closed-form readout workflow through the CLI.

A simulated federation (Flower's Ray runtime) of three small synthetic hospitals. The run is
the DC-ELM workflow (:mod:`server.elm_workflow`): one ``elm-readout`` round, no DP-SGD.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app

_APP = Path(__file__).resolve().parents[2] / "server" / "app.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif("elm_workflow" not in _APP.read_text(encoding="utf-8"),
                       reason="server/app.py does not dispatch ELM-family runs to "
                       "server.elm_workflow.run_elm_workflow yet"),
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("elm-cli") / "data"
    synthesize_federation(root, n_sites=3, patients_per_site=40, images_per_patient=(1, 3),
                          image_size=16, seed=3)
    return root


def _run(data_root: Path, tmp_path: Path, *extra: str) -> tuple[int, str, dict[str, object]]:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "federation", "run", "--data-root", str(data_root), "--model", "dc-elm",
        "--image-size", "16", "--min-nodes", "3", "--min-release-count", "1",
        "--ledger-dir", str(tmp_path / "ledgers"), "--out", str(out), *extra,
    ], terminal_width=200)
    doc = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return result.exit_code, result.output, doc


def test_a_dc_elm_run_is_one_closed_form_readout(data_root: Path, tmp_path: Path) -> None:
    # Execute: a baseline the simulated hospitals consent to (they release exact sums)
    code, output, doc = _run(data_root, tmp_path, "--non-private")
    # Assert: the ELM workflow ran (one readout round, no training rounds) and completed
    assert code == 0, output[-3000:]
    assert doc["status"] == "completed", doc["reason"]
    workflow = doc["workflow"]
    assert isinstance(workflow, dict) and workflow["name"] == "elm-readout"
    assert workflow["nodes"] == 3 and workflow["features"] == 257
    rounds = doc["rounds"]
    assert isinstance(rounds, list) and len(rounds) == 1
    final = doc["final"]
    assert isinstance(final, dict) and final["auc_pooled"] > 0.8
    assert (tmp_path / "run" / "checkpoints" / "final.pt").exists()
    assert (tmp_path / "run" / "report.html").exists()
    assert "Traceback" not in output


def test_a_private_dc_elm_run_is_noised_by_the_plan_and_completes(
    data_root: Path, tmp_path: Path
) -> None:
    # The readout is a training release: a private plan sets its noise (target epsilon 8),
    # even at simulated hospitals that release their held-out statistics exactly.
    code, output, doc = _run(data_root, tmp_path)
    assert code == 0 and doc.get("status") == "completed", output[-3000:]
    assert all(0 < s["epsilon"] <= 8.0 + 1e-6 for s in doc["sites"])
    assert doc["workflow"]["noised"] and doc["final"]["auc_pooled"] > 0.6
    assert "Traceback" not in output
