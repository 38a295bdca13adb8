"""Supervise the processes of one node: the SuperNode and, with the warm worker, the worker.

``vesalius node start`` runs Flower's SuperNode as its main child and, in the default
``--worker warm`` mode, the warm worker (:mod:`client.warm_worker`) beside it. This module runs
such a set of children (:func:`supervise_children`):

- each child starts in its own process group (with its helpers: Flower's SuperExec and
  ``flwr-clientapp`` processes, or the worker's forked tasks); SIGINT/SIGTERM to this process
  are forwarded once to every group, and groups still alive at the end are stopped;
- every output line of a child goes through that child's translator (:class:`LineTranslator`,
  e.g. :class:`cli.supernode.FlowerOutput`) before it is shown;
- when the main child ends, everything stops and its status is returned; a helper marked
  ``restart`` that ends unasked is started again after a back-off (1 s, doubling to 30 s;
  reset after a minute of uptime), with one visible line each time, while the main child
  keeps serving.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Protocol

from common.logsafe import redact

Say = Callable[[str], None]
Popen = Callable[..., "subprocess.Popen[str]"]

FIRST_RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0
#: A helper that ran this long before ending is restarted after the first delay again.
STABLE_UPTIME_S = 60.0

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class TracebackFolder:
    """Folds a child's Python traceback into its exception's kind: never its text or frames."""

    def __init__(self) -> None:
        self.inside = False

    def fold(self, text: str) -> tuple[bool, str | None]:
        """``(consumed, kind)``: a consumed line is not shown; ``kind`` (e.g. ``ValueError``)
        comes with the traceback's last line, which is consumed too."""
        if self.inside:
            if text.startswith((" ", "\t")) or not text:
                return True, None
            self.inside = False
            name = text.split(":", 1)[0].strip()
            return True, name if re.fullmatch(r"[\w.]+", name) else "error"
        if text.startswith("Traceback (most recent call last)"):
            self.inside = True
            return True, None
        return False, None
#: Worker lines not shown: its retries towards its own SuperNode, Flower's per-task DEBUG
#: lines and FAB installation notes, and Flower's empty INFO lines.
_WORKER_QUIET = re.compile(r"Connection attempt failed|Connection successful|^DEBUG\b|"
                           r"^Successfully installed|^INFO\s*:\s*$")


class LineTranslator(Protocol):
    """Turns one raw output line of a child into the text to show (``None``: nothing)."""

    def line(self, raw: str) -> str | None:
        """The text to show for ``raw``."""


class WorkerOutput:
    """Translate the warm worker's output: tracebacks reduced to one line, the rest redacted.

    The worker talks only to its own SuperNode; its connection retries (while that SuperNode
    starts or restarts) are not the coordinator's problem and are not shown.
    """

    def __init__(self) -> None:
        self._traceback = TracebackFolder()

    def line(self, raw: str) -> str | None:
        """The text to show for one output line of the worker (``None``: nothing)."""
        text = ANSI.sub("", raw).rstrip()
        folded, kind = self._traceback.fold(text)
        if folded:
            return (f"warm worker: internal error ({kind}); its traceback is not shown"
                    if kind else None)
        if not text or _WORKER_QUIET.search(text):
            return None
        return f"warm worker: {redact(text)}"


@dataclass
class Child:
    """One supervised process.

    Attributes
    ----------
    name : str
        Shown in lines about it (``"the warm worker"``).
    cmd : list[str]
        Its command line.
    output : LineTranslator
        Translates its output lines.
    restart : bool
        Start it again when it ends without being asked (helpers only).
    """

    name: str
    cmd: list[str]
    output: LineTranslator
    restart: bool = False
    proc: subprocess.Popen[str] | None = field(default=None, repr=False)
    started_at: float = 0.0
    restarts: int = 0
    delay_s: float = FIRST_RESTART_DELAY_S
    restart_at: float | None = None
    #: Asked to stop for a fresh start (after a reconnection): started again at once, quietly;
    #: killed if it has not ended by ``kill_at``.
    renewing: bool = False
    kill_at: float | None = None


def stop_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to a process group, ignoring one that is gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Pumps:
    """Read every child's output into one queue of ``(child, line | None)``."""

    def __init__(self) -> None:
        self.lines: queue.Queue[tuple[Child, str | None]] = queue.Queue()

    def follow(self, child: Child, stream: IO[str] | None) -> None:
        def pump() -> None:
            if stream is not None:
                for raw in stream:
                    self.lines.put((child, raw))
            self.lines.put((child, None))

        threading.Thread(target=pump, daemon=True, name=f"pump-{child.name}").start()


def _start(child: Child, env: dict[str, str], pumps: _Pumps, popen: Popen) -> None:
    child.proc = popen(child.cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, encoding="utf-8", errors="replace", bufsize=1,
                       start_new_session=True)
    child.started_at = time.monotonic()
    child.restart_at = None
    pumps.follow(child, child.proc.stdout)


