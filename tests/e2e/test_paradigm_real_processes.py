"""A learning paradigm through a real deployment: semi-supervised learning with augmentation.

A TLS SuperLink and two `vesalius node start` hospitals (warm workers), as in
:mod:`tests.e2e.test_real_processes`; the operator runs `federation run --superlink ...
--paradigm semi-supervised -P labelled-fraction=0.5 --augment light`. The paradigm and its
options travel in every train message's plan, each node builds its semi-supervised step
(labelled plus hidden-label patients, pseudo-labels and consistency, augmented records) and
charges its ledger for every training patient; the report carries the paradigm section.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_real_processes import Processes, _vesalius, procs, start_deployment

__all__ = ["procs"]  # the fixture, shared with the other real-process test

pytestmark = pytest.mark.slow


def test_semi_supervised_with_augmentation_on_real_processes(
    tmp_path: Path, procs: Processes
) -> None:
    # Prepare: two hospitals' binary data, a TLS SuperLink and two SuperNodes
    data = tmp_path / "data"
    subprocess.run(_vesalius("synth", "--sites", "2", "--patients", "40", "--out", str(data),
                             "--seed", "21"), env=procs.env, check=True, capture_output=True)
    link, ca = start_deployment(tmp_path, procs, data)
    out = tmp_path / "run"
    # Execute
    run = subprocess.run(
        _vesalius("federation", "run", "--superlink", f"127.0.0.1:{link}", "--root-certificates",
                  ca, "--paradigm", "semi-supervised", "-P", "labelled-fraction=0.5",
                  "--augment", "light", "--rounds", "2", "--batch-size", "8", "--image-size",
                  "16", "--out", str(out), "--flwr-home", str(tmp_path / "operator-home")),
        env=procs.env, capture_output=True, text=True, timeout=900,
    )
    # Assert
    logs = "\n".join(p.read_text(errors="replace")[-3000:]
                     for p in (tmp_path / "logs").glob("*.log"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + logs
    doc = json.loads((out / "report.json").read_text())
    assert doc["status"] == "completed"
    assert doc["config"]["paradigm"] == "semi-supervised"
    assert json.loads(doc["config"]["paradigm-options"])["labelled-fraction"] == 0.5
    assert doc["config"]["augment"] == "light"
    section = doc["paradigm"]
    assert section["name"] == "semi-supervised" and section["options"]["labelled-fraction"] == 0.5
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert sorted(s["site"] for s in doc["sites"]) == ["site-1", "site-2"]
    assert all(0 < s["epsilon"] <= 8 for s in doc["sites"])
    # the final model was evaluated at every hospital and the pooled inference ran (its AUC
    # may be withheld on so few test patients)
    assert 0 <= doc["final"]["metrics"]["auc"] <= 1
    assert doc["inference"]["status"] == "completed"
    shown = run.stdout + run.stderr
    assert "Traceback" not in shown and "paradigm: semi-supervised" in shown
