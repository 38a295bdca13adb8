"""The node's train handler against its privacy ledger, and its cross-validation modes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from client.app import build_client_app
from client.data import load_node_data
from client.mods import ERROR_CODE_REFUSED
from common import messages as k
from common.config import TrainPlan
from common.ledger import Ledger, verify_ledger
from common.models import build_model
from tests.flower_helpers import incoming, node_context

PLAN = TrainPlan(num_rounds=2, batch_size=8, learning_rate=0.05, target_epsilon=4.0,
                 image_size=16, run_id="run-a")


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("fed")
    synthesize_federation(root, n_sites=1, patients_per_site=40, seed=5)
    return root / "site-1"


def _arrays(plan: TrainPlan) -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(build_model(plan.model, in_channels=1, num_classes=2,
                                   image_size=plan.image_size).state_dict())


def _train(plan: TrainPlan, server_round: int) -> Message:
    config = ConfigRecord({**plan.to_record(), k.SERVER_ROUND: server_round})
    return incoming(RecordDict({k.ARRAYS: _arrays(plan), k.CONFIG: config}), MessageType.TRAIN)


def _evaluate(plan: TrainPlan, split: str) -> Message:
    config = ConfigRecord({**plan.to_record(), k.SPLIT: split})
    return incoming(RecordDict({k.ARRAYS: _arrays(plan), k.CONFIG: config}), MessageType.EVALUATE)


def _node(site_dir: Path, ledger_dir: Path, cap: float = 5.0, name: str = "h1") -> dict[str, object]:
    # 40 synthetic patients: small held-out splits, so releases are allowed from 1 patient.
    return {"data-dir": str(site_dir), "epsilon-cap": cap, "site-name": name,
            "ledger-dir": str(ledger_dir), "min-release-count": 1}


def test_every_round_is_in_the_ledger_and_matches_the_trainer(site_dir: Path, tmp_path: Path) -> None:
    app = build_client_app()
    ctx = node_context(_node(site_dir, tmp_path))
    replies = [app(_train(PLAN, r), ctx) for r in (1, 2)]
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
    ledger = Ledger(tmp_path / "ledger.jsonl")
    records = ledger.read().records
    assert [r.entry.round for r in records] == [1, 2]
    assert {r.entry.run_id for r in records} == {"run-a"}
    fingerprint = records[0].entry.fingerprint
    assert fingerprint == load_node_data(site_dir, image_size=16).fingerprint
    last = replies[-1].content[k.METRICS]
    # The trainer's dataset epsilon (composed from the ledger's history) is the ledger's spend.
    assert ledger.spend(fingerprint).epsilon_rdp == pytest.approx(last[k.EPSILON_DATASET], rel=1e-9)
    assert records[-1].entry.epsilon_reported == pytest.approx(last[k.EPSILON_DATASET], rel=1e-9)
    # First run on this dataset: the run's epsilon is the dataset's.
    assert last[k.EPSILON] == pytest.approx(last[k.EPSILON_DATASET], rel=1e-9)
    assert last[k.EPSILON_PRV] > 0 and last[k.EPSILON_CAP] == 5.0
    assert verify_ledger(tmp_path / "ledger.jsonl").ok


def test_a_second_run_over_the_dataset_cap_is_refused_and_nothing_trains(
    site_dir: Path, tmp_path: Path
) -> None:
    app = build_client_app()
    first = node_context(_node(site_dir, tmp_path), run_id=1)
    for r in (1, 2):
        assert not app(_train(PLAN, r), first).has_error()
    ledger_file = tmp_path / "ledger.jsonl"
    before = ledger_file.read_bytes()
    # A new run (new Flower context, new run id): its own plan fits the cap, but together
    # with what the dataset already spent it would not.
    second_plan = dataclasses.replace(PLAN, run_id="run-b")
    reply = app(_train(second_plan, 1), node_context(_node(site_dir, tmp_path), run_id=2))
    assert reply.has_error() and reply.error.code == ERROR_CODE_REFUSED
    assert "already spent" in reply.error.reason and "cap of 5" in reply.error.reason
    assert "Nothing was trained" in reply.error.reason
    assert ledger_file.read_bytes() == before  # nothing recorded, nothing trained


def test_kfold_trains_on_other_folds_and_evaluates_the_held_out_one(
    site_dir: Path, tmp_path: Path
) -> None:
    app = build_client_app()
    plan = dataclasses.replace(PLAN, cv_mode="kfold", num_folds=3, fold=1, num_rounds=1)
    ctx = node_context(_node(site_dir, tmp_path, cap=10.0))
    data = load_node_data(site_dir, image_size=16)
    total = data.train.num_patients + data.val.num_patients + data.test.num_patients
    reply = app(_train(plan, 1), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    trained = int(reply.content[k.METRICS][k.NUM_EXAMPLES])
    held = app(_evaluate(plan, k.SPLIT_HELDOUT), ctx)
    assert not held.has_error(), held.error.reason if held.has_error() else ""
    assert trained + int(held.content[k.METRICS][k.NUM_EXAMPLES]) == total
    entry = Ledger(tmp_path / "ledger.jsonl").read().records[0].entry
    assert entry.fold == 1 and entry.params["cv_mode"] == "kfold"


def test_kfold_plans_the_budget_for_every_fold(site_dir: Path, tmp_path: Path) -> None:
    # 3 folds x 2 rounds with the noise of a 2-round plan at epsilon 4 would exceed cap 5: the
    # node plans noise for all folds itself, so the whole CV fits the target.
    app = build_client_app()
    plan = dataclasses.replace(PLAN, cv_mode="kfold", num_folds=3, fold=0)
    ctx = node_context(_node(site_dir, tmp_path, cap=5.0))
    reply = app(_train(plan, 1), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    sigma_cv = reply.content[k.METRICS][k.NOISE_MULTIPLIER]
    plain = app(_train(dataclasses.replace(PLAN, run_id="x"), 1),
                node_context(_node(site_dir, tmp_path / "other", cap=5.0)))
    assert sigma_cv > plain.content[k.METRICS][k.NOISE_MULTIPLIER]


def test_leave_one_site_out_holdout_trains_nothing_and_spends_nothing(
    site_dir: Path, tmp_path: Path
) -> None:
    app = build_client_app()
    plan = dataclasses.replace(PLAN, cv_mode="loso", num_folds=2, fold=0, holdout_site="h1")
    ctx = node_context(_node(site_dir, tmp_path, name="h1"))
    request = _train(plan, 1)
    reply = app(request, ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content[k.METRICS]
    assert metrics[k.NUM_EXAMPLES] == 0 and metrics[k.STEPS] == 0
    sent = request.content[k.ARRAYS].to_torch_state_dict()
    back = reply.content[k.ARRAYS].to_torch_state_dict()
    assert all(torch.equal(sent[name], back[name]) for name in sent)
    assert not (tmp_path / "ledger.jsonl").exists() or not Ledger(
        tmp_path / "ledger.jsonl").read().records
    held = app(_evaluate(plan, k.SPLIT_HELDOUT), ctx)
    data = load_node_data(site_dir, image_size=16)
    total = data.train.num_patients + data.val.num_patients + data.test.num_patients
    assert held.content[k.METRICS][k.NUM_EXAMPLES] == total


def test_heldout_split_without_cv_is_a_clear_error(site_dir: Path, tmp_path: Path) -> None:
    app = build_client_app()
    reply = app(_evaluate(PLAN, k.SPLIT_HELDOUT), node_context(_node(site_dir, tmp_path)))
    assert reply.has_error() and "cv-mode" in reply.error.reason


def test_evaluation_releases_are_on_the_record_but_not_on_the_cap(
    site_dir: Path, tmp_path: Path
) -> None:
    app = build_client_app()
    ctx = node_context(_node(site_dir, tmp_path))
    assert not app(_train(PLAN, 1), ctx).has_error()
    assert not app(_evaluate(PLAN, k.SPLIT_VAL), ctx).has_error()
    ledger = Ledger(tmp_path / "ledger.jsonl")
    levels = [(r.entry.release, r.entry.level) for r in ledger.read().records]
    assert levels == [("train", "patient"), ("evaluate:val", "exact")]
    fingerprint = ledger.read().records[0].entry.fingerprint
    assert ledger.spend(fingerprint).entries == 1  # the exact release is not composed
    assert verify_ledger(tmp_path / "ledger.jsonl").ok


def test_the_ledger_head_in_replies_catches_removed_entries(site_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.app import app as cli

    node_app = build_client_app()
    ctx = node_context(_node(site_dir, tmp_path))
    replies = [node_app(_train(PLAN, r), ctx) for r in (1, 2)]
    head = str(replies[-1].content[k.NODE_INFO][k.LEDGER_HEAD])
    ledger_file = tmp_path / "ledger.jsonl"
    assert verify_ledger(ledger_file, expect_heads=[head]).ok
    # Cut the last entry: the chain alone still verifies, the anchor does not.
    lines = ledger_file.read_bytes().splitlines(keepends=True)
    ledger_file.write_bytes(b"".join(lines[:-1]))
    assert verify_ledger(ledger_file).ok
    report = verify_ledger(ledger_file, expect_heads=[head])
    assert not report.ok and "entries were removed" in report.problems[0].reason
    result = CliRunner().invoke(cli, ["audit", "verify", "--ledger", str(ledger_file),
                                      "--expect-head", head])
    assert result.exit_code == 1 and "entries were removed" in result.output
