"""A warm node serves a whole deployed run from one process that imported the ClientApp once.

A real ``flower-superlink`` and two ``vesalius node start --insecure`` nodes (the default
``--worker warm``) serve a 2-round ``vesalius federation run --superlink``. Each node's output
must show one worker made ready once, every task served in that same worker with the ClientApp
already imported, and no ``flwr-clientapp`` process started. The second train message of a
node is served faster than the first: what the ClientApp cached in memory (the accountant's
noise search, the loaded splits) lasted from one message to the next.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listening on {port}")


@pytest.fixture
def group() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started in their own sessions; every group is stopped at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_warm_nodes_serve_a_two_round_run_from_one_process_each(
    tmp_path: Path, group: list[subprocess.Popen[bytes]]
) -> None:
    # Prepare: two hospitals, a SuperLink, two warm nodes
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    data = tmp_path / "data"
    subprocess.run([str(BIN / "vesalius"), "synth", "--sites", "2", "--patients", "24",
                    "--out", str(data)], env=env, check=True, capture_output=True)
    link = _free_port()
    group.append(subprocess.Popen(
        [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(link), "--insecure",
         "--disable-runtime-dependency-installation", "--database", str(tmp_path / "link.db")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    _wait_port(link)
    logs = [tmp_path / f"node-{i}.log" for i in (1, 2)]
    for i, log in enumerate(logs, start=1):
        with open(log, "wb") as sink:
            group.append(subprocess.Popen(
                [str(BIN / "vesalius"), "node", "start", "--data", str(data / f"site-{i}"),
                 "--superlink", f"127.0.0.1:{link}", "--port", str(_free_port()),
                 "--site-name", f"site-{i}", "--insecure", "--min-release-count", "1",
                 "--flwr-home", str(tmp_path / f"node-{i}-home"),
                 "--ledger-dir", str(tmp_path / f"ledger-{i}")],
                env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True))
    # Execute
    run = subprocess.run(
        [str(BIN / "vesalius"), "federation", "run", "--superlink", f"127.0.0.1:{link}",
         "--insecure", "--rounds", "2", "--batch-size", "8", "--out", str(tmp_path / "run"),
         "--flwr-home", str(tmp_path / "operator")],
        env=env, capture_output=True, text=True, timeout=900)
    # Assert: the run completed with both hospitals in both rounds
    shown = [log.read_text(errors="replace") for log in logs]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:] + shown[0][-3000:]
    doc = json.loads((tmp_path / "run" / "report.json").read_text())
    assert doc["status"] == "completed"
    assert [len(r["train"]) for r in doc["rounds"]] == [2, 2]
    for out in shown:
        ready = re.findall(r"warm worker (\d+) ready", out)
        served = re.findall(r"served in warm worker (\d+) \(ClientApp already imported\)", out)
        assert len(ready) == 1, out[-3000:]  # imported once, never restarted
        assert len(served) >= 4 and set(served) == set(ready)  # train + evaluate per round
        assert "Start `flwr-clientapp` process" not in out  # no per-message process started
        assert "restarting it" not in out and "Traceback" not in out
        done = [float(t) for t in re.findall(r"done in ([0-9.]+) s \(status 0\)", out)]
        assert len(done) == len(served)
