"""`vesalius federation run --paradigm ensemble`: members trained as sub-runs sharing the ε,
each on every hospital's ledger, and the paradigm section comparing a single member with the
ensemble on the pooled test patients (tiny synthetic hospitals, 1 round)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from cli.app import app

SITES, PATIENTS, SIZE = 2, 40, 16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("ensemble-data")
    synthesize_federation(root, n_sites=SITES, patients_per_site=PATIENTS,
                          images_per_patient=(1, 2), image_size=SIZE, seed=1)
    return root


def _pooled_test(data: Path, out: Path, members: int) -> tuple[np.ndarray, np.ndarray]:
    """Each member's class-1 probability per pooled test patient (as the nodes score them)."""
    import torch

    from client.data.task_data import load_task_data
    from client.training import evaluate
    from common.models import build_model
    from common.tasks import get_task

    probs, labels = [], None
    for i in range(members):
        model = build_model("cnn", in_channels=1, num_classes=2, image_size=SIZE, spatial_dims=2)
        model.load_state_dict(torch.load(out / f"member-{i}" / "checkpoints" / "final.pt",
                                         map_location="cpu", weights_only=True))
        scores, truth = [], []
        for site in sorted(p for p in data.iterdir() if p.is_dir()):
            test = load_task_data(site, image_size=SIZE, seed=0).test
            res = evaluate(model, test.images, test.labels, patient_index=test.patient_index,
                           device="cpu", task=get_task("binary"), num_classes=2)
            scores.append(res.scores)
            truth.append(res.labels)
        probs.append(np.concatenate(scores))
        labels = np.concatenate(truth)
    assert labels is not None
    return np.vstack(probs), labels


def _binned(scores: np.ndarray) -> np.ndarray:
    """Scores as the ensemble's released AUC sees them: their bin among 10,000 on [0, 1].

    Two patients within 1e-4 of each other share a bin and count as a tie; on these few test
    patients one such tie moves the AUC by 1/(2 n_pos n_neg) (0.036 here), so sklearn is given
    the same bins, not the raw scores.
    """
    from server.paradigms.ensemble import SCORE_BINS

    return np.minimum(np.floor(np.clip(scores, 0.0, 1.0) * SCORE_BINS), SCORE_BINS - 1)


