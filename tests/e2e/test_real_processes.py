"""End to end with real processes on loopback over TLS, driven through the CLI.

``vesalius federation certs`` makes a CA and a SuperLink certificate; a ``flower-superlink``
serves TLS, two hospital SuperNodes (``vesalius node start``) run as separate processes with
their own ports and FLWR_HOME and trust the CA; ``vesalius federation run --superlink``
submits the run. Every process is stopped by the test.

The run is an ordinal task (three grades): a non-binary task through the whole deployment
(the plan's task reaches the nodes, their labels are read for it, and the task's pooled
inference comes back); the binary path runs in ``make demo`` and the simulations.
"""

from __future__ import annotations

import json
import os
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


class Processes:
    """Start processes in their own sessions; stop the whole group of each at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.procs = env, logs, []  # type: ignore[var-annotated]

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((proc, log))
        return proc

    def stop_all(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, log in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            log.close()
        for proc, _ in self.procs:  # children of the groups (superexec, clientapp)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    logs = tmp_path / "logs"
    logs.mkdir()
    p = Processes(env, logs)
    yield p
    p.stop_all()


def _vesalius(*args: str) -> list[str]:
    return [str(BIN / "vesalius"), *args]


def start_deployment(
    tmp_path: Path, procs: Processes, data: Path, *node_args: str
) -> tuple[int, str]:
    """A TLS SuperLink and two SuperNodes (``node start NODE_ARGS``) serving ``data/site-1``
    and ``data/site-2`` on free loopback ports; returns the SuperLink's port and the CA file."""
    certs = tmp_path / "certs"
    subprocess.run(_vesalius("federation", "certs", "--out", str(certs)), env=procs.env, check=True,
                   capture_output=True)
    ca = str(certs / "ca.crt")
    link = _free_port()
    procs.start("superlink", [str(BIN / "flower-superlink"), "--host", "127.0.0.1",
                              "--port", str(link), "--disable-runtime-dependency-installation",
                              "--ssl-ca-certfile", ca, "--ssl-certfile", str(certs / "server.crt"),
                              "--ssl-keyfile", str(certs / "server.key"),
                              "--database", str(tmp_path / "link.db")])
    _wait_port(link)
    for i in (1, 2):
        home = tmp_path / f"node-{i}-home"
        procs.start(f"node-{i}", _vesalius(
            "node", "start", "--data", str(data / f"site-{i}"), "--superlink", f"127.0.0.1:{link}",
            "--port", str(_free_port()), "--site-name", f"site-{i}", "--epsilon-cap", "8",
            "--min-release-count", "1", *node_args,
            "--root-certificates", ca, "--flwr-home", str(home)))
    return link, ca


def test_superlink_two_supernodes_two_rounds_of_an_ordinal_task(
    tmp_path: Path, procs: Processes
) -> None:
    # Prepare: two hospitals' graded data, a SuperLink and two SuperNodes on free loopback ports
    data = tmp_path / "data"
    subprocess.run(_vesalius("synth", "--task", "ordinal", "--num-classes", "3", "--sites", "2",
                             "--patients", "40", "--out", str(data), "--seed", "9"),
                   env=procs.env, check=True, capture_output=True)
    link, ca = start_deployment(tmp_path, procs, data, "--task", "ordinal", "--num-classes", "3")
    out = tmp_path / "run"
    # Execute: the operator submits a 2-round ordinal run through the CLI (each node serves
    # its messages from its warm worker, `vesalius node start`'s default).
    run = subprocess.run(
        _vesalius("federation", "run", "--superlink", f"127.0.0.1:{link}", "--root-certificates", ca,
                  "--task", "ordinal", "--num-classes", "3",
                  "--rounds", "2", "--batch-size", "8", "--out", str(out),
                  "--flwr-home", str(tmp_path / "operator-home")),
        env=procs.env, capture_output=True, text=True, timeout=900,
    )
    # Assert
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (tmp_path / "logs").glob("*.log"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + logs
    doc = json.loads((out / "report.json").read_text())
    assert doc["status"] == "completed"
    assert doc["config"]["task"] == "ordinal" and doc["config"]["num-classes"] == 3
    inf = doc["inference"]
    assert inf["task"] == "ordinal" and inf["status"] == "completed", inf
    assert sum(inf["ordinal"]["class_counts"]) == inf["n"] > 0
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert sorted(s["site"] for s in doc["sites"]) == ["site-1", "site-2"]
    assert all(0 < s["epsilon"] <= 8 for s in doc["sites"])
    # The accountant survives the per-message ClientApp processes: epsilon composes over rounds
    by_round = [{row["site"]: row["epsilon"] for row in r["train"]} for r in doc["rounds"]]
    assert all(0 < by_round[0][site] < by_round[1][site] for site in by_round[0])
    # The operator saw one summary line per round, streamed from the deployed ServerApp, and
    # the pooled table; no traceback, no Flower line twice
    shown = run.stdout + run.stderr
    assert shown.count("round 1/2: exact grade") == 1 and shown.count("round 2/2: exact grade") == 1
    assert "Traceback" not in shown and "Pooled test inference (ordinal)" in shown
    assert "quadratic-weighted kappa" in " ".join(shown.split())
    flower_lines = [line for line in shown.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert len(flower_lines) == len(set(flower_lines))
