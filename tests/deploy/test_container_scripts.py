"""The scripts the images run: the preflight entry point, the health checks and the setup
script (run here for real with the project's own ``vesalius``)."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.deploy_helpers import DEPLOY, load_script

preflight = load_script("preflight")
healthcheck = load_script("healthcheck")

# A node container as compose makes it: root overlay, data bind-mounted read-only, ledger
# and keys on volumes, the CA read-only (proc(5) mountinfo lines; "\040" is a space).
NODE_MOUNTINFO = """\
600 500 0:50 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/l,upperdir=/u
601 600 0:51 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
602 600 8:1 /srv/dicom /data ro,relatime - ext4 /dev/sda1 rw
603 600 8:1 /var/lib/docker/volumes/a-ledger/_data /var/lib/vesalius/ledger rw,relatime - ext4 /dev/sda1 rw
604 600 8:1 /var/lib/docker/volumes/a-keys/_data /var/lib/vesalius/keys ro,relatime - ext4 /dev/sda1 rw
605 600 8:1 /var/lib/docker/volumes/ca/_data /var/lib/vesalius/ca ro,relatime - ext4 /dev/sda1 rw
606 600 8:1 /srv/odd\\040name /mnt/odd\\040name ro,relatime - ext4 /dev/sda1 rw
"""
NODE_ENV = {"VESALIUS_READONLY_MOUNTS": "/data",
            "VESALIUS_VOLUME_MOUNTS": "/var/lib/vesalius/ledger /var/lib/vesalius/keys"}
NODE_START = ["vesalius", "node", "start", "--data", "/data", "--superlink", "coordinator:9093",
              "--root-certificates", "/var/lib/vesalius/ca/ca.crt",
              "--auth-private-key", "/var/lib/vesalius/keys/node-key",
              "--ledger-dir", "/var/lib/vesalius/ledger"]


def _mounts(text: str = NODE_MOUNTINFO) -> list[object]:
    return preflight.parse_mountinfo(text)


# --- preflight -----------------------------------------------------------------------------------


def test_mountinfo_parsing() -> None:
    mounts = {m.point: m.read_only for m in _mounts()}
    assert mounts["/"] is False and mounts["/data"] is True
    assert mounts["/var/lib/vesalius/ledger"] is False
    assert mounts["/mnt/odd name"] is True  # octal escape undone


@pytest.mark.parametrize(("path", "point"), [
    ("/data", "/data"), ("/data/site-1/x.dcm", "/data"), ("/database", "/"),
    ("/var/lib/vesalius/ledger/ledger.jsonl", "/var/lib/vesalius/ledger"), ("/tmp", "/"),
])
def test_mount_of_is_the_deepest_mount_above(path: str, point: str) -> None:
    assert preflight.mount_of(path, _mounts()).point == point


def test_node_as_compose_mounts_it_passes() -> None:
    assert preflight.problems(NODE_START, _mounts(), NODE_ENV) == []


def test_writable_data_is_refused() -> None:
    text = NODE_MOUNTINFO.replace("/data ro,relatime", "/data rw,relatime")
    (problem,) = preflight.problems(NODE_START, _mounts(text), NODE_ENV)
    assert problem.startswith("/data is writable")


def test_data_folder_given_elsewhere_is_checked_too() -> None:
    argv = [*NODE_START[:4], "/home/vesalius/copy", *NODE_START[5:]]
    (problem,) = preflight.problems(argv, _mounts(), NODE_ENV)
    assert problem.startswith("/home/vesalius/copy is writable")


def test_ledger_in_the_container_layer_is_refused() -> None:
    text = "\n".join(ln for ln in NODE_MOUNTINFO.splitlines() if "vesalius/ledger" not in ln)
    (problem,) = preflight.problems(NODE_START, _mounts(text), NODE_ENV)
    assert problem.startswith("/var/lib/vesalius/ledger is not a mounted volume")


def test_key_file_off_a_volume_is_refused() -> None:
    argv = [a if a != "/var/lib/vesalius/keys/node-key" else "/home/vesalius/node-key"
            for a in NODE_START]
    (problem,) = preflight.problems(argv, _mounts(), NODE_ENV)
    assert problem.startswith("/home/vesalius is not a mounted volume")


@pytest.mark.parametrize("argv", [
    ["vesalius", "--help"], ["vesalius", "audit", "show", "--ledger", "/x"],
    ["sh", "/opt/vesalius/setup.sh", "init"], ["python", "-c", "pass"],
])
def test_other_commands_are_not_checked(argv: list[str]) -> None:
    assert preflight.problems(argv, _mounts("1 0 0:1 / / rw - overlay o rw"), NODE_ENV) == []


def test_coordinator_state_must_be_a_volume() -> None:
    argv = ["vesalius", "coordinator", "start", "--state-dir", "/var/lib/vesalius/coordinator"]
    root_only = _mounts("1 0 0:1 / / rw - overlay o rw")
    (problem,) = preflight.problems(argv, root_only, {})
    assert problem.startswith("/var/lib/vesalius/coordinator is not a mounted volume")
    on_volume = _mounts("1 0 0:1 / / rw - overlay o rw\n"
                        "2 1 8:1 /v /var/lib/vesalius/coordinator rw - ext4 /dev/sda1 rw")
    assert preflight.problems(argv, on_volume, {}) == []


def _run_preflight(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DEPLOY / "preflight.py"), *argv],
                          env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                          text=True, timeout=60)


def test_preflight_refuses_with_ex_config(tmp_path: Path) -> None:
    """On this machine nothing is mounted read-only at the data folder: exit 78, no start."""
    marker = tmp_path / "started"
    result = _run_preflight("vesalius", "node", "start", "--data", str(tmp_path),
                            "--ledger-dir", str(tmp_path / "ledger"),
                            VESALIUS_READONLY_MOUNTS="", VESALIUS_VOLUME_MOUNTS="")
    assert result.returncode == preflight.EX_CONFIG
    assert f"refusing to start: {tmp_path} is writable" in result.stderr
    assert not marker.exists()


def test_preflight_execs_other_commands() -> None:
    """The command replaces the preflight process (same PID) and its exit status is kept."""
    result = _run_preflight("sh", "-c", 'echo "pid $$"; exit 3')
    assert result.returncode == 3
    assert result.stdout.startswith("pid ")


def test_preflight_names_a_missing_command() -> None:
    result = _run_preflight("no-such-program-here")
    assert result.returncode == 127 and "cannot run no-such-program-here" in result.stderr


# --- health checks -------------------------------------------------------------------------------


SUPERNODE = ["/opt/vesalius/venv/bin/python", "/opt/vesalius/venv/bin/flower-supernode",
             "--superlink", "127.0.0.1:{port}", "--root-certificates", "{ca}", "--port", "9094"]


def test_find_program_through_interpreter() -> None:
    cmdlines = [["tini", "--", "python", "/opt/vesalius/preflight.py"],
                ["/opt/vesalius/venv/bin/python", "/opt/vesalius/venv/bin/vesalius", "node"],
                ["/opt/vesalius/venv/bin/python", "/opt/vesalius/venv/bin/flower-supernode",
                 "--superlink=coordinator:9093"]]
    found = healthcheck.find_program("flower-supernode", cmdlines)
    assert found == cmdlines[2]
    assert healthcheck.option(found, "--superlink") == "coordinator:9093"
    assert healthcheck.find_program("flower-superlink", cmdlines) is None


def test_warm_worker_supernode_is_found() -> None:
    """`node start` may run the SuperNode as ``python -m client.warm_worker.supernode`` (seen
    in the compose trial); the health check finds it and reads its options."""
    cmdlines = [["/opt/vesalius/venv/bin/python3", "/opt/vesalius/venv/bin/vesalius", "node",
                 "start", "--superlink", "coordinator:9093"],
                ["/opt/vesalius/venv/bin/python3", "-m", "client.warm_worker",
                 "--runtime-api-address", "127.0.0.1:9094"],
                ["/opt/vesalius/venv/bin/python3", "-m", "client.warm_worker.supernode",
                 "--superlink", "coordinator:9093", "--root-certificates", "/ca/ca.crt"]]
    found = healthcheck.find_supernode(cmdlines)
    assert found == cmdlines[2]
    assert healthcheck.option(found, "--root-certificates") == "/ca/ca.crt"
    assert healthcheck.find_supernode(cmdlines[:2]) is None


def test_processes_reads_this_process() -> None:
    mine = healthcheck.processes()
    assert any(Path(argv[0]).name.startswith("python") for argv in mine)


def test_node_unhealthy_without_supernode() -> None:
    assert "no SuperNode process" in healthcheck.check_node([["vesalius", "node"]])


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS server on loopback with a certificate from the project's own CA helper."""
    from common.crypto.certs import make_certificates

    paths = make_certificates(tmp_path / "certs", hosts=["127.0.0.1"], valid_days=1)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(paths.server_cert), str(paths.server_key))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], paths.ca_cert
    stop.set()
    listener.close()
    thread.join(timeout=5)


