"""DC-ELM readout fitted federatedly from node sums equals the pooled closed-form solution."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from sklearn.linear_model import Ridge

from client.app import _load, training_split
from client.privacy_guard import NodeBudget
from common.models import build_model
from server import inference
from tests.client.queries.fake_grid import InProcessGrid
from tests.client.queries.federation import PLAN, image_nodes

ELM_PLAN = dataclasses.replace(PLAN, model="dc-elm")
BASELINE_PLAN = dataclasses.replace(ELM_PLAN, private=False)
CLIP = 1e6  # no effective clipping: the federated fit must equal plain pooled ridge


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fed")


def _model_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(build_model("dc-elm", in_channels=1, num_classes=2,
                                   image_size=ELM_PLAN.image_size).state_dict())


def test_federated_readout_equals_pooled_ridge(root: Path) -> None:
    # An exact release of training sums: only for a non-private plan the nodes consent to.
    nodes = image_nodes(root, allow_non_private=True)
    arrays = _model_arrays()
    fitted, summary = inference.federated_elm_readout(
        InProcessGrid(nodes), list(nodes), arrays, BASELINE_PLAN, ridge=0.5, clip=CLIP,
        timeout=5)
    assert summary["status"] == "completed" and summary["failures"] == []
    assert fitted is not None and not summary["noised"]
    # Reference: features of every node's training images, pooled, ridge without intercept.
    model = build_model("dc-elm", in_channels=1, num_classes=2, image_size=ELM_PLAN.image_size)
    model.load_state_dict(arrays.to_torch_state_dict())
    feats, labels = [], []
    for node in nodes.values():
        split = training_split(node, BASELINE_PLAN, _load(node, BASELINE_PLAN))
        with torch.no_grad():
            feats.append(model.features(split.images).double().numpy())  # type: ignore[operator]
        labels.append(split.labels.numpy())
    h, y = np.concatenate(feats), np.concatenate(labels)
    onehot = np.eye(2)[y]
    ref = Ridge(alpha=0.5, fit_intercept=False, solver="cholesky").fit(h, onehot).coef_
    got = fitted.to_torch_state_dict()["readout.weight"].double().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-8)


def test_noised_readout_is_charged_to_each_ledger(root: Path, tmp_path: Path) -> None:
    nodes = image_nodes(root, stats_noise_multiplier=1.0, epsilon_cap=1e6, ledger_dir=tmp_path)
    fitted, summary = inference.federated_elm_readout(
        InProcessGrid(nodes), list(nodes), _model_arrays(), ELM_PLAN, ridge=100.0, clip=1.0,
        timeout=5)
    assert summary["status"] == "completed" and summary["noised"] and fitted is not None
    assert all(torch.isfinite(v).all() for v in fitted.to_torch_state_dict().values())
    for node in nodes.values():  # one patient-level Gaussian release per hospital's dataset
        entries = NodeBudget.for_node(node).ledger.entries(_load(node, ELM_PLAN).fingerprint)
        assert [e.release for e in entries] == ["query:elm-readout"]
        assert entries[0].mechanism.kind == "gaussian"
        assert entries[0].mechanism.noise_multiplier > 0


def test_elm_readout_refuses_held_out_splits_and_other_models(root: Path) -> None:
    from common import messages as k

    nodes = image_nodes(root)
    res = inference.query_nodes(InProcessGrid(nodes), list(nodes), "elm-readout",
                                {**ELM_PLAN.to_record(), k.SPLIT: k.SPLIT_TEST},
                                timeout=5, records={k.ARRAYS: _model_arrays()})
    assert not res.values and all("uses split train" in f["reason"] for f in res.failures)
    cnn = ArrayRecord(build_model("cnn", in_channels=1, num_classes=2, image_size=16).state_dict())
    res = inference.query_nodes(InProcessGrid(nodes), list(nodes), "elm-readout",
                                {**PLAN.to_record(), k.SPLIT: k.SPLIT_TRAIN},
                                timeout=5, records={k.ARRAYS: cnn})
    assert not res.values and all("dc-elm" in f["reason"] for f in res.failures)


def test_crafted_feature_filters_are_refused(root: Path) -> None:
    from common import messages as k

    nodes = image_nodes(root)
    state = _model_arrays().to_torch_state_dict()
    name = next(n for n in state if not n.startswith("readout"))
    state[name] = state[name] * 2.0  # not the seeded filters every hospital builds
    res = inference.query_nodes(InProcessGrid(nodes), list(nodes), "elm-readout",
                                {**ELM_PLAN.to_record(), k.SPLIT: k.SPLIT_TRAIN},
                                timeout=5, records={k.ARRAYS: ArrayRecord(state)})
    assert not res.values and all("seeded" in f["reason"] for f in res.failures)


@pytest.mark.parametrize(("private", "allow_non_private"), [(False, False)])
def test_exact_training_sums_are_refused_without_consent(
    root: Path, tmp_path: Path, private: bool, allow_non_private: bool
) -> None:
    from common import messages as k

    # Prepare: nodes that do not noise their statistics (stats-noise-multiplier = 0)
    nodes = image_nodes(root, allow_non_private=allow_non_private, ledger_dir=tmp_path)
    plan = dataclasses.replace(ELM_PLAN, private=private)
    # Execute
    res = inference.query_nodes(InProcessGrid(nodes), list(nodes), "elm-readout",
                                {**plan.to_record(), k.SPLIT: k.SPLIT_TRAIN},
                                timeout=5, records={k.ARRAYS: _model_arrays()})
    # Assert: refused before anything was released, and nothing reached the ledgers
    assert not res.values and all("refused:" in f["reason"] for f in res.failures)
    for node in nodes.values():
        assert NodeBudget.for_node(node).ledger.entries(_load(node, plan).fingerprint) == []