def _stop(children: Sequence[Child], grace_s: float) -> None:
    """SIGTERM every live group, wait ``grace_s``, SIGKILL what is left, reap."""
    live = [c.proc for c in children if c.proc is not None]
    for proc in live:
        if proc.poll() is None:
            stop_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in live:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_group(proc.pid, signal.SIGKILL)
            proc.wait()
    for proc in live:
        stop_group(proc.pid, signal.SIGTERM)  # helpers that outlived their group leader


def _schedule_restart(child: Child, code: int, now: float, say: Say) -> None:
    if now - child.started_at >= STABLE_UPTIME_S:
        child.delay_s = FIRST_RESTART_DELAY_S
    child.restarts += 1
    child.restart_at = now + child.delay_s
    say(f"{child.name} stopped (exit status {code}); restarting it in {child.delay_s:g} s "
        f"(restart {child.restarts}); the node keeps its connection to the coordinator")
    child.delay_s = min(child.delay_s * 2, MAX_RESTART_DELAY_S)


#: How the SuperNode's translated output says the link is back (cli/supernode.FlowerOutput).
RECONNECTED = "reconnected to the coordinator"


def _renew(helpers: Sequence[Child], now: float, grace_s: float, say: Say) -> None:
    """Start restartable helpers afresh after the coordinator link came back.

    A warm worker may still be serving a task of the connection that was lost (e.g. a run the
    restarted coordinator no longer runs); Flower's task runner retries such a task's requests
    without end and the worker would serve nothing else. What a task had not yet sent is void
    after the outage anyway; what it had recorded (the ledger) is on disk.
    """
    for helper in helpers:
        if helper.restart and helper.proc is not None and helper.proc.poll() is None:
            say(f"starting {helper.name} afresh after the reconnection (a task of the lost "
                "connection may still hold it)")
            helper.renewing, helper.kill_at = True, now + max(grace_s, 1.0) * 2
            stop_group(helper.proc.pid, signal.SIGTERM)


def supervise_children(
    main: Child,
    helpers: Sequence[Child],
    env: dict[str, str],
    *,
    say: Say,
    grace_s: float = 5.0,
    popen: Popen = subprocess.Popen,
) -> tuple[int, bool]:
    """Run ``main`` and ``helpers`` until ``main`` ends or this process is asked to stop.

    Parameters
    ----------
    main : Child
        The process whose end ends the node (the SuperNode).
    helpers : Sequence[Child]
        Processes beside it (the warm worker), restarted when marked so.
    env : dict[str, str]
        Environment of every child.
    say : Callable[[str], None]
        Shows one line.
    grace_s : float
        Seconds between SIGTERM and SIGKILL when stopping.
    popen : Callable
        ``subprocess.Popen`` (tests pass a fake-friendly one).

    Returns
    -------
    tuple[int, bool]
        The main child's exit status, and whether this process was asked to stop.
    """
    children = [main, *helpers]
    pumps = _Pumps()
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                # Helpers always get SIGTERM: Flower raises SIGINT inside a warm worker for
                # its own reasons (a refused task heartbeat), which abort a task only.
                stop_group(child.proc.pid, signum if child is main else signal.SIGTERM)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for child in children:
            _start(child, env, pumps, popen)
        main_done_at: float | None = None
        main_eof = False
        while True:
            now = time.monotonic()
            assert main.proc is not None
            if main_done_at is None and main.proc.poll() is not None:
                main_done_at = now  # its last lines may still be in the pipe
            if main_eof or (main_done_at is not None and now - main_done_at > 1.0):
                break
            for helper in helpers:
                assert helper.proc is not None
                if stopping or main_done_at is not None:
                    continue
                if helper.renewing and helper.proc.poll() is None:
                    if helper.kill_at is not None and now >= helper.kill_at:
                        stop_group(helper.proc.pid, signal.SIGKILL)
                        helper.kill_at = None
                    continue
                if helper.renewing:  # ended as asked: a fresh one at once
                    helper.renewing, helper.kill_at = False, None
                    _start(helper, env, pumps, popen)
                    continue
                if helper.restart_at is None and helper.proc.poll() is not None:
                    if helper.restart:
                        _schedule_restart(helper, helper.proc.returncode, now, say)
                    else:
                        helper.restart_at = float("inf")  # ended; not restarted
                elif helper.restart_at is not None and now >= helper.restart_at:
                    _start(helper, env, pumps, popen)
            try:
                child, raw = pumps.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if raw is None:
                main_eof = main_eof or child is main
                continue
            shown = child.output.line(raw)
            if shown is not None:
                say(shown)
            if child is main and shown is not None and shown.startswith(RECONNECTED):
                _renew(helpers, time.monotonic(), grace_s, say)
        code = main.proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(children, grace_s)
    return code, stopping
