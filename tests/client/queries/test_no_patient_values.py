"""No node message of the inference flows carries a per-patient value.

Every coordinator flow (pooled metrics, paired comparison, conformal, calibration slope,
MC-dropout and ensemble entropy, federated logistic regression) runs against nodes served by the real ClientApp; then
every reply is inspected: each list has a length fixed by the coordinator (bins, features,
models, set sizes), never a node's patient count, and no clinical row appears in any reply.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from client.app import _load, heldout_split, training_split
from client.data.tabular import design_matrix, load_tabular
from client.queries import list_queries
from common import messages as k
from common.models import build_model
from common.stats.bins import fine_score_edges
from server import inference
from tests.client.queries.fake_grid import InProcessGrid
from tests.client.queries.federation import PLAN, image_nodes, model_arrays

CAL_BINS, VALUE_BINS, CONFORMAL_BINS = 7, 37, 5003
COLUMNS = ["age", "sex", "cp=4", "thalach", "oldpeak", "exang"]
SITES = ("cleveland", "hungarian", "switzerland", "va")


def _lists(reply: Message) -> list[tuple[str, list[Any]]]:
    out = []
    for name, record in reply.content.items():
        assert isinstance(record, MetricRecord | ConfigRecord), f"unexpected record {name}"
        if isinstance(record, ConfigRecord):
            # Site name and the node's ledger head (a hash and an entry index): no patient data.
            assert name == k.NODE_INFO and set(record) <= {k.SITE, k.LEDGER_HEAD}
        for key, value in record.items():
            assert not isinstance(value, bytes), f"{key}: bytes in a reply"
            if isinstance(value, list):
                out.append((key, value))
    return out




def test_image_flows_release_no_per_patient_vector(tmp_path: Path) -> None:
    # allow_non_private: the exact DC-ELM readout is answered only for a non-private plan.
    nodes = image_nodes(tmp_path, allow_non_private=True)
    grid = InProcessGrid(nodes)
    ids = grid.get_node_ids()
    a, b = model_arrays(0), model_arrays(1)
    counts = {heldout_split(n, PLAN, _load(n, PLAN), s).num_patients
              for n in nodes.values() for s in (k.SPLIT_VAL, k.SPLIT_TEST)}
    inference.pooled_metrics(grid, ids, a, PLAN, split=k.SPLIT_TEST, timeout=5,
                             calibration_bins=CAL_BINS)
    inference.paired_comparison(grid, ids, a, b, PLAN, split=k.SPLIT_TEST, timeout=5,
                                calibration_bins=CAL_BINS)
    inference.conformal_prediction(grid, ids, a, PLAN, timeout=5, bins=CONFORMAL_BINS)
    inference.calibration_regression(grid, ids, a, PLAN, split=k.SPLIT_TEST, timeout=5)
    inference.predictive_entropy_summary(grid, ids, PLAN, split=k.SPLIT_TEST, timeout=5,
                                         arrays=a, mc_samples=3, bins=VALUE_BINS)
    inference.predictive_entropy_summary(grid, ids, PLAN, split=k.SPLIT_TEST, timeout=5,
                                         ensemble=[a, b], bins=VALUE_BINS)
    elm_plan = dataclasses.replace(PLAN, model="dc-elm", private=False)
    elm = build_model("dc-elm", in_channels=1, num_classes=2, image_size=PLAN.image_size)
    inference.federated_elm_readout(grid, ids, ArrayRecord(elm.state_dict()), elm_plan,
                                    ridge=1.0, timeout=5)
    d = int(elm.readout.weight.shape[1])  # type: ignore[union-attr]
    # The multi-class queries, on these (two-class) labels as a K = 2 multiclass plan.
    from server.inference_multiclass import multiclass_inference

    mc_plan = dataclasses.replace(PLAN, task="multiclass", num_classes=2)
    assert multiclass_inference(grid, ids, a, mc_plan, timeout=5)["status"] == "completed"
    counts |= {training_split(n, elm_plan, _load(n, elm_plan)).num_patients
               for n in nodes.values()}
    # The ensemble paradigm's query: two members' binned scores and uncertainties.
    from common.config import RunConfig
    from server.paradigms import ensemble as ens

    ens._query(grid, ids, RunConfig(plan=PLAN, round_timeout=5), [a, b], k.SPLIT_TEST,
               np.array([0.5, 0.5]), mc_samples=3)
    nb = fine_score_edges().size - 1
    # bins; models M and M*M (also the calibration GLM's p and p*p); conformal set sizes;
    # the DC-ELM readout's d x d and d x 2 sums; K x bins one-vs-rest histograms (K = 2)
    allowed = {nb, CAL_BINS, VALUE_BINS, CONFORMAL_BINS, 1, 2, 4, 3, d * d, d * 2, 2 * nb}
    allowed |= {2 * 2 * ens.SCORE_BINS, 3 * 2 * ens.SCORE_BINS,  # ensemble-scores
                3 * 2 * ens.UNCERTAINTY_BINS, 2}
    assert not allowed & counts, "fixture: pick bin counts that differ from patient counts"
    asked = {str(m.content[k.CONFIG][k.QUERY]) for m in grid.sent}
    # the per-task queries: tests/client/queries/test_no_patient_values_tasks.py
    per_task = {"ordinal-metrics", "multilabel-metrics", "multilabel-placements",
                "regression-metrics", "segmentation-metrics", "multi-task-presence"}
    assert asked == set(list_queries()) - {"logistic"} - per_task
    assert grid.replies and not any(r.has_error() for r in grid.replies)
    for reply in grid.replies:
        for key, value in _lists(reply):
            assert len(value) in allowed and len(value) not in counts, (key, len(value))


def test_logistic_flow_releases_no_clinical_row(shared_file: Callable[[str], Path]) -> None:
    from common.config import NodeConfig

    paths = [shared_file(f"heart_disease_uci/processed.{s}.data") for s in SITES]
    nodes = {20 + i: NodeConfig(data_dir=p.parent, site_name=s, tabular_path=p)
             for i, (s, p) in enumerate(zip(SITES, paths, strict=True))}
    grid = InProcessGrid(nodes)
    result = inference.federated_logistic(grid, grid.get_node_ids(), COLUMNS, timeout=5)
    assert result["status"] == "completed"
    p = len(COLUMNS) + 1
    rows = [design_matrix(load_tabular(path), COLUMNS) for path in paths]
    counts = {x.shape[0] for x, _ in rows}
    assert not {p, p * p} & counts
    for reply in grid.replies:
        for key, value in _lists(reply):
            assert len(value) in {p, p * p} and len(value) not in counts, (key, len(value))
            arr = np.asarray(value, dtype=np.float64)
            for x, _ in rows:
                # No patient's covariates (intercept dropped) appear as a run of the vector.
                width = x.shape[1] - 1
                windows = np.lib.stride_tricks.sliding_window_view(arr, width)
                hits = (windows[:, None, :] == x[None, :, 1:]).all(axis=2)
                assert not hits.any(), key
