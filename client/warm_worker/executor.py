"""A Flower SuperExec executor that serves ClientApp tasks from the warm worker process.

The worker process (:mod:`client.warm_worker.worker`) has imported torch, Flower and the
Vesalius ClientApp once. Each ClientApp task runs Flower's own ``run_clientapp`` (the function
behind ``flwr-clientapp``) with the task's token: pull the message, context and FAB from the
SuperNode's Runtime API, run the ClientApp, push the reply and the task status. Two ways:

in the worker itself (default)
    :func:`run_task_in_process`, inside :func:`client.warm_worker.flower_seams.task_scope`. What
    the ClientApp keeps in memory between calls (the node's loaded splits, the accountant's
    cached noise-multiplier search: seconds per round) survives from one message to the next,
    as in Flower's simulation, where ClientApps live in long-lived actors. An exception in the
    ClientApp is Flower's to report, as in ``flwr-clientapp``; a crash of the process (a
    segmentation fault, memory exhausted) ends the worker, and ``vesalius node start``
    restarts it.
in a fork of the worker (``fork_per_task=True``)
    :func:`run_task_in_child`: a crash ends one task only, but every task starts from the
    worker's state after warm-up (nothing cached between messages). The worker warms torch up
    with one intra-op thread (an OpenMP pool started before ``fork()`` deadlocks the children)
    and uses no CUDA before forking; each child drops the signal and exit handlers it
    inherited.
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

#: Seconds ``close`` waits for running task children after SIGTERM before killing them.
CLOSE_GRACE_S = 5.0

Runner = Callable[..., None]


def _run(spec: ExecutionSpec, runner: Runner, *, parent_pid: int | None) -> int:
    """Call Flower's task runner for ``spec``; return the task's exit code."""
    started = time.perf_counter()
    code = 0
    try:
        runner(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=flower_seams.resolve_root_certificates(spec.root_certificates_path,
                                                                spec.insecure),
            parent_pid=parent_pid,
            runtime_dependency_install=False,
        )
    except flower_seams.TaskFinished as done:
        code = done.code
    except SystemExit as done:  # Flower ends every task with flwr_exit -> sys.exit
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    log.info("task %d: done in %.2f s (status %d)", spec.task_id,
             time.perf_counter() - started, code)
    return code


def run_task_in_process(spec: ExecutionSpec, *,
                        runner: Runner = flower_seams.run_clientapp) -> int:
    """Run one ClientApp task in the worker itself; return its exit code (0-99: success).

    Parameters
    ----------
    spec : ExecutionSpec
        What Flower's SuperExec asked for (Runtime API address, token, TLS).
    runner : Callable[..., None]
        Flower's ``run_clientapp`` (tests pass a fake).
    """
    log.info("task %d: served in warm worker %d (ClientApp %s)", spec.task_id, os.getpid(),
             "already imported" if "client.app" in sys.modules else "not preloaded")
    with flower_seams.task_scope():
        # No parent monitor per task: the worker's own (run_superexec) already watches.
        return _run(spec, runner, parent_pid=None)


def run_task_in_child(spec: ExecutionSpec, *, torch_threads: int,
                      runner: Runner = flower_seams.run_clientapp) -> int:
    """Run one ClientApp task in this (freshly forked) process; return its exit status.

    Parameters
    ----------
    spec : ExecutionSpec
        What Flower's SuperExec asked for (Runtime API address, token, TLS).
    torch_threads : int
        Intra-op threads torch may use in the child (the worker warmed up with one).
    runner : Callable[..., None]
        Flower's ``run_clientapp`` (tests pass a fake).
    """
    flower_seams.forget_inherited_exit_handlers()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    if torch_threads > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(torch_threads)
    log.info("task %d: served by warm worker %d in child %d (ClientApp %s)", spec.task_id,
             os.getppid(), os.getpid(),
             "already imported" if "client.app" in sys.modules else "not preloaded")
    return _run(spec, runner, parent_pid=spec.parent_pid)


class WarmExecutor:
    """Executor (Flower's ``Executor`` protocol) serving ClientApp tasks from the warm worker.

    Other task types (none on a Vesalius node) go to Flower's own subprocess executor.

    Parameters
    ----------
    fork_per_task : bool
        Run each task in a fork of the worker instead of in the worker itself.
    torch_threads : int
        Intra-op threads for torch in a forked task (0 = torch's default).
    fork : Callable[[], int]
        ``os.fork`` (tests pass a fake).
    task_main : Callable[[ExecutionSpec], int] | None
        What serves a task (default: :func:`run_task_in_process` or, forked,
        :func:`run_task_in_child`).
    """

    def __init__(self, *, fork_per_task: bool = False, torch_threads: int = 0,
                 fork: Callable[[], int] = os.fork,
                 task_main: Callable[[ExecutionSpec], int] | None = None) -> None:
        self.fork_per_task = fork_per_task
        self.torch_threads = torch_threads
        self._fork = fork
        if task_main is None:
            task_main = (
                (lambda spec: run_task_in_child(spec, torch_threads=self.torch_threads))
                if fork_per_task else run_task_in_process)
        self._task_main = task_main
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
        """Serve a ClientApp task (here or in a fork); other task types start Flower's process."""
        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        if not self.fork_per_task:
            self.served += 1
            self._task_main(spec)  # returns when the reply and the task status are pushed
            return LaunchResult.accepted()
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
                code = self._task_main(spec)
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
        for _ in range(int(CLOSE_GRACE_S / 0.1)):
            self.reconcile()
            if not self.children:
                return
            time.sleep(0.1)
        for pid in list(self.children):
            _signal(pid, signal.SIGKILL)
        for _ in range(50):  # a killed child still has to be reaped (slower on a busy machine)
            self.reconcile()
            if not self.children:
                return
            time.sleep(0.1)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
