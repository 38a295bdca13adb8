"""A statistics query's failures name the hospital by the site prefix of its error reply.

At 100 simulated hospitals the report listed the sites whose query failed (no validation
patients, too few of one class) as ``node-<Flower id>``, although each reason began with
``[site-69]``: an error reply carries no records, so that prefix is the only name it has.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.inference import query_nodes
from tests.flower_helpers import incoming


class ErrorGrid:
    """Every node refuses the query; node 42 without a site prefix; node 43 never answers."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        del timeout
        out = []
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            if node == 43:
                continue
            received = incoming(RecordDict(), "query", node_id=node)
            reason = ("[site-69] the node has no patients in its val split" if node == 41
                      else "internal error at the node")
            out.append(Message(Error(code=0, reason=reason), reply_to=received))
        return out


def test_failures_are_named_by_the_site_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    # Outside a running ServerApp, Flower has no task identity to stamp on new messages.
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        if getattr(TaskIdentity, attr) is None:
            monkeypatch.setattr(TaskIdentity, attr, value)
    res = query_nodes(ErrorGrid(), [41, 42, 43], "metrics", {}, timeout=1.0)  # type: ignore[arg-type]
    named = {f["node_id"]: (f["site"], f["reason"]) for f in res.failures}
    assert named[41] == ("site-69", "[site-69] the node has no patients in its val split")
    assert named[42] == ("node-42", "internal error at the node")  # nothing else names it
    assert named[43] == ("node-43", "no reply within the timeout")
    assert not res.values