def test_node_healthy_when_its_coordinator_answers_tls(tls_server: tuple[int, Path]) -> None:
    port, ca = tls_server
    argv = [a.format(port=port, ca=ca) for a in SUPERNODE]
    assert healthcheck.check_node([argv]) is None


def test_node_unhealthy_with_a_foreign_ca(tls_server: tuple[int, Path], tmp_path: Path) -> None:
    from common.crypto.certs import make_certificates

    port, _ = tls_server
    other = make_certificates(tmp_path / "other", hosts=["127.0.0.1"], valid_days=1)
    argv = [a.format(port=port, ca=other.ca_cert) for a in SUPERNODE]
    problem = healthcheck.check_node([argv])
    assert problem is not None and "cannot reach the coordinator" in problem


def test_coordinator_health_needs_process_and_port() -> None:
    superlink = [["/opt/vesalius/venv/bin/python", "/opt/vesalius/venv/bin/flower-superlink"]]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert healthcheck.check_coordinator(superlink, port) is None
        assert healthcheck.check_coordinator([], port) == "no flower-superlink process"
    problem = healthcheck.check_coordinator(superlink, port)
    assert problem is not None and problem.startswith(f"port {port} does not accept")


def test_healthcheck_exit_status(tmp_path: Path) -> None:
    """A container whose only process is the health check itself (an empty /proc here: this
    machine may run other tests' SuperNodes)."""
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "cmdline").write_bytes(b"python\0/opt/vesalius/healthcheck.py\0node\0")
    result = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), "node",
                             "--proc", str(tmp_path)],
                            capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 1 and result.stdout.startswith("unhealthy: no SuperNode")


