"""``vesalius coordinator`` with real processes on loopback: only registered hospitals join.

One coordinator (Flower SuperLink, TLS, SuperNode authentication) and two hospitals with
their own key pairs: the registered one joins and shows as connected; the unregistered one is
refused and the coordinator names its key's fingerprint; once revoked, the first is refused
too, by name. A second test checks that ``--insecure`` warns. Every process is stopped by its
process group, also when an assertion fails.
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
from typer.testing import CliRunner

from cli.app import app
from cli.flower import flower_env
from client.node_keys import fingerprint
from common.crypto.certs import make_certificates

pytestmark = pytest.mark.slow

VESALIUS = str(Path(sys.executable).parent / "vesalius")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Children started in their own process groups, output to log files, all stopped at the end."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as out:
            proc = subprocess.Popen([VESALIUS, *args], env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout: float) -> float:
        """Seconds until ``text`` appears in ``name``'s output (fails after ``timeout``)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if text in self.output(name):
                return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not in the output of {name} after {timeout} s:\n"
                             f"{self.output(name)[-3000:]}")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # helpers of the group that outlived its leader
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    env = flower_env(tmp_path / "flwr-home")
    env["VESALIUS_HOME"] = str(tmp_path / "vesalius-home")
    running = Processes(logs, env)
    try:
        yield running
    finally:
        running.stop_all()


def _coordinator(*args: str) -> str:
    """``vesalius coordinator ...`` in this process (its Flower CLI calls are real processes)."""
    done = CliRunner().invoke(app, ["coordinator", *args], env={"COLUMNS": "300"})
    assert done.exit_code == 0, done.output
    return done.stdout


def test_only_registered_hospitals_join_and_refused_keys_are_named(
        tmp_path: Path, procs: Processes) -> None:
    # Prepare: certificates, two hospitals' data and key pairs (`vesalius node keys`)
    state = tmp_path / "coordinator"
    make_certificates(state / "certs")
    ca = state / "certs" / "ca.crt"
    runner = CliRunner()
    synth = runner.invoke(app, ["synth", "--sites", "2", "--patients", "20", "--out",
                                str(tmp_path / "data")])
    assert synth.exit_code == 0, synth.output
    keys = {}
    for site in ("site-1", "site-2"):
        made = runner.invoke(app, ["node", "keys", "--out", str(tmp_path / f"keys-{site}"),
                                   "--site-name", site])
        assert made.exit_code == 0, made.output
        keys[site] = tmp_path / f"keys-{site}"
    prints = {site: fingerprint((folder / "node-key.pub").read_bytes())
              for site, folder in keys.items()}
    port = _free_port()

    def node(site: str) -> list[str]:
        return ["node", "start", "--data", str(tmp_path / "data" / site), "--superlink",
                f"127.0.0.1:{port}", "--root-certificates", str(ca), "--auth-private-key",
                str(keys[site] / "node-key"), "--site-name", site, "--port", str(_free_port()),
                "--flwr-home", str(tmp_path / f"home-{site}"), "--max-attempts", "3"]

    def status() -> dict[str, dict[str, object]]:
        done = _coordinator("status", "--state-dir", str(state), "--format", "json")
        return {str(row["site"]): row for row in json.loads(done)["nodes"]}

    # Execute: the coordinator with TLS and node authentication (the defaults)
    procs.start("coordinator", ["coordinator", "start", "--state-dir", str(state), "--host",
                                "127.0.0.1", "--port", str(port)])
    ready_s = procs.wait_for("coordinator", "coordinator ready", timeout=120)
    assert "TLS on, node authentication on" in procs.output("coordinator")
    registered = _coordinator("register", "--site", "site-1", "--public-key",
                              str(keys["site-1"] / "node-key.pub"), "--state-dir", str(state))
    assert prints["site-1"] in registered

    # the registered hospital joins and is listed as connected; the unregistered one (started
    # at the same time) is refused, and the coordinator names its key
    joined_at = time.monotonic()
    procs.start("site-1", node("site-1"))
    unregistered = procs.start("site-2", node("site-2"))
    admitted_s = procs.wait_for("coordinator", "site site-1 joined", timeout=150)
    print(f"\nSuperLink ready after {ready_s:.1f} s; site-1 admitted {admitted_s:.1f} s after "
          "`vesalius node start` (including its start-up and data check)")
    assert status()["site-1"]["connected"] is True
    assert unregistered.wait(timeout=150) != 0
    procs.wait_for("coordinator",
                   f"refused a node whose key is not registered: {prints['site-2']}", timeout=30)
    assert "site-2" not in status()

    # revoked: the connected node is refused from its next request, then by name on rejoining
    _coordinator("unregister", "--site", "site-1", "--state-dir", str(state))
    again = procs.start("site-1-again", node("site-1"))
    procs.wait_for("coordinator", "signed by a key that is not registered", timeout=60)
    assert procs.procs["site-1"].wait(timeout=60) is not None
    assert status()["site-1"]["connected"] is False
    assert again.wait(timeout=150) != 0
    procs.wait_for("coordinator", f"{prints['site-1']} (the key of site site-1, revoked",
                   timeout=30)
    assert time.monotonic() - joined_at < 600


def test_insecure_coordinator_warns_and_admits_without_tls(tmp_path: Path, procs: Processes
                                                           ) -> None:
    port = _free_port()
    procs.start("coordinator", ["coordinator", "start", "--state-dir", str(tmp_path / "s"),
                                "--host", "127.0.0.1", "--port", str(port), "--insecure"])
    procs.wait_for("coordinator", "coordinator ready", timeout=120)
    output = procs.output("coordinator")
    assert "WARNING: --insecure" in output and "TLS OFF" in output
    listed = _coordinator("status", "--state-dir", str(tmp_path / "s"), "--format", "json")
    assert json.loads(listed)["superlink"] == {"address": f"127.0.0.1:{port}",
                                                      "tls": False, "node_auth": False}
