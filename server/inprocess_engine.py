"""Flower's simulation runtime with every simulated hospital in this one process.

Flower 1.42's simulation runtime has one backend, Ray: each actor is a process that imports
torch and the ClientApp, and Ray itself starts a GCS, a raylet and agents first. On a small
machine that start-up is most of a short run (about 50 s of the demo's first round), and
every message crosses a process boundary. Flower has no in-process backend, so this module
writes one against Flower's own abstract :class:`Backend`: the ClientApp runs in the
driver's process, which has already imported torch and the apps for the ServerApp, one
message at a time (one worker; simulated hospitals take turns, as on one Ray actor).

Semantics kept from Ray's backend:

* the ClientApp gets its own copy of the message and context (Ray serialises both to its
  actor and back; here a pickle round trip), so it can never change the link state's copy;
* an exception in the ClientApp becomes Flower's ``ClientAppException`` and so an error
  reply for that hospital, and the run goes on.

What it does not give: hospitals in parallel on several cores, and process isolation (a
hospital that crashes the interpreter ends the run). ``--engine ray`` keeps both.

The backend is installed where Flower's engine builds its Ray backend
(``flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend``, looked up when the
engine starts), and the loop that hands it messages is replaced by one that looks more often
(``vce_api.add_messages_to_queue``, looked up when the engine starts its thread): seams on
Flower's internals, pinned by ``tests/server/test_inprocess_engine.py``.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from queue import Queue
from typing import Any

from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
from flwr.common import Context, Message
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

_install_lock = threading.RLock()  # held for a run; fast_pickup inside in_process_backend
#: Set while this thread handles a hospital's message (see :class:`HospitalLogFilter`).
_hospital = threading.local()


class HospitalLogFilter(logging.Filter):
    """Drops the records a simulated hospital logs while it handles a message.

    On Ray's engine a hospital's log stays in its worker process unless ``--verbose``; here it
    would reach the command's screen, one line per hospital and message (refusals the report
    already names, for instance). The report is where a simulated hospital's outcome is read.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_hospital, "active", False)


class InProcessBackend(Backend):
    """Run the ClientApp in this process, one message at a time."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self._app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self._app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        self._app_fn = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self._app_fn is None:
            raise ValueError("the in-process backend was not built before its first message")
        _hospital.active = True
        try:
            return self._run(message, context)
        finally:
            _hospital.active = False

    def _run(self, message: Message, context: Context) -> tuple[Message, Context]:
        # The ClientApp's own copies, as Ray's serialisation to an actor gives it.
        message, context = pickle.loads(pickle.dumps((message, context),
                                                     protocol=pickle.HIGHEST_PROTOCOL))
        try:
            app = self._app_fn()
            reply = app(message=message, context=context)
        except LoadClientAppError:
            raise
        except Exception as ex:  # noqa: BLE001 - an error reply, as from a Ray actor
            raise ClientAppException(str(ex)) from ex
        return reply, context


def pickup_interval(num_nodes: int) -> float:
    """Seconds between two looks for new messages: 10 ms for a few hospitals, up to Flower's
    own 100 ms at 100 hospitals and more."""
    return max(0.01, min(0.1, 0.001 * num_nodes))


def undelivered_messages(state: Any, node_ids: Collection[int]) -> list[Message] | None:
    """Every message for ``node_ids`` not yet delivered, marked delivered, in one pass over
    Flower's in-memory link state; ``None`` for a link state without that store.

    Flower's loop asks ``get_message_ins`` once per hospital, and each call scans every
    stored message: at 300 hospitals that was half of the simulation's CPU (py-spy). This is
    the same work (expiry checks by Flower's own ``_check_stored_messages``, the same
    ``delivered_at`` stamp) done once per look.
    """
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    check = getattr(state, "_check_stored_messages", None)
    if not isinstance(store, dict) or lock is None or check is None:
        return None
    from flwr.supercore.date import now

    with lock:
        check(set(store))  # drops expired messages (and answers them with Flower's error)
        picked = [msg for msg in store.values() if msg.metadata.dst_node_id in node_ids
                  and msg.metadata.delivered_at == ""]
        stamp = now().isoformat()
        for msg in picked:
            msg.metadata.delivered_at = stamp
    return picked


def add_messages_to_queue(state: Any, queue: Queue[Message], nodes_mapping: Mapping[int, int],
                          f_stop: threading.Event) -> None:
    """Flower's ``vce_api.add_messages_to_queue`` (same arguments, same work): looks every
    :func:`pickup_interval` instead of every 100 ms, and in one pass over the link state
    (:func:`undelivered_messages`) instead of one per hospital.

    Flower's engine hands messages to its backend through this loop. With one in-process
    worker and a secure-aggregation round of eight node round trips, its fixed 100 ms cost a
    demo round about 0.4 s of waiting with nothing to do.
    """
    interval = pickup_interval(len(nodes_mapping))
    node_ids = frozenset(nodes_mapping)
    while not f_stop.is_set():
        picked = undelivered_messages(state, node_ids)
        if picked is None:  # another link state: Flower's own way, one hospital at a time
            picked = [msg for node_id in nodes_mapping
                      for msg in state.get_message_ins(node_id=node_id, limit=1)]
        for msg in picked:
            queue.put(msg)
        f_stop.wait(interval)


@contextmanager
def fast_pickup() -> Iterator[None]:
    """While open, Flower's simulation engine (either backend) hands messages over with
    :func:`add_messages_to_queue`."""
    from flwr.server.superlink.fleet.vce import vce_api

    with _install_lock:
        original = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = add_messages_to_queue
        try:
            yield
        finally:
            vce_api.add_messages_to_queue = original


@contextmanager
def in_process_backend(*, quiet: bool = True) -> Iterator[None]:
    """While open, Flower's simulation engine builds :class:`InProcessBackend` for Ray's and
    picks messages up with :func:`add_messages_to_queue`; with ``quiet``, the hospitals' own
    log records are dropped (:class:`HospitalLogFilter`), as Ray's engine keeps them."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    handlers = [*logging.getLogger().handlers, logging.lastResort] if quiet else []
    log_filter = HospitalLogFilter()
    with fast_pickup(), _install_lock:
        original = raybackend.RayBackend
        raybackend.RayBackend = InProcessBackend  # type: ignore[misc,assignment]
        for handler in handlers:
            if handler is not None:
                handler.addFilter(log_filter)
        try:
            yield
        finally:
            raybackend.RayBackend = original  # type: ignore[misc]
            for handler in handlers:
                if handler is not None:
                    handler.removeFilter(log_filter)