# --- setup.sh init, for real ---------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_setup_init_makes_certificates_and_keys_once(tmp_path: Path) -> None:
    vesalius = Path(sys.executable).parent / "vesalius"
    if not vesalius.is_file():
        pytest.skip("the vesalius console script is not installed in this environment")
    env = {"PATH": f"{vesalius.parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "VESALIUS_HOME": str(tmp_path / "home"),
           "VESALIUS_STATE_DIR": str(tmp_path / "state"), "VESALIUS_CA_DIR": str(tmp_path / "ca"),
           "VESALIUS_SITE_KEYS": str(tmp_path / "keys"), "VESALIUS_SITES": "hospital-a hospital-b"}
    run = ["sh", str(DEPLOY / "setup.sh"), "init"]
    first = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    certs = tmp_path / "state" / "certs"
    assert {p.name for p in certs.iterdir()} >= {"ca.crt", "ca.key", "server.crt", "server.key"}
    # the hospitals' CA volume gets the public certificate and nothing else
    assert [p.name for p in (tmp_path / "ca").iterdir()] == ["ca.crt"]
    assert (tmp_path / "ca" / "ca.crt").read_bytes() == (certs / "ca.crt").read_bytes()
    for site in ("hospital-a", "hospital-b"):
        key = tmp_path / "keys" / site / "node-key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert (tmp_path / "keys" / site / "node-key.pub").read_text().startswith("ecdsa-sha2-")
    before = _tree(tmp_path)
    second = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert _tree(tmp_path) == before, "a second run changed files"
    assert "kept those" in second.stdout and second.stdout.count("kept its key pair") == 2
