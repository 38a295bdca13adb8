"""What the coordinator is doing right now: phase, round and how many nodes have answered.

:class:`ProgressGrid` wraps the Grid that Flower hands the ServerApp. Its
:meth:`~ProgressGrid.send_and_receive` pushes the messages and polls for replies itself (Flower's
own loop has the same shape but says nothing until every reply is in), calling ``on_progress``
with a :class:`ProgressEvent` whenever a reply arrives. In a simulation the CLI draws its
progress bar from these events directly; in deployment the ServerApp runs inside Flower's
process, so the events travel as marker lines on its standard output (Flower streams it to
``flwr run --stream``), which :func:`parse_marker` turns back into events.

Progress lines carry only counts, phase names and round numbers: nothing a node sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.run import Run
from flwr.serverapp import Grid

__all__ = ["MARKER", "ROUND_MARKER", "DelegatingGrid", "ProgressCallback", "ProgressEvent",
           "ProgressGrid", "emit_marker", "emit_round_marker", "parse_marker", "parse_round_marker",
           "track_progress"]

#: Prefix of a progress line on the ServerApp's standard output (deployment).
MARKER = "[vesalius:progress] "
#: Prefix of a finished round's summary line (deployment).
ROUND_MARKER = "[vesalius:round] "

#: How often replies are polled for (seconds). Flower's HTTP grid polls every 3 s.
POLL_INTERVAL_S = 0.2


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a run.

    Attributes
    ----------
    phase : str
        ``train``, ``evaluate`` (validation), ``test`` (final evaluation) or ``query``
        (statistics for pooled inference).
    round : int
        The server round of a ``train``/``evaluate`` phase; 0 otherwise.
    answered : int
        Replies received so far in this phase.
    expected : int
        Messages sent in this phase.
    """

    phase: str
    round: int
    answered: int
    expected: int


def _phase_of(message: Message) -> tuple[str, int]:
    content = message.content
    config = content.get("config") if isinstance(content, RecordDict) else None
    server_round = 0
    split = ""
    if isinstance(config, ConfigRecord):
        server_round = int(config.get("server-round", 0) or 0)  # type: ignore[arg-type]
        split = str(config.get("split", ""))
    kind = message.metadata.message_type.split(".")[0]
    if kind == "evaluate" and split == "test":
        return "test", 0
    return kind, server_round if kind in ("train", "evaluate") else 0


class DelegatingGrid(Grid):
    """A Grid that hands every call to ``inner``; subclasses change one behaviour."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner

    def set_run(self, run: Run) -> None:  # noqa: D102 - delegation
        self._inner.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self._inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # noqa: D102
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:  # noqa: D102
        return self._inner.send_and_receive(messages, timeout=timeout)


class ProgressGrid(DelegatingGrid):
    """A Grid that reports each reply as it arrives (and polls every :data:`POLL_INTERVAL_S`)."""

    def __init__(self, inner: Grid, on_progress: Callable[[ProgressEvent], None],
                 *, poll_interval: float = POLL_INTERVAL_S) -> None:
        super().__init__(inner)
        self._on_progress = on_progress
        self._poll_interval = poll_interval

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull replies until all are in or ``timeout`` has passed."""
        batch = list(messages)
        phase, server_round = _phase_of(batch[0]) if batch else ("", 0)
        pending = set(self._inner.push_messages(batch))
        expected = len(pending)
        del batch
        self._emit(phase, server_round, 0, expected)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            received = list(self._inner.pull_messages(pending))
            if received:
                replies.extend(received)
                pending.difference_update(m.metadata.reply_to_message_id for m in received)
                self._emit(phase, server_round, len(replies), expected)
            if pending:
                time.sleep(self._poll_interval)
        return replies

    def _emit(self, phase: str, server_round: int, answered: int, expected: int) -> None:
        try:
            self._on_progress(ProgressEvent(phase, server_round, answered, expected))
        except Exception:  # noqa: BLE001 - a display problem must never break a run
            pass


ProgressCallback = Callable[[ProgressEvent], None]


def track_progress(grid: Grid, on_progress: ProgressCallback | None) -> Grid:
    """``grid`` wrapped to report replies to ``on_progress`` (unchanged when it is ``None``)."""
    return grid if on_progress is None else ProgressGrid(grid, on_progress)


def emit_marker(event: ProgressEvent) -> None:
    """Print ``event`` as one marker line (deployment: Flower streams it to the operator)."""
    print(MARKER + json.dumps(asdict(event)), flush=True)


def emit_round_marker(summary: dict[str, Any]) -> None:
    """Print a finished round's summary (``report.json``'s round entry) as one marker line."""
    print(ROUND_MARKER + json.dumps(summary, default=str), flush=True)


def parse_round_marker(line: str) -> dict[str, Any] | None:
    """The round summary in a line printed by :func:`emit_round_marker`, or ``None``."""
    start = line.find(ROUND_MARKER)
    if start < 0:
        return None
    try:
        doc = json.loads(line[start + len(ROUND_MARKER):])
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def parse_marker(line: str) -> ProgressEvent | None:
    """The event in a marker line printed by :func:`emit_marker`, or ``None``."""
    start = line.find(MARKER)
    if start < 0:
        return None
    try:
        doc = json.loads(line[start + len(MARKER):])
        return ProgressEvent(str(doc["phase"]), int(doc["round"]), int(doc["answered"]),
                             int(doc["expected"]))
    except (ValueError, KeyError, TypeError):
        return None
