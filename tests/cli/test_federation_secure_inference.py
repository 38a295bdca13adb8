"""`vesalius federation run --secure-aggregation on`: the final pooled inference is summed
securely, complete, and says which parts are hidden.

Three synthetic hospitals; the reference is scikit-learn on the pooled test patients, scored
directly with the run's final model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from cli.app import app
from common import messages as k
from common.config import NodeConfig, TrainPlan
from common.stats.bins import fine_score_edges, score_bin_index
from common.stats.calibration import ScoreCalibration
from server.inference_secure import HIDDEN
from tests.client.queries.federation import reference_scores


@pytest.mark.slow
def test_secure_simulation_inference_is_complete_and_says_what_is_hidden(tmp_path: Path) -> None:
    # Prepare: three synthetic hospitals
    data = tmp_path / "data"
    made = CliRunner().invoke(app, ["synth", "--sites", "3", "--patients", "60", "--out",
                                    str(data), "--seed", "5"])
    assert made.exit_code == 0, made.output
    out = tmp_path / "on"
    # Execute
    result = CliRunner().invoke(app, [
        "federation", "run", "--data-root", str(data), "--image-size", "16", "--batch-size", "8",
        "--rounds", "1", "--non-private", "--min-release-count", "1",
        "--out", str(out), "--ledger-dir", str(tmp_path / "ledgers"),
        "--secure-aggregation", "on"], terminal_width=200)
    # Assert: the run and its inference section completed ...
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((out / "report.json").read_text())
    inf = doc["inference"]
    assert doc["secure_aggregation"]["enabled"] and inf["status"] == "completed", inf
    assert inf["failures"] == [] and sorted(inf["sites"]) == ["site-1", "site-2", "site-3"]
    # ... it says what secure aggregation hid: per-site rows, meta-analysis, site histograms
    assert inf["per_site"] == HIDDEN and inf["secure_aggregation"]["covered"]
    assert inf["secure_aggregation"]["sites_summed"] == 3 and inf["meta"] == {}
    assert inf["roc"]["sites"] == {} and inf["auc_sites"] == []
    for key in ("accuracy", "sensitivity", "specificity", "auc"):
        assert inf["metrics"][key]["value"] is not None, key
    assert inf["operating_point"]["validation"] is not None
    # the recalibration fit ran on secure sums; after one round it may fail for the model's
    # sake (e.g. a non-positive slope: the map is then the identity), never for the sums'
    fit = inf["calibration"]["fit"]
    assert fit["status"] == "completed" or (
        fit["status"] == "failed" and "secure" not in str(fit["reason"])
        and "abandoned" not in str(fit["reason"])), fit
    assert inf["calibration"]["map"]["method"] in ("platt", "none", "identity") or \
        inf["calibration"]["map"], inf["calibration"]["map"]
    # ... and its pooled numbers are those of the pooled test patients
    plan = TrainPlan.from_record(doc["config"])
    state = torch.load(out / "checkpoints" / "final.pt")
    arrays = ArrayRecord(state)
    parts = [reference_scores(NodeConfig(data_dir=data / f"site-{i}", site_name=f"site-{i}",
                                         device="cpu"), arrays, k.SPLIT_TEST, plan)
             for i in (1, 2, 3)]
    s, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    assert inf["n"] == s.size
    # the AUC is that of the calibrated scores binned on the shared fine edges (what nodes
    # release; after one round the scores crowd together, so the bins make ties)
    cal_map = ScoreCalibration(**{key: inf["calibration"]["map"][key]
                                  for key in ("method", "intercept", "slope")})
    binned = score_bin_index(cal_map.apply(s), fine_score_edges())
    assert inf["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(y, binned), abs=1e-6)
    counts = np.histogram(s, bins=np.linspace(0, 1, 11))[0]
    assert inf["calibration"]["before"]["count"] == counts.tolist()
    assert (out / "report.html").exists()
