"""The coordinator's side of fast rounds: packed models and adaptive polling.

:class:`TransportGrid` wraps the Grid Flower hands the ServerApp, in place of
:class:`server.progress.ProgressGrid` (it is one, so progress events are unchanged):

* every ArrayRecord of an outgoing message travels packed (one flat array per dtype,
  :mod:`common.packing`) and every packed ArrayRecord of a reply is unpacked before anyone
  sees it, so strategies and handlers work on ordinary records. Outgoing messages carry the
  :data:`common.packing.TRANSPORT_KEY` marker, which tells the node's
  :func:`client.transport.transport_mod` to pack its reply; a node without that mod answers
  unpacked and is understood all the same.
* :meth:`TransportGrid.send_and_receive` polls for replies after :class:`PollSchedule`'s
  delays (20 ms doubling to 200 ms, back to 20 ms whenever a reply arrives) instead of
  Flower's fixed 3 s (``HttpGrid``) or 0.1 s (``InMemoryGrid``); the timeout is honoured as
  Flower honours it (no pull once it has passed; ``None`` waits for every reply).

A FedAvg strategy puts one RecordDict in every message of a round: it is packed once and the
packed record is shared, so Flower serialises it once.

Only Flower's own grids are wrapped (:func:`with_transport`): in-process stand-ins that hand
messages straight to handlers, without the node's mods, keep the grid of before.

``VESALIUS_TRANSPORT=stock`` (the environment of the ServerApp process; in deployment, that of
``flower-superlink``) switches both off: :func:`with_transport` then returns what
:func:`server.progress.track_progress` returns, the grid of before this module.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.packing import ENV_TRANSPORT, pack_content, transport_enabled, unpack_content
from server.progress import (
    DelegatingGrid,
    ProgressCallback,
    ProgressGrid,
    _phase_of,
    track_progress,
)

__all__ = ["ENV_TIMINGS", "ENV_TRANSPORT", "PollSchedule", "TimedGrid", "TransportGrid",
           "transport_enabled", "with_transport"]

#: Benchmarks only: a file to which every ``send_and_receive`` appends its span (phase,
#: round, wall-clock start and end), in stock and packed mode alike (``bench/deployment.py``).
ENV_TIMINGS = "VESALIUS_TIMINGS_FILE"

@dataclass(frozen=True)
class PollSchedule:
    """Delays between pulls: ``first`` seconds, multiplied by ``factor`` after every empty
    pull up to ``longest``; back to ``first`` when a reply arrives.

    Faster polling costs CPU on the coordinator's host (each pull is a request to the
    SuperLink); a long local training waits at most ``longest`` more than it must.
    """

    first: float = 0.02
    factor: float = 2.0
    longest: float = 0.2

    def __post_init__(self) -> None:
        if not (0 < self.first <= self.longest) or self.factor < 1:
            raise ValueError("poll schedule needs 0 < first <= longest and factor >= 1")

    def delays(self) -> Iterator[float]:
        """The delays after successive empty pulls (endless)."""
        delay = self.first
        while True:
            yield delay
            delay = min(delay * self.factor, self.longest)


def _noop(_event: object) -> None:
    return None


class TransportGrid(ProgressGrid):
    """A Grid that packs outgoing models, unpacks replies and polls adaptively.

    Parameters
    ----------
    inner : Grid
        The Grid to wrap (Flower's ``HttpGrid`` or ``InMemoryGrid``, or another wrapper).
    on_progress : callable or None
        Hears of every reply as :class:`server.progress.ProgressGrid` would tell it.
    schedule : PollSchedule, keyword-only
        Delays between pulls in :meth:`send_and_receive`.
    sleep, clock : callable, keyword-only
        ``time.sleep`` and ``time.monotonic`` (tests replace them).
    """

    def __init__(self, inner: Grid, on_progress: ProgressCallback | None = None, *,
                 schedule: PollSchedule | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(inner, on_progress if on_progress is not None else _noop)
        self._schedule = schedule if schedule is not None else PollSchedule()
        self._sleep = sleep
        self._clock = clock

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push ``messages`` with their ArrayRecords packed (the messages themselves are not
        changed; each gets the message id of its packed copy, as Flower's grids set it)."""
        originals = list(messages)
        packed: dict[int, RecordDict] = {}  # one packing per distinct (shared) RecordDict
        outgoing = [self._packed(msg, packed) for msg in originals]
        ids = list(self._inner.push_messages(outgoing))
        for original, sent in zip(originals, outgoing, strict=True):
            if sent is not original:
                original.metadata.__dict__["_message_id"] = sent.metadata.message_id
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull replies and unpack their packed ArrayRecords."""
        replies = list(self._inner.pull_messages(message_ids))
        for reply in replies:
            if reply.has_content():
                reply.content = unpack_content(reply.content)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull replies after :class:`PollSchedule`'s delays until
        all are in or ``timeout`` seconds have passed (``None``: no limit)."""
        batch = list(messages)
        phase, server_round = _phase_of(batch[0]) if batch else ("", 0)
        pending = set(self.push_messages(batch))
        expected = len(pending)
        del batch
        self._emit(phase, server_round, 0, expected)
        deadline = None if timeout is None else self._clock() + timeout
        replies: list[Message] = []
        delays = self._schedule.delays()
        while pending and (deadline is None or self._clock() < deadline):
            received = list(self.pull_messages(pending))
            if received:
                replies.extend(received)
                pending.difference_update(m.metadata.reply_to_message_id for m in received)
                self._emit(phase, server_round, len(replies), expected)
                delays = self._schedule.delays()  # a reply came: look again soon
            if not pending:
                break
            delay = next(delays)
            if deadline is not None:
                delay = min(delay, max(deadline - self._clock(), 0.0))
            self._sleep(delay)
        return replies

    @staticmethod
    def _packed(msg: Message, done: dict[int, RecordDict]) -> Message:
        if not msg.has_content():
            return msg
        content = msg.content
        key = id(content)
        if key not in done:
            done[key] = pack_content(content, mark=True)
        return Message(content=done[key], metadata=copy.copy(msg.metadata))


class TimedGrid(DelegatingGrid):
    """Appends one JSON line per ``send_and_receive`` to ``path``: ``{"type": "server",
    "phase", "round", "start", "end"}`` (phase names of :mod:`server.progress`; nothing that
    a node sent). A write that fails is ignored."""

    def __init__(self, inner: Grid, path: str) -> None:
        super().__init__(inner)
        self._path = path

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Delegate, and record when the phase started and when its replies were in."""
        batch = list(messages)
        phase, server_round = _phase_of(batch[0]) if batch else ("", 0)
        start = time.time()
        replies = list(self._inner.send_and_receive(batch, timeout=timeout))
        line = json.dumps({"type": "server", "phase": phase, "round": server_round,
                           "start": start, "end": time.time()})
        try:
            with open(self._path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        except OSError:
            pass
        return replies


#: The poll schedule against a simulation's in-memory link state, where a pull is a lookup in
#: this process rather than a request to a SuperLink: 5 ms doubling to 50 ms.
IN_MEMORY_POLLS = PollSchedule(first=0.005, factor=2.0, longest=0.05)


def _in_memory(grid: Grid) -> bool:
    """Whether ``grid`` is Flower's simulation grid (``InMemoryGrid``)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def _crosses_processes(grid: Grid) -> bool:
    """Whether ``grid`` is one of Flower's own grids (``HttpGrid`` in deployment,
    ``InMemoryGrid`` in simulation), whose messages reach the nodes' ClientApps through
    their mods. In-process stand-ins that call handlers directly are not."""
    return type(grid).__module__.startswith("flwr.")


def with_transport(grid: Grid, on_progress: ProgressCallback | None) -> Grid:
    """``grid`` wrapped by :class:`TransportGrid` (reporting to ``on_progress``).

    With ``VESALIUS_TRANSPORT=stock``, or for a grid that is not one of Flower's (see
    :func:`_crosses_processes`), the grid of before: :func:`server.progress.track_progress`.
    With ``VESALIUS_TIMINGS_FILE`` set (benchmarks), a :class:`TimedGrid` wraps either.
    """
    if isinstance(grid, (TransportGrid, TimedGrid)):
        return grid
    if not transport_enabled() or not _crosses_processes(grid):
        wrapped = track_progress(grid, on_progress)
    else:
        wrapped = TransportGrid(grid, on_progress,
                                schedule=IN_MEMORY_POLLS if _in_memory(grid) else None)
    timings = os.environ.get(ENV_TIMINGS)
    return TimedGrid(wrapped, timings) if timings else wrapped
