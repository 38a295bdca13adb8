"""A small synthetic image federation for query tests, and direct (pooled) reference values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from client.app import _load, heldout_split
from client.training import evaluate
from common.config import NodeConfig, TrainPlan
from common.models import build_model

PLAN = TrainPlan(image_size=16, run_id="test-run")
NODE_IDS = (11, 12)


def image_nodes(root: Path, **overrides: object) -> dict[int, NodeConfig]:
    """Two synthetic hospitals (written once under ``root``), node id -> NodeConfig."""
    from client.dicom.synth import synthesize_federation

    if not (root / "site-1").exists():
        synthesize_federation(root, n_sites=2, patients_per_site=60, images_per_patient=(1, 2),
                              image_size=16, seed=5)
    settings: dict[str, object] = {"release_histograms": True, "min_release_count": 1,
                                   "device": "cpu"}
    settings.update(overrides)
    return {nid: NodeConfig(data_dir=root / f"site-{i + 1}", site_name=f"h{i + 1}",
                            **settings)  # type: ignore[arg-type]
            for i, nid in enumerate(NODE_IDS)}


def model_arrays(seed: int) -> ArrayRecord:
    """A freshly initialised model of the plan, with logits spread out (scale 8) so that
    scores do not all crowd around 0.5."""
    torch.manual_seed(seed)
    model = build_model(PLAN.model, in_channels=1, num_classes=2, image_size=PLAN.image_size)
    state = model.state_dict()
    last = [key for key in state if key.endswith("weight")][-1]
    state[last] = state[last] * 8.0
    return ArrayRecord(state)


def reference_scores(
    node: NodeConfig, arrays: ArrayRecord, split: str, plan: TrainPlan = PLAN
) -> tuple[np.ndarray, np.ndarray]:
    """Per-patient (scores, labels) of ``node``'s held-out split, computed directly."""
    data = _load(node, plan)
    part = heldout_split(node, plan, data, split)
    model = build_model(plan.model, in_channels=1, num_classes=2, image_size=plan.image_size)
    model.load_state_dict(arrays.to_torch_state_dict())
    res = evaluate(model, part.images, part.labels, patient_index=part.patient_index,
                   device="cpu")
    return res.scores, res.labels
