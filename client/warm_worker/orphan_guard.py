"""Stop a node's child process when the ``vesalius node start`` that started it dies.

``vesalius node start`` supervises its children (the SuperNode, the warm worker) and stops them
when it stops; killed with SIGKILL it cannot, and the children, in sessions of their own, would
keep serving (a worker holding torch and the node's data in memory, a SuperNode pulling work).
Flower's own ``--parent-pid`` monitor is not enough for the warm worker: it raises SIGINT once,
which a task in progress takes as "abort this task" (:func:`client.warm_worker.flower_seams.
task_scope`), and then stops watching. Linux has ``PR_SET_PDEATHSIG``, but it binds to the
thread that forked, and a ``preexec_fn`` is unsafe in a process with threads; so each child
watches for itself: when it is re-parented (its parent process is gone), it sends itself
SIGTERM (Flower's and the worker's orderly stop), and ends with ``os._exit`` if that has not
finished within a grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

__all__ = ["exit_with_parent"]


def exit_with_parent(*, interval_s: float = 0.5, grace_s: float = 10.0,
                     parent: int | None = None,
                     getppid: Callable[[], int] = os.getppid,
                     kill: Callable[[int, int], None] = os.kill,
                     hard_exit: Callable[[int], None] = os._exit) -> threading.Thread:
    """Watch, in a daemon thread, for this process's parent to change; then stop.

    Parameters
    ----------
    interval_s : float
        Seconds between two looks at the parent.
    grace_s : float
        Seconds the orderly stop (SIGTERM) gets before ``hard_exit(1)``.
    parent : int, optional
        The parent to watch (default: the parent now).
    getppid, kill, hard_exit
        Seams for tests.

    Returns
    -------
    threading.Thread
        The started watcher.
    """
    watched = getppid() if parent is None else parent

    def watch() -> None:
        while getppid() == watched:
            time.sleep(interval_s)
        log.warning("the `vesalius node start` that started this process is gone: stopping")
        kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        hard_exit(1)

    thread = threading.Thread(target=watch, daemon=True, name="orphan-guard")
    thread.start()
    return thread
