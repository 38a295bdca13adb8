"""See exactly what leaves the hospital: a copy of every reply the node sends, for auditors.

With ``VESALIUS_CAPTURE_DIR`` set in the node's environment, :func:`capture_mod` (the
outermost mod of the ClientApp, so it sees the reply as Flower sends it, after every other
mod) appends one JSON line per reply to ``<dir>/outgoing.jsonl``: the message type, the error
code and reason if it is an error, and for every record its kind and every key and value —
config and metric values in full, arrays by name, dtype, shape and SHA-256 (their bytes are
model weights or masked vectors, never text). A review board, or a test, can then search
that file for anything identifying: file paths, DICOM values, exception text.

Off by default; the file is owner-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

log = logging.getLogger(__name__)

CAPTURE_ENV = "VESALIUS_CAPTURE_DIR"
CAPTURE_FILE = "outgoing.jsonl"


def describe(msg: Message) -> dict[str, Any]:
    """Everything a reply carries, as JSON-able values (array bytes as hashes)."""
    doc: dict[str, Any] = {"type": msg.metadata.message_type}
    if msg.has_error():
        doc["error"] = {"code": int(msg.error.code), "reason": str(msg.error.reason)}
        return doc
    records: dict[str, Any] = {}
    for name, record in msg.content.items():
        if isinstance(record, ArrayRecord):
            records[name] = {"kind": "arrays", "arrays": {
                key: {"dtype": str(arr.dtype), "shape": list(arr.shape),
                      "sha256": hashlib.sha256(arr.data).hexdigest()}
                for key, arr in record.items()}}
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            kind = "config" if isinstance(record, ConfigRecord) else "metrics"
            records[name] = {"kind": kind, "values": {
                key: (value.hex() if isinstance(value, bytes) else value)
                for key, value in record.items()}}
        else:
            records[name] = {"kind": type(record).__name__}
    doc["records"] = records
    return doc


def capture_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the app; with ``VESALIUS_CAPTURE_DIR`` set, append the reply to the capture file."""
    reply = call_next(msg, context)
    folder = os.environ.get(CAPTURE_ENV, "")
    if folder:
        try:
            path = Path(folder)
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / CAPTURE_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(describe(reply), default=str) + "\n")
        except OSError as exc:  # capturing must never break serving
            log.warning("could not capture an outgoing message (%s)", type(exc).__name__)
    return reply
