"""Issue 15's acceptance, with real processes on loopback, driven through the CLI.

`vesalius coordinator start` (TLS, SuperNode authentication, persistent state) and three
registered hospitals (`vesalius node keys` + `coordinator register` + `node start
--auth-private-key`, warm workers) run a 3-round federation with secure aggregation:

* a fourth node holding a key nobody registered is refused, and the coordinator names its key;
* hospital 3 is killed (SIGKILL) once round 1 is in: the run goes on with the two others, and
  the report names `site-3` as dropped, once;
* once round 2 is in, the coordinator is killed (SIGKILL) and restarted with `coordinator
  start --resume`: the interrupted run is resubmitted from its last checkpoint under the same
  run id and completes round 3 with the two survivors;
* every surviving hospital's ledger holds each round of the run exactly once (no round lost
  or charged twice across the crash);
* every reply that left each hospital, captured by the node's capture mod
  (`VESALIUS_CAPTURE_DIR`), is searched for the data folder's paths, the DICOM files' identifying
  values and exception text: none is found.

Slow (several minutes: the SuperLink declares a killed node gone after two missed 30 s
heartbeats), run in CI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from cli.app import app
from cli.flower import flower_env
from client.capture import CAPTURE_ENV, CAPTURE_FILE
from client.node_keys import fingerprint
from common.crypto.certs import make_certificates
from common.ledger import Ledger, verify_ledger

pytestmark = pytest.mark.slow

VESALIUS = str(Path(sys.executable).parent / "vesalius")
SITES = ("site-1", "site-2", "site-3")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process and everything it started (no chance to clean up: a crash)."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


class Processes:
    """Children in their own sessions with their own logs; every tree stopped at the end."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen([VESALIUS, *args], env={**self.env, **env}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout: float) -> None:
        _until(lambda: text in self.output(name), timeout,
               f"{text!r} in the output of {name}", lambda: self.output(name)[-3000:])

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                tree = _descendants(proc.pid)
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
                for pid in [proc.pid, *tree]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def sizes(self, names: tuple[str, ...]) -> tuple[int, ...]:
        """How much each named process has logged (it grows while its node answers)."""
        return tuple((self.logs / f"{n}.log").stat().st_size for n in names)

    def tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                         for p in sorted(self.logs.glob("*.log")))


def _until(check: Callable[[], bool], timeout: float, what: str,
           detail: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout} s\n{detail()}")


def _until_while_busy(check: Callable[[], bool], quiet_s: float, cap_s: float, what: str,
                      busy: Callable[[], object], detail: Callable[[], str]) -> None:
    """Wait for ``check`` while ``busy()`` keeps changing: fail once it has not changed for
    ``quiet_s`` (the run stalled) or after ``cap_s`` in all.

    The resumed run's statistics phase is dozens of secure sums, each a few node round trips;
    on a loaded 2-core CI machine it took over 15 min once while every node was still
    answering, so a fixed deadline failed a run that was progressing.
    """
    start = last_change = time.monotonic()
    seen = busy()
    while (now := time.monotonic()) - start < cap_s:
        if check():
            return
        if (current := busy()) != seen:
            seen, last_change = current, now
        elif now - last_change > quiet_s:
            raise AssertionError(f"{what}: nothing moved for {quiet_s:.0f} s "
                                 f"({now - start:.0f} s in all)\n{detail()}")
        time.sleep(1.0)
    raise AssertionError(f"{what} did not happen within {cap_s:.0f} s\n{detail()}")


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


def _cli(*args: str) -> str:
    done = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    assert done.exit_code == 0, done.output
    return done.stdout


def _report(out: Path) -> dict[str, object]:
    try:
        return json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return {}


def _report_summary(out: Path) -> str:
    """The report's state in a few lines, printed last on a failure (the logs come before)."""
    doc = _report(out)
    rounds = [(r.get("round"), r.get("status"), sorted(str(t["site"]) for t in r.get("train", [])))
              for r in doc.get("rounds", [])]
    return (f"\n--- report.json: status {doc.get('status')!r}, reason {doc.get('reason')!r}, "
            f"rounds {rounds}, resumed {doc.get('resumed')}, final "
            f"{'yes' if doc.get('final') else 'no'}, inference "
            f"{(doc.get('inference') or {}).get('status')!r}")


def _rounds_trained(out: Path) -> list[int]:
    return [int(r["round"]) for r in _report(out).get("rounds", []) if r.get("train")]


def _identifying_values(data: Path) -> set[str]:
    """What must never leave a hospital: its file paths and its DICOM files' identifiers."""
    values = {str(data)}
    for path in data.rglob("*"):
        if not path.is_file():
            continue
        values.add(str(path))
        if path.suffix.lower() != ".dcm":
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID",
                        "SOPInstanceUID", "AccessionNumber", "StudyID"):
            value = str(getattr(ds, keyword, "") or "")
            if len(value) >= 4:
                values.add(value)
    return values