def _ledger(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line)["entry"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("options", [("members=2",),
                                     ("members=2", "method=bagging", "combine=weighted"),
                                     ("members=2", "uncertainty=both", "dropout=0.3",
                                      "mc-samples=4")])
def test_an_ensemble_trains_its_members_and_reports_single_vs_ensemble(
    options: tuple[str, ...], data: Path, tmp_path: Path
) -> None:
    # Prepare
    out = tmp_path / "out"
    extra = [arg for opt in options for arg in ("-P", opt)]
    # Execute
    result = CliRunner().invoke(app, [
        "federation", "run", "--data-root", str(data), "--rounds", "1", "--image-size",
        str(SIZE), "--min-release-count", "1", "--ledger-dir", str(out / "ledgers"),
        "--out", str(out), "--epsilon", "8", "--paradigm", "ensemble", *extra],
        env={"COLUMNS": "300"})
    # Assert: the run, its members' own reports and the paradigm section
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((out / "report.json").read_text())
    assert doc["status"] == "completed", doc.get("reason")
    section = doc["paradigm"]
    assert section["name"] == "ensemble" and section["status"] == "completed"
    run_id = doc["run_id"]
    members = section["members"]
    assert [m["run_id"] for m in members] == [f"{run_id}-member-{i}" for i in range(2)]
    assert [m["target_epsilon"] for m in members] == [4.0, 4.0]
    for i in range(2):
        assert json.loads((out / f"member-{i}" / "report.json").read_text())["status"] == "completed"
    comp = section["comparison"]
    assert [r["model"] for r in comp["rows"]][0] == "single member (member 0)"
    for row in comp["rows"]:
        assert 0.0 <= row["auc"] <= 1.0 and 0.0 <= row["ece"] <= 1.0
        assert 0.0 <= row["coverage"] <= 1.0 and 0.0 <= row["mean_set_size"] <= 2.0
    assert comp["target_coverage"] == pytest.approx(0.9)
    mc = "uncertainty=both" in options
    assert [u["uncertainty"] for u in comp["uncertainty"]] == [
        "single MC-dropout entropy" if mc else "single predictive entropy",
        "ensemble disagreement (variance)", "ensemble predictive entropy"]
    assert all(0.0 <= u["error_auroc"] <= 1.0 for u in comp["uncertainty"] if u["errors"])
    if mc:  # member 0's MC-dropout mean: a third model with its own sets and figures
        assert comp["rows"][2]["model"] == "member 0, MC-dropout mean of 4 passes"
        assert comp["uncertainty"][0]["model"] == comp["rows"][2]["model"]
        assert any("MC-dropout: 4 stochastic passes" in n for n in section["notes"])
    assert sum(comp["weights"]) == pytest.approx(1.0)
    titles = [t["title"] for t in section["tables"]]
    assert titles[0].startswith("Single member vs ensemble")
    assert len(section["tables"][0]["rows"]) == (3 if mc else 2)
    assert "Single member vs ensemble" in " ".join(result.output.split())
    # Assert: the Result headline is the ensemble's pooled AUC (report.json, summary.txt,
    # report.html and the screen), not member 0's
    head = section["headline"]
    assert head["value"] == pytest.approx(comp["rows"][1]["auc"], abs=1e-12)
    assert head["lower"] <= head["value"] <= head["upper"]
    line = f"Pooled test AUC of the ensemble (2 members, {section['options']['combine']}): " \
           f"{head['value']:.3f}"
    assert any(x.startswith(line) for x in (out / "summary.txt").read_text().splitlines())
    assert "final test AUC" not in (out / "summary.txt").read_text()
    assert line in " ".join(result.output.split())
    assert "Final test AUC pooled over hospitals" not in result.output
    html = (out / "report.html").read_text()
    assert line in html[html.index('id="result"'):html.index('id="paradigm"')]
    # Assert: every hospital's ledger holds each member's training and the ensemble's queries,
    # and its total ε over the members is the table's and within the run's ε
    eps_rows = {row[0]: row for row in section["epsilon_per_hospital"]["rows"]}
    for site in ("site-1", "site-2"):
        entries = _ledger(out / "ledgers" / site / "ledger.jsonl")
        trained = [e for e in entries if e["release"] == "train"]
        drawn = [m for m in members
                 if m["hospitals_drawn"] is None or site in m["hospitals_drawn"]]
        assert {e["run_id"] for e in trained} == {m["run_id"] for m in drawn}
        *member_eps, summed, ledger_total, cap = eps_rows[site][1:]
        assert summed == pytest.approx(sum(e for e in member_eps if e is not None))
        assert trained[-1]["epsilon_reported"] == pytest.approx(ledger_total, abs=1e-6)
        assert ledger_total <= summed + 1e-9 and summed <= 8.0
        assert sum(e["release"] == "query:ensemble-scores" and e["run_id"] == run_id
                   for e in entries) >= 2  # validation and test
    if "method=bagging" not in options:
        # Assert: the pooled figures are sklearn's on the pooled test patients' scores
        probs, y = _pooled_test(data, out, 2)
        ensemble = probs.mean(axis=0)
        assert comp["rows"][0]["auc"] == pytest.approx(roc_auc_score(y, _binned(probs[0])),
                                                       abs=5e-3)
        assert comp["rows"][1]["auc"] == pytest.approx(roc_auc_score(y, _binned(ensemble)),
                                                       abs=5e-3)
        # accuracy at the ensemble's operating threshold, chosen on the validation patients
        threshold = comp["rows"][1]["threshold"]
        assert 0.0 <= threshold <= 1.0
        assert comp["rows"][1]["accuracy"] == pytest.approx(
            np.mean((ensemble >= threshold - 1e-12) == y))
    if "method=bagging" in options:
        assert all(sum(m["hospitals_drawn"].values()) == SITES for m in members)


@pytest.mark.slow
def test_a_stacker_is_trained_with_dp_on_validation_patients_and_combines_the_members(
    data: Path, tmp_path: Path
) -> None:
    from client.queries.ensemble import stacked

    # Prepare
    out = tmp_path / "out"
    # Execute
    result = CliRunner().invoke(app, [
        "federation", "run", "--data-root", str(data), "--rounds", "1", "--image-size",
        str(SIZE), "--min-release-count", "1", "--ledger-dir", str(out / "ledgers"),
        "--out", str(out), "--epsilon", "8", "--paradigm", "ensemble", "-P", "members=2",
        "-P", "combine=stacker", "-P", "stacker-rounds=2", "-P", "stacker-share=0.25"],
        env={"COLUMNS": "300"})
    # Assert: the ε split (members share 75 %, the stacker 25 %) and the stacker's head
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((out / "report.json").read_text())
    section = doc["paradigm"]
    assert section["status"] == "completed", section.get("reason")
    run_id = doc["run_id"]
    assert [m["target_epsilon"] for m in section["members"]] == [3.0, 3.0]
    stacker = section["stacker"]
    assert stacker["run_id"] == f"{run_id}-stacker" and stacker["target_epsilon"] == 2.0
    assert len(stacker["weights"]) == 2 and len(stacker["rounds"]) == 2
    assert all(np.isfinite(stacker["head"])) and stacker["head"] != [0.5, 0.5, 0.0]
    assert any(t["title"].startswith("Stacker") for t in section["tables"])
    assert any("validation patients" in note for note in section["notes"])
    # Assert: the ensemble is the stacked members, its AUC sklearn's on the pooled test
    # patients, and the headline
    probs, y = _pooled_test(data, out, 2)
    ens = stacked(probs, np.asarray(stacker["head"]))
    comp = section["comparison"]
    assert comp["rows"][1]["model"] == "ensemble (stacker)"
    assert comp["rows"][1]["auc"] == pytest.approx(roc_auc_score(y, _binned(ens)), abs=5e-3)
    assert section["headline"]["value"] == pytest.approx(comp["rows"][1]["auc"], abs=1e-12)
    # Assert: every hospital's ledger holds the stacker's rounds, on its validation patients,
    # and its total over members and stacker is within the run's ε
    eps_rows = {row[0]: row for row in section["epsilon_per_hospital"]["rows"]}
    assert section["epsilon_per_hospital"]["columns"][-4] == "stacker ε"
    for site in ("site-1", "site-2"):
        entries = _ledger(out / "ledgers" / site / "ledger.jsonl")
        rounds = [e for e in entries if e["release"] == "train" and e["run_id"] == stacker["run_id"]]
        assert len(rounds) == 2
        *_, stacker_eps, summed, ledger_total, _cap = eps_rows[site]
        assert stacker_eps == pytest.approx(stacker["epsilon"][site]) and 0 < stacker_eps <= 2.0
        assert rounds[-1]["epsilon_reported"] == pytest.approx(ledger_total, abs=1e-6)
        assert ledger_total <= summed + 1e-9 and summed <= 8.0
