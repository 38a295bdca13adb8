"""The node dispatches on the plan's task: label checks, model outputs, evaluation metrics.

The ClientApp is called in-process with constructed Messages on a three-class relabelling of a
synthetic hospital (:mod:`tests.server.multiclass_federation`); metrics are checked against
scikit-learn on the patients scored directly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from sklearn.metrics import accuracy_score, roc_auc_score

from client.app import build_client_app
from common import messages as k
from common.config import NodeConfig
from tests.flower_helpers import incoming, node_context
from tests.server.multiclass_federation import (
    PLAN,
    multiclass_arrays,
    reference_probabilities,
    write_three_class_federation,
)

TRAIN_PLAN = dataclasses.replace(PLAN, num_rounds=1, batch_size=8)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mc-site")
    write_three_class_federation(root, n_sites=1, patients_per_site=90)
    return root / "site-1"


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESALIUS_HOME", str(tmp_path / "home"))


def _context(site: Path) -> object:
    return node_context({"data-dir": str(site), "epsilon-cap": 8.0, "site-name": "h1",
                         "min-release-count": 1, "device": "cpu"})


def _msg(plan: object, kind: str, **extra: object) -> Message:
    config = ConfigRecord({**plan.to_record(), **extra})  # type: ignore[attr-defined]
    arrays = multiclass_arrays(0, plan)  # type: ignore[arg-type]
    return incoming(RecordDict({k.ARRAYS: arrays, k.CONFIG: config}), kind)


def test_multiclass_evaluation_reports_accuracy_and_macro_auc_of_sklearn(site: Path) -> None:
    # Prepare
    node = NodeConfig(data_dir=site, site_name="h1", device="cpu")
    probs, y = reference_probabilities(node, multiclass_arrays(0), k.SPLIT_VAL)
    # Execute
    reply = build_client_app()(_msg(PLAN, MessageType.EVALUATE, **{k.SPLIT: k.SPLIT_VAL}),
                               _context(site))
    # Assert
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    m = reply.content[k.METRICS]
    assert m[k.NUM_EXAMPLES] == y.size
    assert m[k.ACCURACY] == pytest.approx(accuracy_score(y, probs.argmax(axis=1)))
    assert m[k.AUC] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert k.HIST_POSITIVE not in m  # binary histograms only


def test_multiclass_training_returns_a_k_output_model(site: Path) -> None:
    # Execute
    reply = build_client_app()(_msg(TRAIN_PLAN, MessageType.TRAIN, **{k.SERVER_ROUND: 1}),
                               _context(site))
    # Assert
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    state = reply.content[k.ARRAYS].to_torch_state_dict()
    assert state["classifier.weight"].shape[0] == 3
    assert np.isfinite(reply.content[k.METRICS][k.TRAIN_LOSS])


@pytest.mark.parametrize(("plan", "reason"), [
    (dataclasses.replace(PLAN, task="binary", num_classes=2),
     "labels do not fit the binary task"),
    (dataclasses.replace(PLAN, num_classes=2), "labels do not fit the multiclass task"),
])
def test_labels_that_do_not_fit_the_task_are_refused_with_a_safe_reason(
    site: Path, plan: object, reason: str
) -> None:
    # Execute
    reply = build_client_app()(_msg(plan, MessageType.EVALUATE, **{k.SPLIT: k.SPLIT_VAL}),
                               _context(site))
    # Assert: a refusal naming the task and the site, no label value
    assert reply.has_error() and reason in reply.error.reason
    assert reply.error.reason.startswith("[h1]")


def test_a_task_the_model_does_not_serve_is_refused_before_reading_data(tmp_path: Path) -> None:
    # Prepare: a node whose data folder does not even exist; the cnn has no segmentation head
    plan = dataclasses.replace(PLAN, task="segmentation")
    ctx = node_context({"data-dir": str(tmp_path / "none"), "site-name": "h1"})
    config = ConfigRecord({**plan.to_record(), k.SPLIT: k.SPLIT_VAL})
    msg = incoming(RecordDict({k.ARRAYS: multiclass_arrays(0), k.CONFIG: config}),
                   MessageType.EVALUATE)
    # Execute
    reply = build_client_app()(msg, ctx)
    # Assert
    assert reply.has_error() and "does not serve the task" in reply.error.reason


def test_weights_of_another_class_count_are_refused(site: Path) -> None:
    # Prepare: 3-output weights for a 4-class plan
    plan = dataclasses.replace(PLAN, num_classes=4)
    config = ConfigRecord({**plan.to_record(), k.SPLIT: k.SPLIT_VAL})
    msg = incoming(RecordDict({k.ARRAYS: multiclass_arrays(0), k.CONFIG: config}),
                   MessageType.EVALUATE)
    # Execute
    reply = build_client_app()(msg, _context(site))
    # Assert
    assert reply.has_error() and "weights sent do not fit" in reply.error.reason
