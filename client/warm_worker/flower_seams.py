"""Every Flower 1.42 internal the warm worker relies on, in one place.

Flower has no public hook for "run ClientApp tasks in a process I keep warm", so the warm worker
uses four internals; each is named here and pinned by ``tests/cli/test_warm_worker_seams.py``
(which fails loudly when ``flwr`` is not 1.42.0 or a signature changed):

- :func:`run_superexec` (``flwr.supercore.superexec.run_superexec``), the loop behind the
  ``flower-superexec`` entry point, which looks up its executor through the module-level name
  ``get_executor`` (:func:`inject_executor` replaces it for this process only);
- :func:`run_clientapp` (``flwr.supernode.runtime.run_clientapp``), the function behind the
  ``flwr-clientapp`` entry point;
- Flower's registry of exit handlers (``flwr.supercore.exit.exit_handler``), which a forked
  child inherits from the worker and must forget (:func:`forget_inherited_exit_handlers`),
  and the name ``flwr_exit`` in ``run_clientapp``'s module, which ends every task with
  ``sys.exit`` plus a thread that calls ``os._exit`` 5 s later: :func:`task_scope` lets a task
  finish in the worker's own process without ending it;
- the module ``flwr.supernode.start_client_internal``, whose main loop sleeps 3 s after an
  empty pull and 0.5 s between checks for a reply, through its module-level ``time``
  (:func:`cap_supernode_sleeps`);
- the SuperNode main loop's ``_push_messages``, which waits without end for the reply to the
  message it pulled last: when the task serving it ended without a reply (the worker was
  restarted after the coordinator went away, or crashed), the node never pulls again and a
  resumed run stalls; :func:`answer_abandoned_messages` answers such a message with Flower's
  own "ClientApp crashed" error instead, and the loop goes on;
- the name ``pull_objects`` in ``flwr.supercore.inflatable.inflatable_utils``, through which a
  task pulls its message's objects from the SuperNode, retrying after 1 s, 2 s, 4 s ... while
  the SuperNode is still fetching them from the SuperLink: a warm worker starts its task at
  once, so nearly every message paid that first second; :func:`poll_local_objects_quickly`
  retries every few tens of milliseconds instead (the SuperNode is on loopback);
- the name ``install_from_fab`` in ``run_clientapp``'s module, which unpacks the run's FAB,
  checks every file's hash and reinstalls it for **every** task (1.4-2.4 s per message on a
  loaded 2-core machine): :func:`install_each_fab_once` makes it install a FAB once per worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import flwr

#: The Flower release these seams were read from; anything else is refused.
PINNED_FLWR = "1.42.0"
#: Environment variable Flower's SuperExec loop reads for its task poll interval (seconds).
TASK_POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


class FlowerVersionError(RuntimeError):
    """The installed Flower is not the release the warm worker was built against."""


def require_pinned_flower() -> None:
    """Refuse to touch Flower's internals on any release but :data:`PINNED_FLWR`.

    Raises
    ------
    FlowerVersionError
        Another Flower release is installed.
    """
    if flwr.__version__ != PINNED_FLWR:
        raise FlowerVersionError(
            f"the warm worker supports flwr {PINNED_FLWR} only (found {flwr.__version__}); "
            "reinstall Vesalius's pinned dependencies or start the node with --worker per-message")


def run_superexec(**kwargs: Any) -> None:
    """Flower's SuperExec loop (keyword arguments as ``run_superexec`` in flwr 1.42)."""
    from flwr.supercore.superexec import run_superexec as module

    module.run_superexec(**kwargs)


@contextmanager
def inject_executor(executor: object) -> Iterator[None]:
    """Make Flower's SuperExec loop in this process use ``executor`` for every task."""
    from flwr.supercore.superexec import run_superexec as module

    original = module.get_executor

    def get_executor(*_args: object, **_kwargs: object) -> object:
        return executor

    module.get_executor = get_executor  # type: ignore[assignment]
    try:
        yield
    finally:
        module.get_executor = original


def run_clientapp(**kwargs: Any) -> None:
    """Flower's ClientApp task runner (``flwr-clientapp``'s function); ends with ``SystemExit``."""
    from flwr.supernode.runtime.run_clientapp import run_clientapp as run

    run(**kwargs)


