"""The train handler sets a model's training phase from the plan (deep belief networks)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

from client.app import build_client_app
from common import messages as k
from common.config import TrainPlan
from common.models import build_model
from tests.flower_helpers import incoming, node_context

PLAN = TrainPlan(num_rounds=1, batch_size=8, target_epsilon=8.0, image_size=16, model="dbn",
                 run_id="phases")


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("fed")
    synthesize_federation(root, n_sites=1, patients_per_site=30, seed=9)
    return root / "site-1"


def _train(plan: TrainPlan, state: dict[str, torch.Tensor]) -> object:
    config = ConfigRecord({**plan.to_record(), k.SERVER_ROUND: 1})
    return incoming(RecordDict({k.ARRAYS: ArrayRecord(state), k.CONFIG: config}),
                    MessageType.TRAIN)


def test_dbn_pretraining_of_one_layer_moves_only_that_layer(site_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = build_model("dbn", in_channels=1, num_classes=2, image_size=16).state_dict()
    plan = dataclasses.replace(PLAN, model_phase="pretrain:0")
    app = build_client_app()
    ctx = node_context({"data-dir": str(site_dir), "epsilon-cap": 8.0,
                        "ledger-dir": str(tmp_path)})
    reply = app(_train(plan, state), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    new = reply.content[k.ARRAYS].to_torch_state_dict()
    moved = {name for name in state if not torch.equal(state[name], new[name])}
    assert moved and all(name.startswith("rbms.0.") for name in moved), moved


def test_a_phase_for_a_model_without_phases_is_refused(site_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = build_model("cnn", in_channels=1, num_classes=2, image_size=16).state_dict()
    plan = dataclasses.replace(PLAN, model="cnn", model_phase="pretrain")
    reply = build_client_app()(_train(plan, state), node_context(
        {"data-dir": str(site_dir), "ledger-dir": str(tmp_path)}))
    assert reply.has_error() and "has no phases" in reply.error.reason
