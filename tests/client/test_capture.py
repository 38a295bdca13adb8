"""The capture mod: a copy of every reply as it leaves the node, for auditors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from client.capture import CAPTURE_ENV, CAPTURE_FILE, capture_mod
from tests.flower_helpers import incoming, node_context


def _reply_with(content: RecordDict):  # type: ignore[no-untyped-def]
    def call_next(msg: Message, context: Context) -> Message:
        return Message(content, reply_to=msg)
    return call_next


def test_off_by_default_and_every_record_described_when_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = RecordDict({
        "arrays": ArrayRecord({"w": torch.ones(2, 3)}),
        "metrics": MetricRecord({"num-examples": 12, "auc": 0.75}),
        "node-info": ConfigRecord({"site": "site-a"}),
    })
    msg = incoming(RecordDict(), "train")
    monkeypatch.delenv(CAPTURE_ENV, raising=False)
    capture_mod(msg, node_context({}), _reply_with(content))
    assert not (tmp_path / CAPTURE_FILE).exists()
    monkeypatch.setenv(CAPTURE_ENV, str(tmp_path))
    reply = capture_mod(msg, node_context({}), _reply_with(content))
    assert reply.content["metrics"]["auc"] == 0.75  # the reply itself is untouched
    doc = json.loads((tmp_path / CAPTURE_FILE).read_text().splitlines()[0])
    assert doc["type"] == "train"
    assert doc["records"]["metrics"]["values"] == {"num-examples": 12, "auc": 0.75}
    assert doc["records"]["node-info"]["values"] == {"site": "site-a"}
    assert doc["records"]["arrays"]["arrays"]["w"]["shape"] == [2, 3]
    assert (tmp_path / CAPTURE_FILE).stat().st_mode & 0o077 == 0


def test_an_error_reply_is_captured_with_its_reason(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CAPTURE_ENV, str(tmp_path))
    msg = incoming(RecordDict(), "query")

    def fails(m: Message, c: Context) -> Message:
        return Message(Error(code=9, reason="[site-a] refused: budget"), reply_to=m)

    capture_mod(msg, node_context({}), fails)
    doc = json.loads((tmp_path / CAPTURE_FILE).read_text())
    assert doc["error"] == {"code": 9, "reason": "[site-a] refused: budget"}
