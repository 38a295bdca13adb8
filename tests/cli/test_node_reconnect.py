"""A network cut between a node and the coordinator: the node reconnects by itself, in one line.

A real ``flower-superlink`` and a real ``vesalius node start`` (warm worker, the default) talk
through a small TCP forwarder made here. Once the node is listed by the SuperLink, the forwarder
cuts every connection and refuses new ones for :data:`CUT_S` seconds, then forwards again.

The cut is shorter than the 30 s of issue 15 to keep the test short; the mechanism does not
depend on the length: Flower's SuperNode retries with exponential back-off capped at 20 s
(``MAX_RETRY_DELAY`` in flwr 1.42), so any cut ends with a retry at most ~20 s after the link
is back. A 30 s cut was checked by hand the same way (reconnected after 36 s, 8 tries).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.flower import write_connection

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CUT_S = 8.0


class CutProxy:
    """Forward ``127.0.0.1:port`` to a target port; :meth:`cut` drops and refuses connections."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self._cut.is_set():
                conn.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Drop every open connection and refuse new ones."""
        self._cut.set()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._sockets.clear()

    def restore(self) -> None:
        """Forward again."""
        self._cut.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


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
            os.killpg(proc.pid, signal.SIGKILL)  # helpers left in the group
        except ProcessLookupError:
            pass


def test_node_reconnects_by_itself_after_a_cut_and_says_so_once(
    tmp_path: Path, group: list[subprocess.Popen[bytes]]
) -> None:
    # Prepare: one hospital's data, a SuperLink, the forwarder, the node behind it
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    data = tmp_path / "data"
    subprocess.run([str(BIN / "vesalius"), "synth", "--sites", "1", "--patients", "12",
                    "--out", str(data)], env=env, check=True, capture_output=True)
    link = _free_port()
    group.append(subprocess.Popen(
        [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(link), "--insecure",
         "--disable-runtime-dependency-installation", "--database", str(tmp_path / "link.db")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    _wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", link)) == 0, 60, "the SuperLink")
    proxy = CutProxy(link)
    log = tmp_path / "node.log"
    with open(log, "wb") as sink:
        group.append(subprocess.Popen(
            [str(BIN / "vesalius"), "node", "start", "--data", str(data / "site-1"),
             "--superlink", f"127.0.0.1:{proxy.port}", "--port", str(_free_port()),
             "--insecure", "--flwr-home", str(tmp_path / "node-home"),
             "--ledger-dir", str(tmp_path / "ledger")],
            env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True))
    operator_home = tmp_path / "operator"
    write_connection(operator_home, f"127.0.0.1:{link}", insecure=True, root_cert=None)
    operator_env = {**env, "FLWR_HOME": str(operator_home)}

    def listed_online() -> bool:
        ls = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "--format", "json"],
                            env=operator_env, capture_output=True, text=True, timeout=60)
        try:
            nodes = json.loads(ls.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return False
        return any(node.get("status") == "online" for node in nodes)

    def shown() -> str:
        return log.read_text(errors="replace")

    try:
        _wait_for(lambda: "SuperNode ID" in shown(), 120, "the node to join")
        _wait_for(listed_online, 60, "the node to be listed online")
        # Execute: cut the link, restore it
        proxy.cut()
        _wait_for(lambda: "lost the connection" in shown(), 60, "the node to notice the cut")
        time.sleep(CUT_S)
        proxy.restore()
        # Assert: back by itself (Flower's back-off is at most 20 s), in two lines in all
        _wait_for(lambda: "reconnected to the coordinator" in shown(), 90, "the reconnection")
        _wait_for(listed_online, 60, "the node to be listed online again")
        # read before the forwarder closes: closing it is a second cut, which the node
        # reports as it should (a CI run once caught that line before this read)
        out = shown()
    finally:
        proxy.close()
    assert group[1].poll() is None, out  # the node never stopped
    assert out.count("lost the connection to the coordinator") == 1, out
    assert out.count("reconnected to the coordinator") == 1, out
    assert "Connection attempt failed" not in out and "retrying in" not in out
    assert "Traceback" not in out
