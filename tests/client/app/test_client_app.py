"""The ClientApp called in-process with constructed Messages, as a SuperNode would call it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from client.app import build_client_app
from client.data import load_node_data
from common import messages as k
from common.config import TrainPlan
from common.models import build_model
from tests.flower_helpers import incoming, node_context

PLAN = TrainPlan(num_rounds=2, batch_size=8, learning_rate=0.05, target_epsilon=8.0, image_size=32)


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("fed")
    synthesize_federation(root, n_sites=1, patients_per_site=40, seed=3)
    return root / "site-1"


def _arrays(plan: TrainPlan = PLAN) -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(build_model(plan.model, in_channels=1, num_classes=2).state_dict())


def _train_msg(plan: TrainPlan = PLAN, server_round: int = 1) -> Message:
    config = ConfigRecord({**plan.to_record(), k.SERVER_ROUND: server_round})
    return incoming(RecordDict({k.ARRAYS: _arrays(plan), k.CONFIG: config}), MessageType.TRAIN)


def _eval_msg(split: str = k.SPLIT_VAL, histograms: bool = False) -> Message:
    config = ConfigRecord({**PLAN.to_record(), k.SPLIT: split, k.WITH_HISTOGRAMS: histograms})
    return incoming(RecordDict({k.ARRAYS: _arrays(), k.CONFIG: config}), MessageType.EVALUATE)


def test_train_replies_weights_patients_and_growing_epsilon(site_dir: Path) -> None:
    # Prepare
    app = build_client_app()
    ctx = node_context({"data-dir": str(site_dir), "epsilon-cap": 8.0, "site-name": "h1"})
    patients = load_node_data(site_dir, image_size=32).train.num_patients
    # Execute: two rounds in the same run context
    first = app(_train_msg(server_round=1), ctx)
    second = app(_train_msg(server_round=2), ctx)
    # Assert
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    m1, m2 = first.content[k.METRICS], second.content[k.METRICS]
    assert m1[k.NUM_EXAMPLES] == patients
    assert 0 < m1[k.EPSILON] < m2[k.EPSILON] <= 8.0 + 1e-6
    assert m1[k.DELTA] < 1.0 / patients
    assert set(first.content[k.ARRAYS].keys()) == set(_arrays().keys())
    assert first.content[k.NODE_INFO][k.SITE] == "h1"
    assert k.STATE_PRIVACY in ctx.state


def test_plan_over_cap_is_refused_before_training(site_dir: Path) -> None:
    app = build_client_app()
    ctx = node_context({"data-dir": str(site_dir), "epsilon-cap": 2.0})
    reply = app(_train_msg(), ctx)
    assert reply.has_error()
    assert "cap" in reply.error.reason and str(site_dir) not in reply.error.reason
    assert k.STATE_PRIVACY not in ctx.state  # nothing was spent


def test_explicit_small_noise_over_cap_is_refused(site_dir: Path) -> None:
    app = build_client_app()
    ctx = node_context({"data-dir": str(site_dir), "epsilon-cap": 8.0})
    plan = TrainPlan(num_rounds=50, batch_size=8, noise_multiplier=0.3)
    reply = app(_train_msg(plan), ctx)
    assert reply.has_error() and "epsilon=" in reply.error.reason


def test_non_private_needs_node_consent(site_dir: Path) -> None:
    app = build_client_app()
    plan = TrainPlan(num_rounds=1, batch_size=8, private=False)
    refused = app(_train_msg(plan), node_context({"data-dir": str(site_dir)}))
    assert refused.has_error() and "differential privacy" in refused.error.reason
    allowed = app(_train_msg(plan), node_context({"data-dir": str(site_dir), "allow-non-private": True}))
    assert not allowed.has_error() and allowed.content[k.METRICS][k.EPSILON] == float("inf")


def test_evaluate_returns_metrics_and_optional_histograms(site_dir: Path) -> None:
    app = build_client_app()
    # 40 patients: the held-out splits are small, so this node releases from 1 patient up.
    ctx = node_context({"data-dir": str(site_dir), "release-histograms": True,
                        "min-release-count": 1})
    val = app(_eval_msg(), ctx)
    assert not val.has_error()
    metrics = val.content[k.METRICS]
    assert {k.LOSS, k.ACCURACY, k.AUC, k.NUM_EXAMPLES} <= set(metrics.keys())
    assert k.HIST_POSITIVE not in metrics
    test = app(_eval_msg(k.SPLIT_TEST, histograms=True), ctx)
    tm = test.content[k.METRICS]
    assert sum(tm[k.HIST_POSITIVE]) + sum(tm[k.HIST_NEGATIVE]) == tm[k.NUM_EXAMPLES]
    assert np.isfinite(tm[k.LOSS])


def test_histograms_only_where_the_node_allows_them(site_dir: Path) -> None:
    reply = build_client_app()(_eval_msg(k.SPLIT_TEST, histograms=True),
                               node_context({"data-dir": str(site_dir), "min-release-count": 1}))
    assert not reply.has_error()
    assert k.HIST_POSITIVE not in reply.content[k.METRICS] and k.AUC in reply.content[k.METRICS]


def test_evaluation_of_fewer_patients_than_the_minimum_is_refused(site_dir: Path) -> None:
    patients = load_node_data(site_dir, image_size=32).val.num_patients
    reply = build_client_app()(_eval_msg(), node_context(
        {"data-dir": str(site_dir), "min-release-count": patients + 1}))
    assert reply.has_error() and "minimum release count" in reply.error.reason
    ok = build_client_app()(_eval_msg(), node_context(
        {"data-dir": str(site_dir), "min-release-count": patients}))
    assert not ok.has_error()


def test_oversized_images_and_unknown_splits_are_refused(site_dir: Path) -> None:
    app = build_client_app()
    ctx = node_context({"data-dir": str(site_dir), "max-image-size": 64})
    big = app(_train_msg(TrainPlan(num_rounds=1, image_size=4096)), ctx)
    assert big.has_error() and "image-size 4096" in big.error.reason
    config = ConfigRecord({**PLAN.to_record(), k.SPLIT: "train"})
    bad = app(incoming(RecordDict({k.ARRAYS: _arrays(), k.CONFIG: config}), MessageType.EVALUATE), ctx)
    assert bad.has_error() and "split" in bad.error.reason


def test_non_binary_labels_are_refused_with_a_clear_reason(site_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "site"
    shutil.copytree(site_dir, copy)
    lines = (copy / "labels.csv").read_text().splitlines()
    first = lines[1].rsplit(",", 1)[0] + ",2"
    (copy / "labels.csv").write_text("\n".join([lines[0], first, *lines[2:]]) + "\n")
    reply = build_client_app()(_train_msg(), node_context({"data-dir": str(copy)}))
    assert reply.has_error() and "binary" in reply.error.reason


def test_misconfigured_node_replies_with_safe_error(tmp_path: Path) -> None:
    app = build_client_app()
    missing = tmp_path / "PATIENT^SECRET" / "nowhere"
    no_dir = app(_train_msg(), node_context({"data-dir": str(missing)}))
    assert no_dir.has_error() and "SECRET" not in no_dir.error.reason
    no_cfg = app(_train_msg(), node_context({}))
    assert no_cfg.has_error() and "data-dir" in no_cfg.error.reason


def test_an_unexpected_error_is_named_by_site_without_its_text(
        site_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the evaluation crashes with an exception whose text holds a patient id
    def broken(*_: object, **__: object) -> None:
        raise TypeError("PID-SECRET-42 in /data/site-1/img.dcm")

    monkeypatch.setattr("client.app.evaluate_model", broken)
    app = build_client_app()
    # Execute
    reply = app(_eval_msg(), node_context({"data-dir": str(site_dir), "site-name": "h7",
                                          "min-release-count": 1}))
    # Assert: the coordinator can name the hospital (not node-<id>); no text of the exception
    assert reply.has_error()
    assert reply.error.reason.startswith("[h7] internal error at the node (TypeError)")
    assert "SECRET" not in reply.error.reason and "/data" not in reply.error.reason