def resolve_root_certificates(path: str | None, insecure: bool) -> bytes | None:
    """The CA bytes for the Runtime API, read the way ``flwr-clientapp`` reads them."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    return validate_and_resolve_root_certificates(path, insecure)


def forget_inherited_exit_handlers() -> None:
    """Drop the exit handlers a forked child inherited from the worker.

    Flower's ``flwr_exit`` runs every registered handler; in a child those would be the
    worker's (close its Runtime API client, stop its executor, hence its sibling tasks).
    """
    from flwr.supercore.exit import exit_handler

    with exit_handler._lock_handlers:  # noqa: SLF001 - pinned internal, see module docstring
        exit_handler.registered_exit_handlers.clear()


class TaskFinished(Exception):
    """A task run by :func:`run_clientapp` inside :func:`task_scope` has ended.

    Attributes
    ----------
    code : int
        Flower's exit code for the task (0-99: success).
    """

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@contextmanager
def task_scope() -> Iterator[None]:
    """Run one ``run_clientapp`` call in this process without letting it end the process.

    Inside the scope, ``flwr_exit`` as seen by ``run_clientapp`` runs the task's own exit
    handlers (push the task status and context, stop its heartbeat, close its client) and
    raises :class:`TaskFinished` instead of exiting. ``run_clientapp``'s
    ``register_signal_handlers`` registers the task's exit handlers but makes SIGINT abort the
    task only: Flower raises SIGINT in its own process when a task's heartbeat or token is
    refused, which in a ``flwr-clientapp`` process ends that task's process, and here must not
    end the worker. SIGTERM keeps the worker's handler: the task reports its end through the
    task's exit handlers, then the worker stops. The worker's exit and signal handlers are set
    aside for the task and restored after it; task handlers left over (a task aborted before
    Flower's own exit) run then.
    """
    import signal

    from flwr.supercore.exit import ExitCode, exit_handler
    from flwr.supernode.runtime import run_clientapp as module

    with exit_handler._lock_handlers:  # noqa: SLF001 - pinned internal
        saved = list(exit_handler.registered_exit_handlers)
        exit_handler.registered_exit_handlers.clear()
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)}
    real_exit = module.flwr_exit

    def finish_task(code: int, *_args: object, **_kwargs: object) -> None:
        exit_handler.trigger_exit_handlers(run_before_force_exit=True)
        exit_handler.trigger_exit_handlers(run_before_force_exit=False)
        raise TaskFinished(int(code))

    real_register = module.register_signal_handlers

    def abort_task(_signum: int, _frame: object) -> None:
        raise TaskFinished(int(ExitCode.GRACEFUL_EXIT_SIGINT))

    def task_signal_handlers(*_args: object, exit_handlers: list[Callable[[], None]] | None = None,
                             **_kwargs: object) -> None:
        for handler in exit_handlers or []:
            exit_handler.add_exit_handler(handler)
        signal.signal(signal.SIGINT, abort_task)

    module.flwr_exit = finish_task  # type: ignore[assignment]
    module.register_signal_handlers = task_signal_handlers  # type: ignore[assignment]
    try:
        yield
    finally:
        module.flwr_exit = real_exit
        module.register_signal_handlers = real_register
        exit_handler.trigger_exit_handlers(run_before_force_exit=True)
        exit_handler.trigger_exit_handlers(run_before_force_exit=False)
        for sig, handler in signals.items():
            if handler is not None:
                signal.signal(sig, handler)
        with exit_handler._lock_handlers:  # noqa: SLF001
            exit_handler.registered_exit_handlers[:] = saved


class CappedTime:
    """Stand-in for the ``time`` module whose :meth:`sleep` never waits longer than a cap.

    Parameters
    ----------
    cap_s : float
        Longest single sleep, in seconds (> 0).
    clock : ModuleType
        The module delegated to (the real ``time``).
    """

    def __init__(self, cap_s: float, clock: ModuleType = time) -> None:
        if not cap_s > 0:
            raise ValueError("the sleep cap must be a positive number of seconds")
        self.cap_s = cap_s
        self._clock = clock
        self.sleep_fn: Callable[[float], None] = clock.sleep

    def sleep(self, seconds: float) -> None:
        """Sleep ``min(seconds, cap_s)``."""
        self.sleep_fn(min(float(seconds), self.cap_s))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clock, name)


def cap_supernode_sleeps(cap_s: float) -> CappedTime:
    """Cap the SuperNode main loop's idle sleeps (3 s and 0.5 s in flwr 1.42) at ``cap_s``.

    Only ``flwr.supernode.start_client_internal`` sees the capped clock; everything else in
    the process (retry back-offs included) keeps the real one.
    """
    from flwr.supernode import start_client_internal as module

    capped = CappedTime(cap_s, time)
    module.time = capped  # type: ignore[assignment]
    return capped


class FabInstallCache:
    """``install_from_fab`` that installs a given FAB once per process.

    Flower's ClientApp runner calls ``install_from_fab(fab.content, skip_prompt=True)`` before
    every task. A warm worker serves the same run's FAB many times; the second and later calls
    for the same bytes (same SHA-256) return the folder the first one installed, while it still
    exists. Any other call goes to Flower's own function.

    Parameters
    ----------
    install : callable
        Flower's ``install_from_fab``.
    """

    def __init__(self, install: Callable[..., Any]) -> None:
        self.install = install
        self.installed: dict[str, Any] = {}
        self.hits = 0

    def __call__(self, fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(fab_file, bytes):
            return self.install(fab_file, *args, **kwargs)
        import hashlib
        from pathlib import Path

        key = hashlib.sha256(fab_file).hexdigest()
        path = self.installed.get(key)
        if path is not None and Path(path).is_dir():
            self.hits += 1
            return path
        path = self.install(fab_file, *args, **kwargs)
        self.installed[key] = path
        return path


def install_each_fab_once() -> FabInstallCache:
    """Make Flower's ClientApp runner in this process install each FAB once (see
    :class:`FabInstallCache`); returns the cache."""
    from flwr.supernode.runtime import run_clientapp as module

    current = module.install_from_fab
    if isinstance(current, FabInstallCache):
        return current
    cache = FabInstallCache(current)
    module.install_from_fab = cache  # type: ignore[assignment]
    return cache


ABANDONED_GRACE_S = 3.0
"""Seconds a pulled message may go unanswered with no task left to answer it."""


def _unreplied_requests(state: Any) -> list[Any]:
    """The SuperNode's pulled messages that have no reply in its state (InMemoryNodeState)."""
    with state.lock_msg_store:
        entries = list(state.msg_store.values())
    replied = {e.message.metadata.reply_to_message_id for e in entries
               if e.message.metadata.reply_to_message_id}
    return [e.message for e in entries if not e.message.metadata.reply_to_message_id
            and e.message.metadata.message_id not in replied]


