"""The node's side of fast rounds: a client mod that unpacks what arrives and packs the reply.

:func:`transport_mod` sits just inside :func:`client.mods.sanitize_errors_mod` (which stays
outermost), so every other mod and handler sees ordinary ArrayRecords:

* packed ArrayRecords of an incoming message (:mod:`common.packing`) are unpacked and the
  coordinator's :data:`common.packing.TRANSPORT_KEY` marker is removed;
* the reply's ArrayRecords are packed only when the message carried that marker, i.e. when
  the coordinator (:class:`server.transport.TransportGrid`) unpacks replies. A message from a
  coordinator without it passes through untouched and gets an ordinary reply.

``VESALIUS_TRANSPORT=stock`` in the node's environment (that of ``flower-supernode``, which
its ClientApp processes inherit) stops the packing of replies; packed messages are still
unpacked, so the node never fails on them. A malformed packed record raises
:class:`common.packing.PackingError`, which the outer mod turns into a safe error reply.

Benchmarks only: with ``VESALIUS_TIMINGS_FILE`` set, the mod appends one JSON line per
message to that file: the message type and the wall-clock start and end (``time.time()``) of
the node's own work on it (every inner mod and the handler). Nothing else is written: no
content, no path, no node setting (``bench/deployment.py`` subtracts this compute from the
round time).
"""

from __future__ import annotations

import json
import os
import time

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from common.packing import is_marked, is_packed, pack_content, transport_enabled, unpack_content

__all__ = ["ENV_TIMINGS", "transport_mod"]

#: Environment variable naming a file to which each message's compute span is appended.
ENV_TIMINGS = "VESALIUS_TIMINGS_FILE"


def _has_packed(msg: Message) -> bool:
    return any(is_packed(record) for record in msg.content.array_records.values())


def transport_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Unpack ``msg``, run the rest of the app, pack the reply when the sender unpacks.

    See the module docstring.
    """
    if not msg.has_content():
        return call_next(msg, context)
    marked = is_marked(msg.content)
    if marked or _has_packed(msg):
        msg.content = unpack_content(msg.content)
    start = time.time()
    reply = call_next(msg, context)
    _record_timing(msg.metadata.message_type, start, time.time())
    if marked and transport_enabled() and reply.has_content():
        reply.content = pack_content(reply.content)
    return reply


def _record_timing(message_type: str, start: float, end: float) -> None:
    """Append the span to :data:`ENV_TIMINGS`'s file, when set (benchmarks; never fails)."""
    target = os.environ.get(ENV_TIMINGS)
    if not target:
        return
    line = json.dumps({"type": message_type, "start": start, "end": end}) + "\n"
    try:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(line)
    except OSError:
        pass
