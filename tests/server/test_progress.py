"""The coordinator reports each reply as it arrives, and names error replies by site."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from server.progress import (
    ProgressEvent,
    ProgressGrid,
    emit_marker,
    emit_round_marker,
    parse_marker,
    parse_round_marker,
)
from server.strategies.fedavg import RoundLog, VesaliusFedAvg
from tests.flower_helpers import incoming


class SlowGrid:
    """Replies to one more message at every pull (as nodes finishing one after another)."""

    def __init__(self, drop: int = 0) -> None:
        self.sent: list[Message] = []
        self.drop = drop  # this many nodes never answer

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.sent = list(messages)
        return [m.metadata.message_id for m in self.sent]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        pending = [m for m in self.sent if m.metadata.message_id in set(message_ids)]
        if len(pending) <= self.drop:
            return []
        return [Message(RecordDict({"metrics": MetricRecord({"n": 1})}), reply_to=pending[0])]


def _train_messages(n: int, server_round: int) -> list[Message]:
    return [incoming(RecordDict({"config": ConfigRecord({"server-round": server_round})}),
                     "train", node_id=i + 1) for i in range(n)]


def test_every_reply_is_reported_as_it_arrives() -> None:
    events: list[ProgressEvent] = []
    grid = ProgressGrid(SlowGrid(), events.append, poll_interval=0.0)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive(_train_messages(3, server_round=2), timeout=5))
    assert len(replies) == 3
    assert events == [ProgressEvent("train", 2, n, 3) for n in range(4)]


def test_a_timeout_returns_the_replies_that_arrived() -> None:
    events: list[ProgressEvent] = []
    grid = ProgressGrid(SlowGrid(drop=1), events.append, poll_interval=0.01)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive(_train_messages(3, server_round=1), timeout=0.3))
    assert len(replies) == 2 and events[-1] == ProgressEvent("train", 1, 2, 3)


def test_final_test_and_queries_are_their_own_phases() -> None:
    events: list[ProgressEvent] = []
    grid = ProgressGrid(SlowGrid(), events.append, poll_interval=0.0)  # type: ignore[arg-type]
    test = incoming(RecordDict({"config": ConfigRecord({"server-round": 6, "split": "test"})}),
                    "evaluate")
    grid.send_and_receive([test], timeout=5)
    grid.send_and_receive([incoming(RecordDict(), "query.metrics")], timeout=5)
    assert {(e.phase, e.round) for e in events} == {("test", 0), ("query", 0)}


def test_a_display_error_never_breaks_the_run() -> None:
    def broken(_: ProgressEvent) -> None:
        raise RuntimeError("terminal gone")

    grid = ProgressGrid(SlowGrid(), broken, poll_interval=0.0)  # type: ignore[arg-type]
    assert len(list(grid.send_and_receive(_train_messages(2, 1), timeout=5))) == 2


def test_markers_round_trip(capsys: object) -> None:
    event = ProgressEvent("evaluate", 3, 1, 4)
    emit_marker(event)
    emit_round_marker({"round": 3, "metrics": {"auc": 0.8}})
    out = capsys.readouterr().out.splitlines()  # type: ignore[attr-defined]
    assert parse_marker(out[0]) == event and parse_marker(out[1]) is None
    assert parse_round_marker(out[1]) == {"round": 3, "metrics": {"auc": 0.8}}
    assert parse_round_marker("INFO : a Flower line") is None


def test_error_replies_are_named_by_the_site_prefix_nodes_give() -> None:
    named = incoming(RecordDict(), "train", node_id=41)
    anonymous = incoming(RecordDict(), "train", node_id=42)
    replies = [
        Message(Error(code=0, reason="[site-2] the node has no usable labelled image"), reply_to=named),
        Message(Error(code=0, reason="internal error at the node"), reply_to=anonymous),
    ]
    entry = RoundLog(round=1)
    VesaliusFedAvg._record(entry, replies, expected=[41, 42], train=True)
    assert [e["site"] for e in entry.errors] == ["site-2", "node-42"]
