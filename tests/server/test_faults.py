"""Faults at the coordinator: a hospital that stops answering, too few results, a resumed run.

A fake grid plays three hospitals; one of them goes silent from some round on, the way a
deployed SuperLink reports it: an error reply whose source is the SuperLink itself
(``SUPERLINK_NODE_ID``), not the node.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from common import messages as k
from common.config import RunConfig, TrainPlan
from server.report import RunReport
from server.resume import ResumeState, load_state, read_active_run, save_state, write_active_run
from server.resume import finish_active_run
from server.strategies.fedavg import DROPPED_REASON, RoundLog, SiteReply, VesaliusFedAvg
from tests.flower_helpers import DirectGrid

SITES = {11: "site-a", 22: "site-b", 33: "site-c"}


class SilentNodeGrid(DirectGrid):
    """Three hospitals; ``silent[node] = (first, last)`` rounds in which that node is gone."""

    def __init__(self, silent: dict[int, tuple[int, int]] | None = None) -> None:
        self.silent = silent or {}
        self.received: list[tuple[int, str, int]] = []  # (round, type, node)
        super().__init__()

    def get_node_ids(self) -> Iterable[int]:
        return list(SITES)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = msg.metadata.dst_node_id
            config = msg.content[k.CONFIG]
            server_round = int(config["server-round"])
            self.received.append((server_round, msg.metadata.message_type, node))
            first, last = self.silent.get(node, (0, -1))
            if first <= server_round <= last:
                reply = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                replies.append(reply)
                continue
            info = ConfigRecord({k.SITE: SITES[node]})
            if msg.metadata.message_type == "train":
                state = msg.content[k.ARRAYS].to_torch_state_dict()
                state = {name: t + node for name, t in state.items()}  # a node-specific update
                content = RecordDict({
                    k.ARRAYS: ArrayRecord(state), k.NODE_INFO: info,
                    k.METRICS: MetricRecord({k.NUM_EXAMPLES: 10, k.UNIT_WEIGHT: 1,
                                             k.TRAIN_LOSS: 0.5})})
            else:
                content = RecordDict({k.NODE_INFO: info, k.METRICS: MetricRecord(
                    {k.NUM_EXAMPLES: 5, k.AUC: 0.7, k.LOSS: 0.6})})
            replies.append(Message(content, reply_to=msg))
        return replies


def _start(strategy: VesaliusFedAvg, grid: Grid, rounds: int) -> torch.Tensor:
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord({"w": torch.zeros(2)}),
                            num_rounds=rounds, timeout=5, train_config=ConfigRecord({}),
                            evaluate_config=ConfigRecord({}))
    return result.arrays.to_torch_state_dict()["w"]


def test_a_hospital_that_stops_answering_is_named_by_site_once_and_its_return_noted() -> None:
    # Prepare: site-c (node 33) is gone in rounds 2 and 3, back in round 4
    grid = SilentNodeGrid({33: (2, 3)})
    strategy = VesaliusFedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)

    # Execute
    _start(strategy, grid, rounds=4)

    # Assert: each phase of each silent round has exactly one error row, named by site
    for r in (2, 3):
        rows = strategy.rounds[r].errors
        assert [(e["site"], e["phase"], e["reason"]) for e in rows] == [
            ("site-c", "train", DROPPED_REASON), ("site-c", "evaluate", DROPPED_REASON)]
        assert strategy.rounds[r].status == "aggregated"
        assert sorted(s.site for s in strategy.rounds[r].train) == ["site-a", "site-b"]
    every_site = {e["site"] for entry in strategy.rounds.values() for e in entry.errors}
    assert every_site == {"site-c"}  # never node-1 (the SuperLink) nor a Flower node id
    assert list(strategy.dropped) == ["site-c"]
    drop = strategy.dropped["site-c"]
    assert (drop["round"], drop["phase"], drop["rejoined_round"]) == (2, "train", 4)
    assert drop["at"].endswith("Z")


def test_a_round_with_fewer_results_than_min_nodes_fails_and_keeps_the_model() -> None:
    # Prepare: min-nodes 3; site-c gone in round 2 only
    grid = SilentNodeGrid({33: (2, 2)})
    strategy = VesaliusFedAvg(min_train_nodes=3, min_evaluate_nodes=2, min_available_nodes=3)
    # Execute
    final = _start(strategy, grid, rounds=2)
    # Assert: round 1 averaged 11, 22, 33 (weights equal): w = 22; round 2 was not aggregated
    assert strategy.rounds[1].status == "aggregated"
    assert strategy.rounds[2].status == "failed"
    assert "only 2 training result(s) arrived, fewer than min-nodes = 3" in strategy.rounds[2].failure
    assert torch.allclose(final, torch.full((2,), 22.0))


def test_the_report_lists_dropped_hospitals_and_failed_rounds(tmp_path: Path) -> None:
    grid = SilentNodeGrid({33: (2, 2)})
    strategy = VesaliusFedAvg(min_train_nodes=3, min_evaluate_nodes=2, min_available_nodes=3)
    _start(strategy, grid, rounds=3)
    report = RunReport(config=RunConfig(plan=TrainPlan(num_rounds=3), out_dir=str(tmp_path)),
                       rounds=[strategy.rounds[r] for r in (1, 2, 3)], status="incomplete")
    report.dropped = strategy.dropped
    doc = json.loads(report.write(tmp_path).read_text())
    assert [row["site"] for row in doc["dropped"]] == ["site-c"]
    assert doc["dropped"][0]["rejoined_round"] == 3
    assert [r["status"] for r in doc["rounds"]] == ["aggregated", "failed", "aggregated"]
    summary = (tmp_path / "summary.txt").read_text()
    assert "round 2 failed: only 2 training result(s) arrived" in summary
    assert summary.count("dropped site-c in round 2 (train)") == 1
    assert "answered again in round 3" in summary


def test_a_resumed_strategy_continues_the_round_count() -> None:
    grid = SilentNodeGrid()
    strategy = VesaliusFedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    strategy.round_offset = 2
    _start(strategy, grid, rounds=1)
    assert sorted(strategy.rounds) == [3]
    assert {r for r, _, _ in grid.received} == {3}  # the nodes are told it is round 3


def test_resume_state_round_trips_and_picks_the_last_checkpointed_round(tmp_path: Path) -> None:
    # Prepare: rounds 1-2 aggregated with checkpoints, round 3 logged but not checkpointed
    rounds = []
    for r in (1, 2, 3):
        entry = RoundLog(round=r, train=[SiteReply("site-a", 11, {k.NUM_EXAMPLES: 10.0,
                                                                  k.EPSILON: float(r)}, "4:ab")])
        entry.evaluate_metrics = {k.AUC: float("nan") if r == 1 else 0.7}
        rounds.append(entry)
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for r in (1, 2):
        torch.save({"w": torch.ones(1)}, ckpt / f"round-{r}.pt")
    save_state(tmp_path, ResumeState(run_id="run-x", rounds=rounds, excluded={22: "budget"},
                                     dropped={"site-c": {"site": "site-c", "round": 2}},
                                     sites={11: "site-a"}, hospital_dp_releases=2))
    # Execute
    state = load_state(tmp_path)
    # Assert
    assert state.run_id == "run-x" and state.excluded == {22: "budget"}
    assert state.sites == {11: "site-a"} and state.hospital_dp_releases == 2
    assert state.rounds[1].train[0].ledger_head == "4:ab"
    assert np.isnan(state.rounds[0].evaluate_metrics[k.AUC])
    assert state.last_aggregated_round(ckpt) == 2


def test_resume_refuses_a_folder_without_state_in_one_sentence(tmp_path: Path) -> None:
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="holds no resumable run"):
        load_state(tmp_path)
    (tmp_path / "resume-state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_state(tmp_path)


def test_the_active_run_record_is_read_until_the_run_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert read_active_run(tmp_path) is None
    write_active_run(tmp_path, out, {"num-server-rounds": 3, "model": "cnn"})
    doc = read_active_run(tmp_path)
    assert doc is not None and doc["out_dir"] == str(out.resolve())
    assert doc["run_config"] == {"num-server-rounds": 3, "model": "cnn"}
    finish_active_run(tmp_path, out, "completed")
    assert read_active_run(tmp_path) is None


def test_the_page_and_the_screen_name_the_dropped_hospital_and_the_failed_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.report_view import print_report
    from server.report_html import write_report_html

    grid = SilentNodeGrid({33: (2, 2)})
    strategy = VesaliusFedAvg(min_train_nodes=3, min_evaluate_nodes=2, min_available_nodes=3)
    _start(strategy, grid, rounds=3)
    report = RunReport(config=RunConfig(plan=TrainPlan(num_rounds=3), out_dir=str(tmp_path)),
                       rounds=[strategy.rounds[r] for r in (1, 2, 3)], status="incomplete",
                       reason="round(s) 2 aggregated fewer than min-nodes = 3 training results")
    report.dropped = strategy.dropped
    doc = report.to_dict()
    write_report_html(doc, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "site-c" in page and "stopped answering; answered again in round 3" in page
    assert "only 2 training result(s) arrived, fewer than min-nodes = 3" in page
    print_report(doc)
    screen = " ".join(capsys.readouterr().out.split())
    assert "round 2 failed: only 2 training result(s) arrived" in screen
    assert screen.count("dropped site-c in round 2 (train)") == 1
    assert "run incomplete" in screen
