"""Build Flower Messages and Contexts in-process, as the runtime would deliver them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message, Metadata, RecordDict


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
