"""A node restarted mid-run, and a round asked again after the coordinator resumed a run.

A restarted node has a fresh Flower context; its run's epsilon must continue from its ledger.
A resumed coordinator asks for a round again with the same model: the node sends the reply it
already released (no new DP noise, no new ledger entry); any other request trains and is
charged as usual.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from client.app import build_client_app
from common import messages as k
from common.config import TrainPlan
from common.ledger import Ledger, verify_ledger
from common.models import build_model
from tests.flower_helpers import incoming, node_context

PLAN = TrainPlan(num_rounds=3, batch_size=8, learning_rate=0.05, target_epsilon=4.0,
                 image_size=16, run_id="run-r")


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("fed")
    synthesize_federation(root, n_sites=1, patients_per_site=40, seed=6)
    return root / "site-1"


def _train(server_round: int, seed: int = 0) -> Message:
    torch.manual_seed(seed)
    arrays = ArrayRecord(build_model(PLAN.model, in_channels=1, num_classes=2,
                                     image_size=PLAN.image_size).state_dict())
    config = ConfigRecord({**PLAN.to_record(), k.SERVER_ROUND: server_round})
    return incoming(RecordDict({k.ARRAYS: arrays, k.CONFIG: config}), MessageType.TRAIN)


def _node(site_dir: Path, ledger_dir: Path) -> dict[str, object]:
    return {"data-dir": str(site_dir), "epsilon-cap": 8.0, "site-name": "h1",
            "ledger-dir": str(ledger_dir), "min-release-count": 1}


def test_a_restarted_node_continues_the_runs_epsilon_from_its_ledger(
    site_dir: Path, tmp_path: Path
) -> None:
    # Prepare: one node process trains rounds 1-2; reference: the same node never restarted
    app = build_client_app()
    steady = node_context(_node(site_dir, tmp_path / "steady"))
    expected = [app(_train(r), steady).content[k.METRICS][k.EPSILON] for r in (1, 2, 3)]
    first = node_context(_node(site_dir, tmp_path / "restarted"))
    for r in (1, 2):
        assert not app(_train(r), first).has_error()
    # Execute: round 3 arrives at a restarted node (a fresh context: Flower's state is gone)
    restarted = node_context(_node(site_dir, tmp_path / "restarted"))
    reply = app(_train(3), restarted)
    # Assert: the run's epsilon composes all three rounds, exactly as without the restart
    assert reply.content[k.METRICS][k.EPSILON] == pytest.approx(expected[2], rel=1e-9)
    assert expected[0] < expected[1] < expected[2]


def test_a_round_asked_again_with_the_same_model_is_replayed_not_charged(
    site_dir: Path, tmp_path: Path
) -> None:
    app = build_client_app()
    ctx = node_context(_node(site_dir, tmp_path))
    first = app(_train(1), ctx)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    assert [r.entry.round for r in ledger.read().records] == [1]
    # Execute: the coordinator died and the resumed run asks round 1 again, same model
    again = app(_train(1), node_context(_node(site_dir, tmp_path)))
    # Assert: the very reply already released, and no new ledger entry
    assert not again.has_error()
    a, b = (m.content[k.ARRAYS].to_torch_state_dict() for m in (first, again))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    released = [{name: repr(v) for name, v in m.content[k.METRICS].items()} for m in (first, again)]
    assert released[0] == released[1]  # repr: NaN (PRV before the last round) equals itself
    assert [r.entry.round for r in ledger.read().records] == [1]
    # A different model for that round is a new release: trained and charged
    other = app(_train(1, seed=1), ctx)
    assert not other.has_error()
    assert [r.entry.round for r in ledger.read().records] == [1, 1]
    assert verify_ledger(tmp_path / "ledger.jsonl").ok
    stored = list((tmp_path / "replies").glob("*.npz"))
    assert stored and all(p.stat().st_mode & 0o077 == 0 for p in stored)


def test_the_replay_digest_ignores_secure_aggregation_session_keys() -> None:
    from client.replay import request_digest

    arrays = ArrayRecord({"w": torch.ones(3)})
    base = {"model": "cnn", "server-round": 2}
    same = request_digest(arrays, {**base, "secagg-session": "train-2", "secagg-nodes": [1, 2]})
    assert same == request_digest(arrays, {**base, "secagg-session": "train-2b"})
    assert same != request_digest(arrays, {**base, "server-round": 3})
    assert same != request_digest(ArrayRecord({"w": torch.zeros(3)}), base)
