"""A node's child process stops when the `vesalius node start` that started it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from client.warm_worker.orphan_guard import exit_with_parent


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by whoever adopted it, maybe late)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def test_watcher_sends_sigterm_then_exits_hard_when_the_parent_changes() -> None:
    parents = iter([100, 100, 100, 1])
    calls: list[tuple[str, int]] = []
    thread = exit_with_parent(
        interval_s=0.001, grace_s=0.001, parent=100, getppid=lambda: next(parents, 1),
        kill=lambda pid, sig: calls.append(("kill", sig)),
        hard_exit=lambda code: calls.append(("exit", code)))
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert calls == [("kill", signal.SIGTERM), ("exit", 1)]


def test_a_child_outlives_no_parent_killed_with_sigkill(tmp_path: Path) -> None:
    """Real processes: parent starts a child in its own session (as `node start` does), the
    parent is SIGKILLed, the child notices and stops (SIGTERM handler runs) within seconds."""
    marker = tmp_path / "child-stopped"
    child_code = textwrap.dedent(f"""
        import signal, sys, time
        from client.warm_worker.orphan_guard import exit_with_parent
        def stop(*_):
            open({str(marker)!r}, "w").write("sigterm")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        exit_with_parent(interval_s=0.05, grace_s=5)
        print("ready", flush=True)
        time.sleep(60)
    """)
    parent_code = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {child_code!r}], start_new_session=True,
                                 stdout=subprocess.PIPE, text=True)
        child.stdout.readline()
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    root = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE,
                              text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        child_pid = int(parent.stdout.readline())  # type: ignore[union-attr]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not marker.exists():
            time.sleep(0.05)
        assert marker.read_text() == "sigterm"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _running(child_pid):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the orphaned child is still running")
    finally:
        if parent.poll() is None:
            parent.kill()