def _reply_waiting(state: Any) -> bool:
    """A reply is stored and not yet taken (without taking it, unlike ``get_messages_legacy``)."""
    with state.lock_msg_store:
        return any(e.message.metadata.reply_to_message_id and not e.is_retrieved
                   for e in state.msg_store.values())


def _task_alive(state: Any) -> bool:
    """A task is pending, starting or running (the call also expires tasks whose heartbeat
    stopped, Flower's own clean-up)."""
    from flwr.common.constant import Status

    return bool(state.get_tasks(statuses=[Status.PENDING, Status.STARTING, Status.RUNNING]))


def answer_abandoned(state: Any, object_store: Any, insert: Callable[..., None]) -> int:
    """Store Flower's "ClientApp crashed" error as the reply of every unanswered message.

    Returns
    -------
    int
        How many messages were answered.
    """
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    answered = 0
    for request in _unreplied_requests(state):
        reply = Message(Error(ErrorCode.CLIENT_APP_CRASHED,
                              "the node's worker stopped before replying"), reply_to=request)
        try:
            state.record_message_processing_end(request.metadata.message_id)
        except Exception:  # noqa: BLE001 - only the runtime figure of the reply; not needed
            pass
        insert(reply, state, object_store)
        answered += 1
    return answered


def answer_abandoned_messages(grace_s: float = ABANDONED_GRACE_S) -> Callable[..., None]:
    """Make the SuperNode's main loop stop waiting for a reply no task will give.

    Wraps ``_push_messages`` of ``flwr.supernode.start_client_internal``: while no reply is
    stored, it watches the node's tasks; once none has been alive for ``grace_s`` seconds, every
    pulled message without a reply gets Flower's ``CLIENT_APP_CRASHED`` error as its reply
    (what Flower itself stores when a task's heartbeat stops after it took its message), which
    Flower's loop then sends (or drops, for a run that is no longer running) before it pulls
    again. Returns the wrapper; calling this twice installs it once.
    """
    import logging

    from flwr.supernode import start_client_internal as module

    original = module._push_messages  # noqa: SLF001 - pinned internal, see module docstring
    if getattr(original, "vesalius_wrapped", False):
        return original  # type: ignore[no-any-return]
    log = logging.getLogger(__name__)

    def push_messages(state: Any, object_store: Any, send: Any, push_object: Any) -> None:
        idle_since: float | None = None
        while not _reply_waiting(state):
            if _task_alive(state):
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= grace_s:
                answered = answer_abandoned(state, object_store, module._insert_message)
                if answered:
                    log.warning("%d message(s) had no task left to answer them (the worker "
                                "stopped); answered with an error so that the node goes on",
                                answered)
                idle_since = None
            module.time.sleep(0.5)  # the loop's own wait (capped with cap_supernode_sleeps)
        original(state, object_store, send, push_object)

    push_messages.vesalius_wrapped = True  # type: ignore[attr-defined]
    module._push_messages = push_messages  # type: ignore[assignment]  # noqa: SLF001
    return push_messages


def poll_local_objects_quickly(initial_s: float | None = None,
                               cap_s: float | None = None) -> Callable[..., Any]:
    """A task's pulls of its message's objects from the loopback SuperNode retry after
    ``initial_s`` doubling to ``cap_s`` (default
    :data:`common.flower_pulls.LOOPBACK_BACKOFF_S`; :func:`common.flower_pulls.
    poll_objects_quickly`)."""
    from common.flower_pulls import LOOPBACK_BACKOFF_S, poll_objects_quickly

    return poll_objects_quickly("flwr.supercore.inflatable.inflatable_utils",
                                LOOPBACK_BACKOFF_S[0] if initial_s is None else initial_s,
                                LOOPBACK_BACKOFF_S[1] if cap_s is None else cap_s)
