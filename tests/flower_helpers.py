"""Build Flower Messages and Contexts in-process, as the runtime would deliver them."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Message, Metadata, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


def incoming(content: RecordDict, message_type: str, *, node_id: int = 7, run_id: int = 1) -> Message:
    """A message as a SuperNode receives it from the coordinator."""
    metadata = Metadata(
        run_id=run_id,
        message_id=f"msg-{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


def node_context(node_config: Mapping[str, Any], *, node_id: int = 7, run_id: int = 1) -> Context:
    """A fresh per-run node Context (its ``state`` persists across messages of a run)."""
    return Context(
        run_id=run_id, node_id=node_id, node_config=dict(node_config), state=RecordDict(), run_config={}
    )


class DirectGrid(Grid):
    """Base of in-process test grids: a subclass answers ``send_and_receive`` itself.

    Outside a running ServerApp Flower has no task identity to stamp on new messages; one is
    set here. Pushing and pulling by id is not offered.
    """

    def __init__(self) -> None:
        for attr in ("_run_id", "_node_id", "_task_id"):
            if getattr(TaskIdentity, attr) is None:
                setattr(TaskIdentity, attr, 1 if attr != "_node_id" else 0)

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError
