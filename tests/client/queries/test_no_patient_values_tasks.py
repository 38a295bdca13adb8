"""No node message of the per-task pooled inference carries a per-patient value.

The ordinal, multi-label, regression and segmentation inference flows
(:mod:`server.inference_tasks`) run against two synthetic hospitals of their task served by
the real ClientApp; every reply is inspected: each list has a length fixed by the
coordinator (K, K x K, K x bins, error-histogram bins), never a node's patient count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from client.app import _load, build_plan_model, heldout_split
from common import messages as k
from common.config import NodeConfig, RunConfig, TrainPlan
from common.stats.bins import fine_score_edges
from server.inference_tasks import task_inference
from tests.client.queries.fake_grid import InProcessGrid

K = 3
NB = int(fine_score_edges().size - 1)
ERROR_BINS = 20  # client/queries/regression.py's default abs-error-bins
CASES = {
    "ordinal": ("cnn", {"ordinal-metrics"}),
    "multilabel": ("cnn", {"multilabel-metrics", "multilabel-placements"}),
    "regression": ("cnn", {"regression-metrics"}),
    "segmentation": ("unet", {"segmentation-metrics"}),
}
ALLOWED = {1, K, K * K, 4 * K, K * NB, NB, ERROR_BINS}


def _lists(reply: Message) -> list[tuple[str, list[Any]]]:
    out = []
    for name, record in reply.content.items():
        assert isinstance(record, MetricRecord | ConfigRecord), f"unexpected record {name}"
        if isinstance(record, ConfigRecord):
            assert name == k.NODE_INFO and set(record) <= {k.SITE, k.LEDGER_HEAD}
        for key, value in record.items():
            if isinstance(value, list):
                out.append((key, value))
    return out


def _site(root: Path, task: str) -> None:
    if task == "segmentation":
        from client.dicom.synth_seg import synthesize_segmentation_federation

        synthesize_segmentation_federation(root, n_sites=2, patients_per_site=100,
                                           images_per_patient=(1, 2), image_size=16, seed=3)
    else:
        from client.dicom.synth_tasks import synthesize_task_federation

        synthesize_task_federation(root, task=task, num_classes=K, n_sites=2,
                                   patients_per_site=100, images_per_patient=(1, 2),
                                   image_size=16, seed=3)


def _nodes(root: Path) -> dict[int, NodeConfig]:
    """The two hospitals under ``root``, releasing histograms, with their own ledgers."""
    return {11 + i: NodeConfig(data_dir=root / f"site-{i + 1}", site_name=f"s{i + 1}",
                               release_histograms=True, min_release_count=1, device="cpu",
                               ledger_dir=root / "ledgers" / f"s{i + 1}")
            for i in range(2)}


@pytest.mark.parametrize("task", sorted(CASES))
def test_task_inference_releases_no_per_patient_vector(task: str, tmp_path: Path) -> None:
    # Prepare: two hospitals of the task, a fresh model of the plan
    _site(tmp_path, task)
    model, queries = CASES[task]
    plan = TrainPlan(image_size=16, run_id="t", task=task, model=model,
                     num_classes=2 if task in ("regression", "segmentation") else K)
    nodes = _nodes(tmp_path)
    grid = InProcessGrid(nodes)
    torch.manual_seed(0)
    arrays = ArrayRecord(build_plan_model(plan).state_dict())
    counts = {heldout_split(n, plan, _load(n, plan), k.SPLIT_TEST).num_patients
              for n in nodes.values()}
    assert not ALLOWED & counts, "fixture: patient counts must differ from the fixed sizes"
    # Execute
    section = task_inference(task)(grid, grid.get_node_ids(), arrays, RunConfig(plan=plan))
    # Assert: the task's queries were asked and answered, lists have coordinator-fixed sizes
    assert section["status"] == "completed", section
    assert {str(m.content[k.CONFIG][k.QUERY]) for m in grid.sent} == queries
    assert grid.replies and not any(r.has_error() for r in grid.replies)
    for reply in grid.replies:
        for key, value in _lists(reply):
            assert len(value) in ALLOWED and len(value) not in counts, (key, len(value))


def test_multi_task_presence_releases_no_per_patient_vector(tmp_path: Path) -> None:
    # Prepare: two segmentation hospitals, a fresh multi-task U-Net (mask + presence heads)
    from server.paradigms.multi_task import SCORE_BINS, _presence

    _site(tmp_path, "segmentation")
    plan = TrainPlan(image_size=16, run_id="t", task="segmentation", model="multi-task-unet",
                     num_classes=2, paradigm="multi-task")
    nodes = _nodes(tmp_path)
    grid = InProcessGrid(nodes)
    torch.manual_seed(0)
    arrays = ArrayRecord(build_plan_model(plan).state_dict())
    per_node = [heldout_split(n, plan, _load(n, plan), k.SPLIT_TEST).num_patients
                for n in nodes.values()]
    counts = set(per_node)
    allowed = {1, 2 * SCORE_BINS}
    assert not allowed & counts, "fixture: patient counts must differ from the fixed sizes"
    # Execute
    out = _presence(grid, RunConfig(plan=plan, round_timeout=5), arrays)
    # Assert: the presence query was asked and answered with coordinator-fixed sizes only
    assert out["pooled"]["n"] == sum(per_node)
    assert {str(m.content[k.CONFIG][k.QUERY]) for m in grid.sent} == {"multi-task-presence"}
    assert grid.replies and not any(r.has_error() for r in grid.replies)
    for reply in grid.replies:
        for key, value in _lists(reply):
            assert len(value) in allowed and len(value) not in counts, (key, len(value))
