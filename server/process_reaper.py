"""End every process a simulation started, even when its driver is killed.

Ray's head processes (GCS, raylet) share the driver's fate, but the agents the raylet starts
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) are re-parented to ``init`` and keep
running when the driver is killed (measured with Ray 2.55: ``kill -9`` of ``vesalius
federation run`` left both). A :class:`Reaper` is a tiny watcher process (no torch, no Ray
imports) that learns, about once a second, which processes descend from the driver and were
not there when it started; when the driver closes the pipe between them (it ended, was
killed, or said it is done), the watcher sends ``SIGTERM`` to every such process still alive
(the same pid *and* start time: a recycled pid is never hit), then ``SIGKILL`` after a grace
period.

Linux only (it reads ``/proc``); elsewhere :class:`Reaper` does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

__all__ = ["Reaper", "descendants", "process_start", "tree_processes"]

#: How often the watcher looks for the driver's new descendants (seconds): often while Ray
#: starts its processes (the first :data:`STARTUP_S`), then rarely (a scan of ``/proc`` costs
#: a few ms of CPU).
POLL_S: Final = 0.5
STARTUP_S: Final = 60.0
LATER_POLL_S: Final = 2.0
#: Seconds between SIGTERM and SIGKILL of the survivors.
GRACE_S: Final = 3.0
_PROC: Final = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (field 3 onwards)."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def process_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None when it is gone (or a
    zombie: it has ended and only waits for its parent to collect it)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and fields[0] != "Z" else None


def _parents() -> dict[int, int]:
    table: dict[int, int] = {}
    for entry in _PROC.iterdir() if _PROC.is_dir() else ():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] != "Z":
                table[int(entry.name)] = int(fields[1])
    return table


def _children_files(pid: int) -> list[int] | None:
    """Children of ``pid`` from ``/proc/<pid>/task/*/children`` (None where unsupported)."""
    try:
        tasks = list((_PROC / str(pid) / "task").iterdir())
    except OSError:
        return []
    kids: list[int] = []
    for task in tasks:
        try:
            kids.extend(int(p) for p in (task / "children").read_text().split())
        except FileNotFoundError:
            return None  # a kernel without CONFIG_PROC_CHILDREN
        except (OSError, ValueError):
            continue
    return kids


def _walk_children(root: int) -> set[int] | None:
    found: set[int] = set()
    todo = [root]
    while todo:
        kids = _children_files(todo.pop())
        if kids is None:
            return None
        for pid in kids:
            if pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


def descendants(root: int, parents: dict[int, int] | None = None) -> set[int]:
    """Pids of every living process below ``root`` (children, their children, ...).

    Walks ``/proc/<pid>/task/*/children`` (a few files) where the kernel has them, else
    reads every process's parent from ``/proc``; ``parents`` (pid -> parent) replaces both.
    """
    if parents is None:
        walked = _walk_children(root)
        if walked is not None:
            return {pid for pid in walked if process_start(pid) is not None}
    table = _parents() if parents is None else parents
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def tree_processes(root: int) -> set[int]:
    """``root`` and its descendants (the whole process tree), living ones only."""
    return {root, *descendants(root)} if process_start(root) is not None else set()


def _signal_all(tracked: dict[int, int], sig: int) -> list[int]:
    """Send ``sig`` to each tracked process still alive with its recorded start time."""
    alive = []
    for pid, start in tracked.items():
        if process_start(pid) == start:
            alive.append(pid)
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    return alive


def reap(tracked: dict[int, int], grace_s: float = GRACE_S) -> None:
    """SIGTERM every tracked survivor, then SIGKILL those still there after ``grace_s``."""
    if not _signal_all(tracked, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not any(process_start(p) == s for p, s in tracked.items()):
            return
        time.sleep(0.1)
    _signal_all(tracked, signal.SIGKILL)


def watch(driver: int, ignore: Iterable[int], pipe_fd: int) -> None:
    """The watcher's loop: track the driver's new descendants until the pipe closes."""
    import select

    skip = set(ignore) | {os.getpid()}
    tracked: dict[int, int] = {}
    started = time.monotonic()
    while True:
        for pid in descendants(driver) - skip:
            start = process_start(pid)
            if start is not None and pid not in tracked:
                tracked[pid] = start
        wait = POLL_S if time.monotonic() - started < STARTUP_S else LATER_POLL_S
        ready, _, _ = select.select([pipe_fd], [], [], wait)
        if ready and not os.read(pipe_fd, 64):  # EOF: the driver is done or dead
            break
    reap(tracked)


class Reaper:
    """A watcher process that ends the driver's new descendants once the driver is done.

    Use as a context manager around whatever starts child processes (Ray); leaving the block
    (or the driver dying) makes the watcher end the survivors. :meth:`reap_now` does it at
    once (e.g. after a start-up time-out).
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_fd: int | None = None

    def __enter__(self) -> Reaper:
        if not _PROC.is_dir():
            return self
        existing = descendants(os.getpid())
        read_fd, write_fd = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "server.process_reaper", str(os.getpid()), str(read_fd),
             ",".join(map(str, sorted(existing)))],
            pass_fds=(read_fd,), stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        os.close(read_fd)
        os.set_inheritable(write_fd, False)
        self._write_fd = write_fd
        return self

    def reap_now(self, timeout_s: float = GRACE_S + 5.0) -> None:
        """Close the pipe and wait (bounded) for the watcher to end the survivors."""
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None

    def __exit__(self, *exc: object) -> None:
        self.reap_now()


if __name__ == "__main__":  # the watcher process: python -m server.process_reaper PID FD PIDS
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C on the terminal is the driver's
    watch(int(sys.argv[1]), [int(p) for p in sys.argv[3].split(",") if p], int(sys.argv[2]))
