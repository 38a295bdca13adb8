"""Coordinator-side pieces: metric pooling, per-site log, the report documents."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from sklearn.metrics import roc_auc_score

from common import messages as k
from common.config import RunConfig, TrainPlan
from common.stats.histogram import score_histograms
from server.report import RunReport
from server.strategies.fedavg import RoundLog, SiteReply, pool_metrics


def _reply(**values: object) -> RecordDict:
    return RecordDict({k.METRICS: MetricRecord(values)})  # type: ignore[arg-type]


def test_pool_metrics_weights_skips_nan_and_keeps_epsilon_out() -> None:
    replies = [
        _reply(**{k.NUM_EXAMPLES: 10, k.AUC: 0.8, k.LOSS: 1.0, k.EPSILON: 3.0}),
        _reply(**{k.NUM_EXAMPLES: 30, k.AUC: math.nan, k.LOSS: 2.0, k.EPSILON: 5.0}),
    ]
    pooled = pool_metrics(replies, k.NUM_EXAMPLES)
    assert pooled[k.LOSS] == pytest.approx(1.75)
    assert pooled[k.AUC] == pytest.approx(0.8)  # the NaN site (one class only) is left out
    assert k.EPSILON not in pooled and pooled[k.NUM_EXAMPLES] == 40


def test_pooled_auc_from_site_histograms_matches_sklearn_on_pooled_scores() -> None:
    rng = np.random.default_rng(0)
    replies, all_s, all_y = [], [], []
    for _ in range(3):
        y = rng.integers(0, 2, 120)
        s = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), 3)  # on the 1000-bin grid
        pos, neg = score_histograms(s, y)
        replies.append(_reply(**{k.NUM_EXAMPLES: 120, k.AUC: 0.5,
                                 k.HIST_POSITIVE: pos.tolist(), k.HIST_NEGATIVE: neg.tolist()}))
        all_s.append(s)
        all_y.append(y)
    pooled = pool_metrics(replies, k.NUM_EXAMPLES)
    expected = roc_auc_score(np.concatenate(all_y), np.concatenate(all_s))
    assert pooled["auc-pooled"] == pytest.approx(expected, abs=1e-9)


def test_report_json_layout_and_atomic_write(tmp_path: Path) -> None:
    cfg = RunConfig(plan=TrainPlan(num_rounds=1), out_dir=str(tmp_path))
    entry = RoundLog(round=1)
    entry.train.append(SiteReply("site-1", 1, {k.NUM_EXAMPLES: 50, k.EPSILON: 2.5, k.DELTA: 1e-5,
                                               k.NOISE_MULTIPLIER: 1.1, k.SAMPLE_RATE: 0.2}))
    entry.evaluate.append(SiteReply("site-1", 1, {k.AUC: 0.9, k.NUM_EXAMPLES: 10}))
    entry.evaluate_metrics = {k.AUC: 0.9, k.ACCURACY: 0.8, k.LOSS: 0.4}
    entry.train_metrics = {k.TRAIN_LOSS: 0.5}
    report = RunReport(config=cfg, rounds=[entry], status="completed")
    path = report.write(tmp_path)
    doc = json.loads(path.read_text())
    assert doc["rounds"][0]["round"] == 1 and doc["rounds"][0]["metrics"]["auc"] == 0.9
    assert doc["rounds"][0]["metrics"][k.TRAIN_LOSS] == 0.5
    assert doc["sites"] == [{"site": "site-1", "num_examples": 50, "epsilon": 2.5,
                             "epsilon_prv": None, "epsilon_dataset": None, "epsilon_cap": None,
                             "delta": 1e-5, "noise_multiplier": 1.1, "sample_rate": 0.2,
                             "ledger_head": ""}]
    assert doc["config"]["num-server-rounds"] == 1
    assert doc["privacy"]["unit"].startswith("patient (not image)")
    assert "site-1" in (tmp_path / "summary.txt").read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_nodes_that_do_not_answer_are_reported() -> None:
    from flwr.app import Message

    from server.strategies.fedavg import VesaliusFedAvg
    from tests.flower_helpers import incoming

    request = incoming(RecordDict(), "train", node_id=11)
    answer = Message(RecordDict({k.METRICS: MetricRecord({k.NUM_EXAMPLES: 5})}), reply_to=request)
    entry = RoundLog(round=1)
    VesaliusFedAvg._record(entry, [answer], expected=[11, 12], train=True)
    assert [r.node_id for r in entry.train] == [11]
    assert entry.errors == [{"site": "node-12", "node_id": 12, "phase": "train",
                             "reason": "no reply within the round timeout"}]


def test_pool_metrics_pools_only_keys_every_reply_carries() -> None:
    with_hist = _reply(**{k.NUM_EXAMPLES: 2, k.AUC: 1.0, k.HIST_POSITIVE: [0, 1], k.HIST_NEGATIVE: [1, 0]})
    without = _reply(**{k.NUM_EXAMPLES: 2, k.AUC: 0.5})
    pooled = pool_metrics([with_hist, without], k.NUM_EXAMPLES)
    assert pooled[k.AUC] == pytest.approx(0.75)
    assert k.HIST_POSITIVE not in pooled and k.AUC_POOLED not in pooled


def test_duplicate_site_names_stay_apart_and_json_has_no_nan(tmp_path: Path) -> None:
    cfg = RunConfig(plan=TrainPlan(num_rounds=1, private=False), out_dir=str(tmp_path))
    entry = RoundLog(round=1)
    for node_id in (1, 2):  # two hospitals that both kept the default name, non-private
        entry.train.append(SiteReply("site", node_id, {k.NUM_EXAMPLES: 10 * node_id,
                                                       k.EPSILON: math.inf, k.DELTA: math.nan}))
    report = RunReport(config=cfg, rounds=[entry], status="completed")
    doc = json.loads(report.write(tmp_path).read_text())  # allow_nan=False would raise on NaN
    assert [s["site"] for s in doc["sites"]] == ["site#1", "site#2"]
    assert all(s["epsilon"] is None and s["delta"] is None for s in doc["sites"])


def _refusal(node_id: int) -> tuple[object, object]:
    from flwr.app import Error, Message

    from tests.flower_helpers import incoming

    request = incoming(RecordDict(), "train", node_id=node_id)
    return request, Message(Error(code=k.ERROR_CODE_REFUSED, reason="refused: over cap"),
                            reply_to=request)


def test_a_refusing_node_is_excluded_from_later_messages() -> None:
    from flwr.app import Message

    from server.strategies.fedavg import VesaliusFedAvg
    from tests.flower_helpers import incoming

    strategy = VesaliusFedAvg(on_refusal="exclude")
    _, refused = _refusal(12)
    ok_req = incoming(RecordDict(), "train", node_id=11)
    ok = Message(RecordDict({k.METRICS: MetricRecord({k.NUM_EXAMPLES: 5})}), reply_to=ok_req)
    entry = RoundLog(round=1)
    VesaliusFedAvg._record(entry, [ok, refused], expected=[11, 12], train=True)
    assert entry.refusals and entry.refusals[0]["node_id"] == 12
    strategy._handle_refusals(entry)
    assert strategy.excluded == {12: "refused: over cap"}
    kept = strategy._remember(2, "train", [incoming(RecordDict(), "train", node_id=n)
                                           for n in (11, 12)])
    assert [m.metadata.dst_node_id for m in kept] == [11]


def test_on_refusal_stop_ends_the_run_with_the_reason() -> None:
    from server.strategies.fedavg import RunStopped, VesaliusFedAvg

    strategy = VesaliusFedAvg(on_refusal="stop")
    _, refused = _refusal(12)
    entry = RoundLog(round=3)
    VesaliusFedAvg._record(entry, [refused], expected=[12], train=True)
    with pytest.raises(RunStopped, match="round 3.*refused: over cap"):
        strategy._handle_refusals(entry)


def test_stopped_and_excluded_runs_say_why_in_the_report(tmp_path: Path) -> None:
    cfg = RunConfig(plan=TrainPlan(num_rounds=1), out_dir=str(tmp_path))
    report = RunReport(config=cfg, status="stopped", reason="round 1: a node refused the plan",
                       excluded={12: "refused: over cap"})
    doc = json.loads(report.write(tmp_path).read_text())
    assert doc["status"] == "stopped" and "refused" in doc["reason"]
    assert doc["excluded"] == [{"node_id": 12, "reason": "refused: over cap"}]
    assert "excluded node 12" in (tmp_path / "summary.txt").read_text()


def test_summary_states_the_operating_point_and_the_metrics_at_it(tmp_path: Path) -> None:
    cfg = RunConfig(plan=TrainPlan(num_rounds=1), out_dir=str(tmp_path))
    report = RunReport(config=cfg, status="completed")
    report.extra["inference"] = {
        "operating_point": {"chosen_on": "validation", "method": "youden",
                            "calibrated_threshold": 0.4966},
        "metrics": {"sensitivity": {"value": 0.908}, "specificity": {"value": 0.949}},
    }
    text = report.summary()
    assert "operating point (chosen on validation, youden): calibrated probability >= 0.4966" in text
    assert "test sensitivity at it: 0.908" in text and "test specificity at it: 0.949" in text
    assert "operating point" not in RunReport(config=cfg).summary()


def test_summary_of_a_multiclass_run_gives_its_pooled_macro_auc(tmp_path: Path) -> None:
    cfg = RunConfig(plan=TrainPlan(num_rounds=1), out_dir=str(tmp_path))
    report = RunReport(config=cfg, status="completed")
    report.extra["inference"] = {"task": "multiclass", "multiclass": {
        "auc": {"macro": {"value": 0.8123}}, "accuracy": {"value": 0.7},
        "balanced_accuracy": {"value": 0.66}}}
    text = report.summary()
    assert "pooled test macro one-vs-rest AUC: 0.812" in text
    assert "test accuracy at the most probable class: 0.700" in text
    assert "test balanced accuracy: 0.660" in text
