"""`vesalius federation run --resume OUT`: a run interrupted mid-round continues from its last
checkpoint, and no hospital's ledger counts a round twice or loses one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from common.ledger import Ledger, verify_ledger
from server.strategies.fedavg import VesaliusFedAvg

pytestmark = pytest.mark.slow


def test_an_interrupted_run_resumes_and_every_ledger_has_each_round_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two hospitals; the coordinator "dies" while aggregating round 2, after the
    # nodes trained it (and charged it to their ledgers)
    data, out, ledgers = tmp_path / "data", tmp_path / "run", tmp_path / "ledgers"
    made = CliRunner().invoke(app, ["synth", "--sites", "2", "--patients", "30", "--out",
                                    str(data), "--seed", "4"])
    assert made.exit_code == 0, made.output
    args = ["federation", "run", "--data-root", str(data), "--image-size", "16",
            "--batch-size", "8", "--out", str(out), "--ledger-dir", str(ledgers),
            "--min-release-count", "1"]
    real_save = VesaliusFedAvg.save_checkpoint

    def dies_in_round_2(self: VesaliusFedAvg, server_round: int, arrays: object) -> None:
        if server_round == 2:
            raise SystemExit("coordinator killed")
        real_save(self, server_round, arrays)  # type: ignore[arg-type]

    monkeypatch.setattr(VesaliusFedAvg, "save_checkpoint", dies_in_round_2)
    first = CliRunner().invoke(app, [*args, "--rounds", "3"], terminal_width=200)
    assert json.loads((out / "report.json").read_text())["status"] != "completed", first.output
    monkeypatch.setattr(VesaliusFedAvg, "save_checkpoint", real_save)
    run_id = json.loads((out / "report.json").read_text())["run_id"]
    # Execute: resume (training options are the run's own; a conflicting --rounds is ignored)
    resumed = CliRunner().invoke(app, ["federation", "run", "--resume", str(out), "--data-root",
                                       str(data), "--ledger-dir", str(ledgers),
                                       "--min-release-count", "1", "--rounds", "9"],
                                 terminal_width=200)
    # Assert: completed with rounds 1-3, the same run id, resumed after round 1
    assert resumed.exit_code == 0, resumed.output[-3000:]
    doc = json.loads((out / "report.json").read_text())
    assert doc["status"] == "completed" and doc["run_id"] == run_id
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3]
    assert doc["resumed"][0]["from_round"] == 1 and doc["resumed"][0]["rounds_run_again"] == []
    # ... each hospital's ledger holds rounds 1-3 of the run once each (round 2, trained before
    # the crash, was answered again from the reply kept, not trained and charged again)
    files = sorted(ledgers.rglob("ledger.jsonl"))
    assert len(files) == 2
    for path in files:
        rounds = [r.entry.round for r in Ledger(path).read().records
                  if r.entry.release == "train" and r.entry.run_id == run_id]
        assert rounds == [1, 2, 3], (path.parent.name, rounds)
        assert verify_ledger(path).ok
    # ... and the run's epsilon kept composing across the restart
    eps = [{row["site"]: row["epsilon"] for row in r["train"]} for r in doc["rounds"]]
    for site in eps[0]:
        assert eps[0][site] < eps[1][site] < eps[2][site]
