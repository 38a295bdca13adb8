"""A Flower ``Grid`` stand-in that calls a ClientApp in-process (no Ray, no SuperLink).

``send_and_receive`` delivers each message to the ClientApp of its destination node, as a
SuperNode would (fresh metadata, the node's own Context), and returns the replies; nodes
listed in ``silent`` do not answer (a timeout). Every reply is also kept in ``replies`` so
that tests can inspect exactly what left the nodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from client.app import build_client_app, simulated_nodes
from common import messages as k
from common.config import NodeConfig
from tests.flower_helpers import incoming, node_context


class InProcessGrid:
    """Deliver messages to ``nodes`` (node id -> NodeConfig) through the real ClientApp."""

    def __init__(self, nodes: Mapping[int, NodeConfig], *, silent: Iterable[int] = ()) -> None:
        ids = list(nodes)
        self.app: ClientApp = build_client_app(
            simulated_nodes({pid: nodes[nid] for pid, nid in enumerate(ids)})
        )
        self.contexts: dict[int, Context] = {
            nid: node_context({k.PARTITION_ID: pid}, node_id=nid) for pid, nid in enumerate(ids)
        }
        self.silent = set(silent)
        # Outside a running ServerApp, Flower has no task identity to stamp on new messages.
        for attr in ("_run_id", "_node_id", "_task_id"):
            if getattr(TaskIdentity, attr) is None:
                setattr(TaskIdentity, attr, 1 if attr != "_node_id" else 0)
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        del timeout
        out = []
        for msg in messages:
            self.sent.append(msg)
            nid = int(msg.metadata.dst_node_id)
            if nid in self.silent:
                continue
            delivered = incoming(msg.content, msg.metadata.message_type, node_id=nid)
            reply = self.app(delivered, self.contexts[nid])
            self.replies.append(reply)
            out.append(reply)
        return out

    def __getattr__(self, name: str) -> Any:  # anything else a Grid has is not needed here
        raise AttributeError(name)
