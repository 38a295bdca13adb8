"""A Flower SuperExec executor that runs each ClientApp task in a fork of a warm process.

The worker process (:mod:`client.warm_worker.worker`) has imported torch, Flower and the
Vesalius ClientApp once; ``fork()`` gives each task a copy of that process in milliseconds.
The child does exactly what a fresh ``flwr-clientapp`` would do: it calls Flower's own
``run_clientapp`` with the task's token (pull the message, context and FAB from the SuperNode's
Runtime API, run the ClientApp, push the reply and the task status), then exits. A task that
crashes ends its child only; the worker goes on serving.

Fork safety: the worker must fork from a quiet state. It warms torch up with one intra-op thread
(an OpenMP pool started before ``fork()`` deadlocks the children), uses no CUDA before forking,
and each child drops the signal and exit handlers it inherited before running the task.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import (
    ExecutionSpec,
    LaunchResult,
    SubprocessExecutor,
)

from client.warm_worker import flower_seams

log = logging.getLogger(__name__)

#: Seconds ``close`` waits for running tasks after SIGTERM before killing them.
CLOSE_GRACE_S = 5.0


def run_task_in_child(spec: ExecutionSpec, *, torch_threads: int,
                      runner: Callable[..., None] = flower_seams.run_clientapp) -> int:
    """Run one ClientApp task in this (freshly forked) process; return its exit status.

    Parameters
    ----------
    spec : ExecutionSpec
        What Flower's SuperExec asked for (Runtime API address, token, TLS).
    torch_threads : int
        Intra-op threads torch may use in the child (the worker warmed up with one).
    runner : Callable[..., None]
        Flower's ``run_clientapp`` (tests pass a fake).

    Returns
    -------
    int
        0 when the task completed, else Flower's non-zero status.
    """
    flower_seams.forget_inherited_exit_handlers()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    if torch_threads > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(torch_threads)
    preloaded = "client.app" in sys.modules
    log.info("task %d: served by warm worker %d in child %d (ClientApp %s)", spec.task_id,
             os.getppid(), os.getpid(), "already imported" if preloaded else "not preloaded")
    started = time.perf_counter()
    code = 0
    try:
        runner(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=flower_seams.resolve_root_certificates(spec.root_certificates_path,
                                                                spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=False,
        )
    except SystemExit as done:  # Flower ends every task with flwr_exit -> sys.exit
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    log.info("task %d: done in %.2f s (status %d)", spec.task_id,
             time.perf_counter() - started, code)
    return code


class ForkExecutor:
    """Executor (Flower's ``Executor`` protocol) forking the warm worker for ClientApp tasks.

    Other task types (none on a Vesalius node) go to Flower's own subprocess executor.

    Parameters
    ----------
    torch_threads : int
        Intra-op threads for torch in each task (0 = torch's default).
    fork : Callable[[], int]
        ``os.fork`` (tests pass a fake).
    child_main : Callable[[ExecutionSpec], int] | None
        What a child runs (default: :func:`run_task_in_child`).
    """

    def __init__(self, *, torch_threads: int = 0, fork: Callable[[], int] = os.fork,
                 child_main: Callable[[ExecutionSpec], int] | None = None) -> None:
        self.torch_threads = torch_threads
        self._fork = fork
        self._child_main = child_main or (
            lambda spec: run_task_in_child(spec, torch_threads=self.torch_threads))
        self._owner = os.getpid()
        self.children: dict[int, int] = {}  # pid -> task id
        self.served = 0
        self._fallback = SubprocessExecutor()

    # -- Flower's Executor protocol ------------------------------------------------------------
    def get_eligible_capacity(self, supported_task_types: set[TaskType], *, insecure: bool = False,
                              root_certificates_path: str | None = None
                              ) -> tuple[set[TaskType], set[str]]:
        """Every supported task type can start at once (as Flower's subprocess executor)."""
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, *, fab_hash: str | None = None,
                          insecure: bool = False, root_certificates_path: str | None = None) -> None:
        """No capacity gate."""
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork a child that runs the ClientApp task; other task types start Flower's process."""
        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        self.reconcile()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = self._fork()
        except OSError as exc:
            return LaunchResult.failed(f"fork failed ({exc.__class__.__name__})")
        if pid == 0:  # the child: never return into Flower's loop
            code = 1
            try:
                code = self._child_main(spec)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children[pid] = spec.task_id
        self.served += 1
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished task children; note any that did not complete."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            task_id = self.children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                log.warning("task %d: its child ended with status %d", task_id, code)

    def close(self) -> None:
        """Stop running task children (only in the worker itself, never in a child)."""
        if os.getpid() != self._owner:
            return
        for pid in self.children:
            _signal(pid, signal.SIGTERM)
        deadline_polls = int(CLOSE_GRACE_S / 0.1)
        for _ in range(deadline_polls):
            self.reconcile()
            if not self.children:
                return
            time.sleep(0.1)
        for pid in list(self.children):
            _signal(pid, signal.SIGKILL)
        self.reconcile()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
