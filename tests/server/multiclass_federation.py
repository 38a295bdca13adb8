"""A small synthetic three-class image federation for multi-class tests, and pooled references.

The synthetic hospitals' lesion signal is binary (:mod:`client.dicom.synth`); the three classes
relabel it deterministically: patients without a lesion are class 0, those with one class 1 or
2 alternately in the order of ``labels.csv``. The model can therefore separate class 0 from
the others, not 1 from 2 (AUCs are modest, and exactly computable).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from client.app import _load, build_plan_model, heldout_split, plan_task
from client.data.labels import LABELS_FILENAME
from client.training import evaluate
from common.config import NodeConfig, TrainPlan

PLAN = TrainPlan(image_size=16, run_id="test-mc", task="multiclass", num_classes=3)
NODE_IDS = (21, 22)


def relabel_three_classes(site: Path) -> None:
    """Rewrite ``site/labels.csv`` with classes 0 (no lesion), 1 and 2 (lesion, alternating)."""
    path = site / LABELS_FILENAME
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    positives = 0
    for row in rows:
        if int(row["label"]) == 1:
            row["label"] = str(1 + positives % 2)
            positives += 1
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_three_class_federation(root: Path, *, n_sites: int, patients_per_site: int,
                                 image_size: int = 16, seed: int = 7) -> None:
    """Synthetic DICOM hospitals under ``root/site-*`` with three-class labels."""
    from client.dicom.synth import synthesize_federation

    synthesize_federation(root, n_sites=n_sites, patients_per_site=patients_per_site,
                          images_per_patient=(1, 2), image_size=image_size, seed=seed)
    for i in range(n_sites):
        relabel_three_classes(root / f"site-{i + 1}")


def multiclass_nodes(root: Path, **overrides: object) -> dict[int, NodeConfig]:
    """Two three-class hospitals (written once under ``root``), node id -> NodeConfig."""
    if not (root / "site-1").exists():
        write_three_class_federation(root, n_sites=2, patients_per_site=90)
    settings: dict[str, object] = {"release_histograms": True, "min_release_count": 1,
                                   "device": "cpu"}
    settings.update(overrides)
    return {nid: NodeConfig(data_dir=root / f"site-{i + 1}", site_name=f"m{i + 1}",
                            **settings)  # type: ignore[arg-type]
            for i, nid in enumerate(NODE_IDS)}


def multiclass_arrays(seed: int, plan: TrainPlan = PLAN) -> ArrayRecord:
    """A fresh model of the plan with its last weights scaled (spread-out probabilities)."""
    torch.manual_seed(seed)
    state = build_plan_model(plan).state_dict()
    last = [key for key in state if key.endswith("weight")][-1]
    state[last] = state[last] * 8.0
    return ArrayRecord(state)


def reference_probabilities(
    node: NodeConfig, arrays: ArrayRecord, split: str, plan: TrainPlan = PLAN
) -> tuple[np.ndarray, np.ndarray]:
    """Per-patient (class probabilities, classes) of ``node``'s held-out split, directly."""
    data = _load(node, plan)
    part = heldout_split(node, plan, data, split)
    model = build_plan_model(plan)
    model.load_state_dict(arrays.to_torch_state_dict())
    res = evaluate(model, part.images, part.labels, patient_index=part.patient_index,
                   device="cpu", task=plan_task(plan), num_classes=plan.num_classes)
    return res.scores, res.labels
