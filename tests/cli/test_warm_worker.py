"""The warm worker's parts without a SuperLink: the fork executor, the supervision, the output.

- :class:`client.warm_worker.executor.WarmExecutor` serves a task in this process (the
  default) or really forks it; a fake of Flower's ``run_clientapp`` records what it was given
  and what it inherited, so the test sees what a real task would get;
- :func:`cli.node_processes.supervise_children` runs tiny Python processes standing in for
  the SuperNode and the worker (crash, restart, stop, signal forwarding);
- the translation of the SuperNode's lines around a network cut and of the worker's lines.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

from cli.node_processes import Child, WorkerOutput, supervise_children
from cli.supernode import FlowerOutput, LinkProblem
from client.warm_worker.executor import WarmExecutor, run_task_in_child, run_task_in_process


def _spec(task_id: int = 7, task_type: TaskType = TaskType.CLIENT_APP) -> ExecutionSpec:
    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:9094",
                         token="secret-token", insecure=True, root_certificates_path=None,
                         runtime_dependency_install=False, parent_pid=os.getpid(),
                         suppress_output=False, task_id=task_id)


def _reap_all(executor: WarmExecutor, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while executor.children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.05)
    assert not executor.children, "a forked task child did not end"


# --- the executor ---------------------------------------------------------------------------

def test_client_app_tasks_run_in_the_worker_itself_one_after_the_other() -> None:
    # Prepare: a fake run_clientapp that ends like Flower's (through flwr_exit) and counts
    from flwr.supernode.runtime import run_clientapp as module

    calls: list[tuple[int, str]] = []

    def fake_runner(**kwargs: object) -> None:
        calls.append((os.getpid(), str(kwargs["token"])))
        assert kwargs["parent_pid"] is None  # no monitor thread per task
        module.flwr_exit(0)

    executor = WarmExecutor(task_main=lambda spec: run_task_in_process(spec, runner=fake_runner))
    # Execute
    first = executor.launch(_spec(task_id=1))
    second = executor.launch(_spec(task_id=2))
    # Assert: both served here, in order, and this process is still running normally
    assert first == second == LaunchResult.accepted()
    assert calls == [(os.getpid(), "secret-token")] * 2 and executor.served == 2
    assert executor.children == {}


def test_a_task_that_raises_does_not_end_the_worker() -> None:
    # Prepare
    def broken(**_kwargs: object) -> None:
        raise SystemExit(1)  # what flwr_exit does outside a task scope

    # Execute
    code = run_task_in_process(_spec(), runner=broken)
    # Assert
    assert code == 1


def test_client_app_task_runs_flowers_runner_in_a_fork(tmp_path: Path) -> None:
    # Prepare: Flower's exit-handler registry holds one of the parent's handlers
    from flwr.supercore.exit import exit_handler

    record = tmp_path / "child.json"

    def fake_runner(**kwargs: object) -> None:
        record.write_text(json.dumps({
            "kwargs": {k: v for k, v in kwargs.items() if k != "certificates"},
            "pid": os.getpid(), "ppid": os.getppid(),
            "inherited_exit_handlers": len(exit_handler.registered_exit_handlers),
            "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        }))
        raise SystemExit(0)  # Flower's flwr_exit

    saved = list(exit_handler.registered_exit_handlers)
    exit_handler.add_exit_handler(lambda: None)
    executor = WarmExecutor(fork_per_task=True, task_main=lambda spec: run_task_in_child(
        spec, torch_threads=1, runner=fake_runner))
    try:
        # Execute
        result = executor.launch(_spec(task_id=7))
        _reap_all(executor)
    finally:
        exit_handler.registered_exit_handlers[:] = saved
    # Assert: accepted, run in another process of ours with the task's token, nothing inherited
    assert result == LaunchResult.accepted()
    seen = json.loads(record.read_text())
    assert seen["pid"] != os.getpid() and seen["ppid"] == os.getpid()
    assert seen["kwargs"] == {"runtime_api_address": "127.0.0.1:9094", "token": "secret-token",
                              "insecure": True, "parent_pid": os.getpid(),
                              "runtime_dependency_install": False}
    assert seen["inherited_exit_handlers"] == 0 and seen["sigterm_default"]
    assert executor.served == 1


def test_a_crashing_task_ends_only_its_child(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    def crash(_spec: ExecutionSpec) -> int:
        raise RuntimeError("boom in the task")

    executor = WarmExecutor(fork_per_task=True, task_main=crash)
    # Execute
    with caplog.at_level("WARNING", logger="client.warm_worker.executor"):
        executor.launch(_spec(task_id=11))
        _reap_all(executor)
        executor.launch(_spec(task_id=12))  # the worker goes on serving
        _reap_all(executor)
    # Assert
    assert executor.served == 2
    assert "task 11: its child ended with status 1" in caplog.text
    assert "boom" not in caplog.text


def test_flowers_exit_status_is_the_childs(tmp_path: Path) -> None:
    # Prepare
    statuses: list[int] = []

    def runner(**_kwargs: object) -> None:
        raise SystemExit(3)

    # Execute: in a fork, so that this test process keeps its signal handlers
    pid = os.fork()
    if pid == 0:
        os._exit(run_task_in_child(_spec(), torch_threads=0, runner=runner))
    _, status = os.waitpid(pid, 0)
    statuses.append(os.waitstatus_to_exitcode(status))
    # Assert
    assert statuses == [3]


def test_other_task_types_go_to_flowers_subprocess_executor() -> None:
    # Prepare
    launched: list[ExecutionSpec] = []

    class Fallback:
        def launch(self, spec: ExecutionSpec) -> LaunchResult:
            launched.append(spec)
            return LaunchResult.accepted()

    def no_fork() -> int:
        raise AssertionError("must not fork for another task type")

    executor = WarmExecutor(fork_per_task=True, fork=no_fork)
    executor._fallback = Fallback()  # type: ignore[assignment]
    # Execute
    result = executor.launch(_spec(task_type=TaskType.AGENT_APP))
    # Assert
    assert result.status == "accepted" and [s.task_type for s in launched] == [TaskType.AGENT_APP]


def test_a_failed_fork_is_reported_to_flower() -> None:
    # Prepare
    def no_memory() -> int:
        raise OSError(12, "Cannot allocate memory")

    executor = WarmExecutor(fork_per_task=True, fork=no_memory)
    # Execute
    result = executor.launch(_spec())
    # Assert
    assert result.status == "failed" and result.message == "fork failed (OSError)"


def test_close_stops_running_tasks_in_the_worker_only() -> None:
    # Prepare: a task that would run for a minute
    def slow(_spec: ExecutionSpec) -> int:
        time.sleep(60)
        return 0

    executor = WarmExecutor(fork_per_task=True, task_main=slow)
    executor.launch(_spec())
    child = next(iter(executor.children))
    # Execute: close() as a forked child would call it (inherited), then as the worker
    executor._owner = -1
    executor.close()
    still_running = executor.children.copy()
    executor._owner = os.getpid()
    started = time.monotonic()
    executor.close()
    # Assert
    assert still_running == {child: 7}
    assert executor.children == {} and time.monotonic() - started < 60  # no hang
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


# --- supervision with stand-in processes ---------------------------------------------------

class _Echo:
    """A translator that shows every line as it came, stripped."""

    def line(self, raw: str) -> str | None:
        return raw.strip() or None


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_crashed_helper_is_restarted_with_a_line_while_main_keeps_running(tmp_path: Path) -> None:
    # Prepare: main runs ~4 s; the helper crashes at once the first time, then stays up
    marker = tmp_path / "started-once"
    main = Child("main", _py("import time; print('main up', flush=True); time.sleep(4); "
                             "print('main done', flush=True)"), _Echo())
    helper = Child("the warm worker", _py(
        f"import os, sys, time, pathlib; p = pathlib.Path({str(marker)!r})\n"
        "if not p.exists():\n    p.touch(); print('crashing', flush=True); sys.exit(3)\n"
        "print('helper up again', flush=True); time.sleep(60)"), _Echo(), restart=True)
    shown: list[str] = []
    # Execute
    code, stopping = supervise_children(main, [helper], dict(os.environ), say=shown.append,
                                        grace_s=2)
    # Assert: one visible restart line, the helper came back, main ended normally
    assert (code, stopping) == (0, False)
    restarts = [s for s in shown if "restarting it" in s]
    assert restarts == ["the warm worker stopped (exit status 3); restarting it in 1 s "
                        "(restart 1); the node keeps its connection to the coordinator"]
    assert "helper up again" in shown and "main done" in shown
    assert helper.proc is not None and helper.proc.poll() is not None  # stopped at the end


def test_a_reconnection_starts_the_worker_afresh_even_one_that_ignores_sigterm(
        tmp_path: Path) -> None:
    # Prepare: main reports a reconnection after 1 s; the helper ignores SIGTERM (a task stuck
    # on a run the restarted coordinator no longer runs) and records each start
    starts = tmp_path / "starts"
    main = Child("main", _py("import time; time.sleep(1); print('reconnected to the "
                             "coordinator at x after 5 s', flush=True); time.sleep(20)"), _Echo())
    helper = Child("the warm worker", _py(
        f"import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"p = pathlib.Path({str(starts)!r}); p.write_text(p.read_text() + 'x' if p.exists() "
        "else 'x')\ntime.sleep(60)"), _Echo(), restart=True)
    shown: list[str] = []
    # Execute
    code, _ = supervise_children(main, [helper], dict(os.environ), say=shown.append, grace_s=1)
    # Assert: one line, a second start (the stuck one killed after the grace), no crash line
    assert code == 0
    assert [s for s in shown if "afresh" in s] == [
        "starting the warm worker afresh after the reconnection (a task of the lost connection "
        "may still hold it)"]
    assert starts.read_text() == "xx"
    assert not any("restarting it" in s for s in shown)


def test_main_ending_stops_the_helpers_and_returns_its_status() -> None:
    # Prepare
    main = Child("main", _py("import sys, time; time.sleep(1); sys.exit(5)"), _Echo())
    helper = Child("helper", _py("import time; time.sleep(60)"), _Echo(), restart=True)
    shown: list[str] = []
    # Execute
    started = time.monotonic()
    code, stopping = supervise_children(main, [helper], dict(os.environ), say=shown.append,
                                        grace_s=2)
    # Assert
    assert (code, stopping) == (5, False)
    assert helper.proc is not None and helper.proc.returncode is not None
    assert not any("restarting" in s for s in shown)
    assert time.monotonic() - started < 60  # no hang (loaded CI)


def test_sigterm_is_forwarded_to_every_child_and_counts_as_asked_to_stop(tmp_path: Path) -> None:
    # Prepare: both children note the signal they get
    def waiter(name: str) -> list[str]:
        return _py("import signal, sys, time, pathlib\n"
                   f"def h(s, f):\n    pathlib.Path({str(tmp_path)!r}, {name!r}).write_text(str(s)); sys.exit(0)\n"
                   "signal.signal(signal.SIGTERM, h)\nprint('up', flush=True)\ntime.sleep(60)")

    main, helper = Child("main", waiter("main"), _Echo()), Child("helper", waiter("helper"), _Echo())
    timer = threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    # Execute
    timer.start()
    try:
        code, stopping = supervise_children(main, [helper], dict(os.environ), say=lambda _s: None,
                                            grace_s=5)
    finally:
        timer.cancel()
    # Assert
    assert stopping and code == 0
    assert (tmp_path / "main").read_text() == (tmp_path / "helper").read_text() == str(int(signal.SIGTERM))


# --- what the operator reads ---------------------------------------------------------------

def test_a_cut_after_joining_is_one_line_and_the_reconnection_another() -> None:
    # Prepare
    out = FlowerOutput("10.1.2.3:9092", lambda: LinkProblem("unreachable", "connection refused",
                                                             "fix", True))
    lines = [
        "\x1b[92mINFO \x1b[0m:      SuperNode ID: 13376139963692105012",
        "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 0.58 seconds",
        "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 2.68 seconds",
        "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 14.75 seconds",
        "\x1b[92mINFO \x1b[0m:      Connection successful after 35.69 seconds and 8 tries.",
        "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 1.10 seconds",
    ]
    # Execute
    shown = [out.line(text) for text in lines]
    # Assert: no retry storm; a second cut is announced again
    assert shown[1] == ("lost the connection to the coordinator at 10.1.2.3:9092 "
                        "(connection refused); the node reconnects by itself")
    assert shown[2] is None and shown[3] is None
    assert shown[4] == "reconnected to the coordinator at 10.1.2.3:9092 after 36 s"
    assert shown[5] is not None and shown[5].startswith("lost the connection") and out.cuts == 2


def test_retries_before_joining_stay_counted_attempts() -> None:
    # Prepare
    out = FlowerOutput("10.1.2.3:9092", lambda: None)
    # Execute
    first = out.line("WARNING :   Connection attempt failed, retrying in 0.80 seconds")
    answered = out.line("INFO :      Connection successful after 1.20 seconds and 2 tries.")
    # Assert
    assert first is not None and first.startswith("attempt 1: cannot reach the coordinator")
    assert answered == "attempt 2: the coordinator at 10.1.2.3:9092 answers"
    assert out.problem is None


def test_worker_output_hides_retries_and_tracebacks_and_redacts() -> None:
    # Prepare
    out = WorkerOutput()
    lines = ["WARNING :   Connection attempt failed, retrying in 0.5 seconds",
             "Traceback (most recent call last):",
             '  File "/srv/site/client/app.py", line 3, in f',
             "KeyError: 'QPAT-001'",
             "INFO    : task 42: served by warm worker 100 in child 101 (ClientApp already imported)",
             "INFO    : reading /data/site-1/QPAT-001/img.dcm"]
    # Execute
    shown = [out.line(text) for text in lines]
    # Assert
    assert shown[:3] == [None, None, None]
    assert shown[3] == "warm worker: internal error (KeyError); its traceback is not shown"
    assert shown[4] is not None and "served by warm worker 100" in shown[4]
    assert shown[5] is not None and "/data/site-1" not in shown[5] and "QPAT-001" not in shown[5]


@pytest.mark.parametrize(
    ("args", "option"),
    [(["--worker", "forked"], "--worker"), (["--poll-interval", "0"], "--poll-interval"),
     (["--poll-interval", "nan"], "--poll-interval"), (["--poll-interval", "5"], "--poll-interval")],
)
def test_worker_options_are_checked_before_anything_starts(
    tmp_path: Path, args: list[str], option: str
) -> None:
    # Prepare
    from typer.testing import CliRunner

    from cli.app import app

    # Execute
    result = CliRunner().invoke(app, ["node", "start", "--data", str(tmp_path), "--insecure", *args])
    # Assert
    assert result.exit_code == 2 and option in result.output
    assert "Traceback" not in result.output and str(tmp_path) not in result.output


def test_warm_commands_pair_the_supernode_and_the_worker_on_loopback(tmp_path: Path) -> None:
    # Prepare
    from cli.node_start import _superexec_secret, _warm_commands

    # Execute
    with _superexec_secret() as secret:
        supernode, worker = _warm_commands(["--superlink", "10.0.0.5:9092", "--port", "9201"],
                                           port=9201, secret=secret)
        mode = secret.stat().st_mode & 0o777
        size = secret.stat().st_size
    # Assert: process isolation, loopback Runtime API, one shared owner-only secret, gone after
    assert supernode[1:3] == ["-m", "client.warm_worker.supernode"]
    assert supernode[supernode.index("--isolation") + 1] == "process"
    assert supernode[supernode.index("--host") + 1] == "127.0.0.1"
    assert worker[worker.index("--runtime-api-address") + 1] == "127.0.0.1:9201"
    key = "--superexec-auth-secret-file"
    assert supernode[supernode.index(key) + 1] == worker[worker.index(key) + 1] == str(secret)
    assert mode == 0o600 and size == 32 and not secret.exists()


def test_warm_worker_on_another_flower_is_refused_in_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    import flwr
    from typer.testing import CliRunner

    from cli.app import app

    monkeypatch.setattr(flwr, "__version__", "1.50.0")
    # Execute
    result = CliRunner().invoke(app, ["node", "start", "--data", str(tmp_path), "--insecure"])
    # Assert
    out = " ".join(result.output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())
    assert result.exit_code == 2 and "--worker per-message" in out and "Traceback" not in out