def test_registered_nodes_secure_rounds_and_a_dropped_node(
        tmp_path: Path, procs: Processes) -> None:
    # Prepare: certificates, three hospitals' data and keys, an unregistered fourth key
    state, data, out = tmp_path / "coordinator", tmp_path / "data", tmp_path / "run"
    make_certificates(state / "certs")
    ca = state / "certs" / "ca.crt"
    _cli("synth", "--sites", "3", "--patients", "40", "--out", str(data), "--seed", "15")
    keys = {}
    for site in (*SITES, "rogue"):
        _cli("node", "keys", "--out", str(tmp_path / f"keys-{site}"), "--site-name", site)
        keys[site] = tmp_path / f"keys-{site}"
    port = _free_port()
    coordinator = ["coordinator", "start", "--state-dir", str(state), "--host", "127.0.0.1",
                   "--port", str(port)]
    procs.start("coordinator", coordinator)
    procs.wait_for("coordinator", "coordinator ready", timeout=180)
    for site in SITES:
        _cli("coordinator", "register", "--site", site, "--public-key",
             str(keys[site] / "node-key.pub"), "--state-dir", str(state))

    def node(site: str, data_site: str) -> list[str]:
        return ["node", "start", "--data", str(data / data_site), "--superlink",
                f"127.0.0.1:{port}", "--root-certificates", str(ca), "--auth-private-key",
                str(keys[site] / "node-key"), "--site-name", site, "--port", str(_free_port()),
                "--flwr-home", str(tmp_path / f"home-{site}"), "--ledger-dir",
                str(tmp_path / f"ledger-{site}"), "--min-release-count", "1"]

    for site in SITES:
        procs.start(site, node(site, site), **{CAPTURE_ENV: str(tmp_path / f"capture-{site}")})
    rogue = procs.start("rogue", [*node("rogue", "site-1"), "--max-attempts", "3"])
    # the unregistered key is refused, and the coordinator names it
    assert rogue.wait(timeout=240) != 0
    procs.wait_for("coordinator", "refused a node whose key is not registered: "
                   + fingerprint((keys["rogue"] / "node-key.pub").read_bytes()), timeout=60)

    # Execute: the operator submits 3 rounds with secure aggregation (two survivors allowed)
    operator = procs.start("operator", [
        "federation", "run", "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(ca),
        "--rounds", "3", "--min-nodes", "2", "--secure-aggregation", "on", "--min-survivors",
        "2", "--batch-size", "8", "--image-size", "16", "--out", str(out),
        "--flwr-home", str(tmp_path / "operator-home")])
    _until(lambda: 1 in _rounds_trained(out), 420, "round 1", procs.tails)
    _kill_tree(procs.procs["site-3"])  # a hospital crashes in round 2
    _until(lambda: 2 in _rounds_trained(out), 420, "round 2 without site-3", procs.tails)
    # ... then the coordinator crashes (SIGKILL) and its operator restarts it with --resume
    _kill_tree(procs.procs["coordinator"])
    _kill_tree(operator)  # it followed a run whose coordinator is gone
    procs.start("coordinator-resumed", [*coordinator, "--resume"])
    procs.wait_for("coordinator-resumed", "resumed the interrupted run", timeout=240)
    _until_while_busy(lambda: _report(out).get("status") == "completed", 300, 2400,
                      "the resumed run completed", lambda: procs.sizes(SITES[:2]),
                      lambda: procs.tails() + _report_summary(out))

    # Assert: the run completed 3 rounds, the last two with the two survivors
    doc = _report(out)
    assert doc["status"] == "completed", (doc.get("reason"), procs.tails())
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3]
    # ... resumed once, after round 2 (the last aggregated one), under the same run id
    assert [r["from_round"] for r in doc["resumed"]] == [2], doc.get("resumed")
    assert doc["secure_aggregation"], doc.get("secure_aggregation")
    trained = [sorted(str(row["site"]) for row in r["train"]) for r in doc["rounds"]]
    assert trained[0] == list(SITES) and trained[1] == trained[2] == ["site-1", "site-2"]
    # ... site-3 is named as dropped, once, by its site name
    assert [row["site"] for row in doc["dropped"]] == ["site-3"]
    # killed once round 1's training was in: lost in round 1's evaluation or round 2's setup
    assert doc["dropped"][0]["round"] in (1, 2)
    every_error_site = {str(e["site"]) for r in doc["rounds"] for e in r["errors"]}
    assert every_error_site <= {"site-3"}, every_error_site
    # ... and no surviving hospital's ledger counts a round twice or loses one
    for site in ("site-1", "site-2"):
        path = tmp_path / f"ledger-{site}" / "ledger.jsonl"
        rounds = [r.entry.round for r in Ledger(path).read().records
                  if r.entry.release == "train" and r.entry.run_id == doc["run_id"]]
        assert rounds == [1, 2, 3], (site, rounds)
        assert verify_ledger(path).ok
    # ... nothing identifying left any hospital
    secrets = _identifying_values(data)
    for site in SITES:
        sent = (tmp_path / f"capture-{site}" / CAPTURE_FILE).read_text()
        assert sent.count("\n") >= 3, site
        for value in secrets:
            assert value not in sent, (site, "an identifying value left the hospital")
        for text in ("Traceback", "Error(", "Exception", "/tmp/", str(tmp_path)):
            assert text not in sent, (site, text)
