"""Hand-made held-out splits for ordinal and multi-label inference tests, and their references.

Nodes are served in-process by the real ClientApp (:class:`tests.client.queries.fake_grid.
InProcessGrid`); :func:`serve_splits` replaces the node's data loading
(``client.queries.handler._images``) by a hand-made :class:`client.data.node_data.SplitArrays`
per site name, so that every query runs its real statistics, release rules and ledger on data
whose per-patient predictions the tests recompute directly (:func:`reference_outputs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

import client.queries
import client.queries.handler as handler
from client.app import build_plan_model
from client.data.node_data import SplitArrays
from client.queries.scoring import HeldOutImages
from common.config import NodeConfig, TrainPlan

NODE_IDS = (31, 32, 33)

# The ordinal and multi-label queries are registered here only for the tests that use them
# (``task_queries``), so that other tests' view of the registry (``list_queries()``) does not
# depend on whether this module was collected. Once ``client.queries`` imports both modules
# itself, they are registered before this point and nothing is removed.
_BEFORE = set(client.queries.registry._REGISTRY)
import client.queries.multilabel  # noqa: E402
import client.queries.ordinal  # noqa: E402

TASK_QUERIES = {name: client.queries.registry._REGISTRY.pop(name)
                for name in set(client.queries.registry._REGISTRY) - _BEFORE}


@pytest.fixture
def task_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the ordinal and multi-label queries for one test."""
    for name, query in TASK_QUERIES.items():
        monkeypatch.setitem(client.queries.registry._REGISTRY, name, query)


def make_split(rng: np.random.Generator, patient_labels: np.ndarray, *,
               image_size: int = 8) -> SplitArrays:
    """Random ``[N, 1, S, S]`` images, one or two per patient, with the patient's label.

    A patient with two images gets its label on one image and a label of lower grade (or, for
    multi-hot labels, a subset of its findings) on the other, so that the per-patient target is
    the maximum over images. The images carry a weak signal of the label (their mean).
    """
    labels, index, images = [], [], []
    for p, y in enumerate(patient_labels):
        n_img = int(rng.integers(1, 3))
        for i in range(n_img):
            lab = np.asarray(y)
            if i == 1:
                lab = lab * rng.integers(0, 2, size=lab.shape) if lab.ndim else \
                    np.asarray(rng.integers(0, int(lab) + 1))
            labels.append(lab)
            index.append(p)
            signal = float(np.sum(lab)) * 0.3
            images.append(rng.normal(signal, 1.0, size=(1, image_size, image_size)))
    return SplitArrays(images=torch.tensor(np.stack(images), dtype=torch.float32),
                       labels=torch.tensor(np.stack(labels), dtype=torch.int64),
                       patient_index=torch.tensor(index, dtype=torch.int64),
                       num_patients=len(patient_labels))


def make_nodes(root: Path, **overrides: object) -> dict[int, NodeConfig]:
    """Three nodes (site names ``s1``..``s3``) releasing exact histograms by default."""
    settings: dict[str, object] = {"release_histograms": True, "min_release_count": 1,
                                   "device": "cpu", "ledger_dir": root / "ledger"}
    settings.update(overrides)
    return {nid: NodeConfig(data_dir=root / f"site-{i + 1}", site_name=f"s{i + 1}",
                            **settings)  # type: ignore[arg-type]
            for i, nid in enumerate(NODE_IDS)}


def serve_splits(monkeypatch: pytest.MonkeyPatch, splits: Mapping[str, SplitArrays]) -> None:
    """Let every node's queries read ``splits[site name]`` as their held-out split."""

    def images(req: object) -> tuple[HeldOutImages, str]:
        site = req.node.site_name  # type: ignore[attr-defined]
        return HeldOutImages(split=splits[site], device=torch.device("cpu")), f"fp-{site}"

    monkeypatch.setattr(handler, "_images", images)


def model_arrays(plan: TrainPlan, seed: int, *, scale: float = 8.0) -> ArrayRecord:
    """A fresh model of the plan with its last weights scaled (spread-out probabilities)."""
    torch.manual_seed(seed)
    state = build_plan_model(plan).state_dict()
    last = [key for key in state if key.endswith("weight")][-1]
    state[last] = state[last] * scale
    return ArrayRecord(state)


def reference_outputs(plan: TrainPlan, arrays: ArrayRecord,
                      split: SplitArrays) -> tuple[np.ndarray, np.ndarray]:
    """Per patient (sorted): mean sigmoid outputs and maximum labels, computed directly."""
    model = build_plan_model(plan)
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(split.images)).double().numpy()
    index = split.patient_index.numpy()
    labels = split.labels.numpy()
    patients = np.unique(index)
    mean = np.stack([probs[index == p].mean(axis=0) for p in patients])
    top = np.stack([labels[index == p].max(axis=0) for p in patients])
    return mean, top
