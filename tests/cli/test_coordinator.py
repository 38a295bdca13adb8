"""``vesalius coordinator``: inputs checked before anything starts, the SuperLink and Flower CLI
command lines built right, the site registry kept, refused keys named (no process started)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import cli.coordinator as coordinator
import cli.coordinator_start as coordinator_start
import cli.flwr_control as flwr_control
from cli.app import app
from client.node_keys import make_node_keys
from common.errors import ConnectionProblem
from server.coordinator_state import LinkSettings, StatePaths, load_nodes, save_links
from server.superlink_log import SuperLinkOutput, parse_refusal


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["coordinator", *args], env={"COLUMNS": "300"})
    return result.exit_code, result.output


class FakeSuperLink:
    """Stands in for :func:`cli.supernode.supervise`: records the command, starts nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict[str, str]]] = []

    def __call__(self, cmd: list[str], env: dict[str, str], **_: Any) -> int:
        self.calls.append((cmd, env))
        return 0


class FakeFlwr:
    """Stands in for :func:`cli.flwr_control.flwr_json`: records calls, answers like flwr 1.42."""

    def __init__(self, nodes: list[dict[str, Any]] | None = None) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []
        self.nodes = nodes or []
        self.next_id = 1000

    def __call__(self, args: list[str], flwr_home: Path, *, address: str,
                 options: list[str] | None = None) -> dict[str, Any]:
        self.calls.append((args, options or []))
        if args[:2] == ["supernode", "register"]:
            self.next_id += 1
            return {"success": True, "node-id": self.next_id}
        if args[:2] == ["supernode", "ls"]:
            return {"success": True, "nodes": self.nodes}
        if args == ["ls"]:
            return {"success": True, "runs": [{"run-id": "7", "fab-name": "vesalius",
                                               "status": "running", "elapsed": "00:01:02"}]}
        if args[0] == "run":
            return {"success": True, "run-id": "42"}
        return {"success": True}


@pytest.fixture
def fake_link(monkeypatch: pytest.MonkeyPatch) -> FakeSuperLink:
    fake = FakeSuperLink()
    monkeypatch.setattr(coordinator_start, "supervise", fake)
    monkeypatch.setattr(coordinator_start, "port_in_use", lambda host, port: False)
    return fake


@pytest.fixture
def fake_flwr(monkeypatch: pytest.MonkeyPatch) -> FakeFlwr:
    fake = FakeFlwr()
    monkeypatch.setattr(coordinator, "flwr_json", fake)
    monkeypatch.setattr(coordinator_start, "flwr_json", fake)
    return fake


def _state(tmp_path: Path, *, node_auth: bool = True) -> Path:
    """A state dir as `coordinator start` leaves it (coordinator.json), without a SuperLink."""
    state = tmp_path / "state"
    save_links(StatePaths(state), LinkSettings(address="127.0.0.1:9093", tls=node_auth,
                                               node_auth=node_auth, ca_cert=""))
    return state


def _certs(folder: Path) -> Path:
    from common.crypto.certs import make_certificates

    make_certificates(folder)
    return folder


# --- start -----------------------------------------------------------------------------------


def test_start_without_certificates_says_how_to_make_them_and_starts_nothing(
        tmp_path: Path, fake_link: FakeSuperLink) -> None:
    code, output = _invoke("start", "--state-dir", str(tmp_path / "state"))
    assert code == 3
    assert "vesalius federation certs --out" in output and "Traceback" not in output
    assert fake_link.calls == []


def test_unusable_certificate_files_are_one_sentence(tmp_path: Path,
                                                     fake_link: FakeSuperLink) -> None:
    folder = tmp_path / "certs"
    folder.mkdir()
    for name in ("ca.crt", "server.crt", "server.key"):
        (folder / name).write_text("placeholder")
    code, output = _invoke("start", "--state-dir", str(tmp_path / "s"), "--certificates", str(folder))
    assert code == 3 and "cannot be used" in output and fake_link.calls == []


def test_start_runs_the_superlink_with_tls_node_auth_and_its_state_on_disk(
        tmp_path: Path, fake_link: FakeSuperLink) -> None:
    # Prepare
    state = tmp_path / "state"
    _certs(state / "certs")
    # Execute
    code, output = _invoke("start", "--state-dir", str(state), "--port", "19555")
    # Assert: one SuperLink with TLS from <state>/certs, node auth, database and log in <state>
    assert code == 0, output
    (cmd, env), = fake_link.calls
    root = state.resolve()
    assert cmd[0].endswith("flower-superlink")
    assert cmd[cmd.index("--database") + 1] == str(root / "superlink.db")
    assert cmd[cmd.index("--log-file") + 1] == str(root / "superlink.log")
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(root / "certs" / "ca.crt")
    assert cmd[cmd.index("--ssl-keyfile") + 1] == str(root / "certs" / "server.key")
    assert cmd[cmd.index("--port") + 1] == "19555" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert "--disable-runtime-dependency-installation" in cmd
    assert env["VESALIUS_COORDINATOR_DIR"] == str(root)
    assert env["FLWR_HOME"] == str(root / "flwr-home")
    # the Flower CLI's connection reaches it on loopback, trusting its CA
    config = (root / "flwr-home" / "config.toml").read_text()
    assert 'address = "127.0.0.1:19555"' in config
    assert f'root-certificates = "{root / "certs" / "ca.crt"}"' in config
    assert json.loads((root / "coordinator.json").read_text())["node_auth"] is True
    assert "WARNING" not in output


def test_insecure_warns_on_every_start_and_turns_tls_and_node_auth_off(
        tmp_path: Path, fake_link: FakeSuperLink) -> None:
    for _ in range(2):
        code, output = _invoke("start", "--state-dir", str(tmp_path / "s"), "--insecure")
        assert code == 0, output
        assert "WARNING: --insecure" in output and "local development only" in output.lower()
    for cmd, _env in fake_link.calls:
        assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd
        assert "--ssl-certfile" not in cmd
    config = (tmp_path / "s" / "flwr-home" / "config.toml").read_text()
    assert "insecure = true" in config


def test_no_node_auth_keeps_tls_and_warns(tmp_path: Path, fake_link: FakeSuperLink) -> None:
    _certs(tmp_path / "certs")
    code, output = _invoke("start", "--state-dir", str(tmp_path / "s"), "--no-node-auth",
                           "--certificates", str(tmp_path / "certs"))
    assert code == 0, output
    (cmd, _env), = fake_link.calls
    assert "--enable-supernode-auth" not in cmd and "--ssl-certfile" in cmd
    assert "WARNING: --no-node-auth" in output


def test_a_port_in_use_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      fake_link: FakeSuperLink) -> None:
    monkeypatch.setattr(coordinator_start, "port_in_use", lambda host, port: True)
    code, output = _invoke("start", "--state-dir", str(tmp_path / "s"), "--insecure")
    assert code == 3 and "already in use" in output and fake_link.calls == []


def test_the_state_dir_defaults_to_vesalius_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  fake_link: FakeSuperLink) -> None:
    monkeypatch.setenv("VESALIUS_HOME", str(tmp_path / "vh"))
    code, output = _invoke("start", "--insecure")
    assert code == 0, output
    (cmd, _env), = fake_link.calls
    assert cmd[cmd.index("--database") + 1] == str((tmp_path / "vh" / "coordinator" /
                                                     "superlink.db").resolve())


# --- register / unregister -------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"not a key\n", b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"
                                     b"Mi2z7tqg6Qx3ZFTlqMUrqQyCHW8Vfz6l/dg1sTlYvVm x\n"])
def test_a_file_that_is_no_nist_ec_public_key_is_one_sentence(
        tmp_path: Path, fake_flwr: FakeFlwr, content: bytes) -> None:
    key = tmp_path / "key.pub"
    key.write_bytes(content)
    code, output = _invoke("register", "--site", "a", "--public-key", str(key),
                           "--state-dir", str(_state(tmp_path)))
    assert code == 3
    assert "not an OpenSSH elliptic-curve public key on a NIST curve" in output
    assert str(tmp_path) not in output and fake_flwr.calls == []


def test_the_private_key_is_refused_as_public_key(tmp_path: Path, fake_flwr: FakeFlwr) -> None:
    keys = make_node_keys(tmp_path / "k")
    code, output = _invoke("register", "--site", "a", "--public-key", str(keys.private_key),
                           "--state-dir", str(_state(tmp_path)))
    assert code == 3 and "never its private node-key" in output and fake_flwr.calls == []


def test_register_before_any_start_says_to_start_first(tmp_path: Path, fake_flwr: FakeFlwr) -> None:
    keys = make_node_keys(tmp_path / "k")
    code, output = _invoke("register", "--site", "a", "--public-key", str(keys.public_key),
                           "--state-dir", str(tmp_path / "nothing"))
    assert code == 3 and "vesalius coordinator start" in output and fake_flwr.calls == []


def test_register_calls_flowers_supernode_register_and_records_the_site(
        tmp_path: Path, fake_flwr: FakeFlwr) -> None:
    # Prepare
    state = _state(tmp_path)
    keys = make_node_keys(tmp_path / "k")
    # Execute
    code, output = _invoke("register", "--site", "hosp-a", "--public-key", str(keys.public_key),
                           "--state-dir", str(state))
    # Assert
    assert code == 0, output
    assert fake_flwr.calls == [(["supernode", "register", str(keys.public_key)],
                                ["--name", "hosp-a"])]
    record, = load_nodes(StatePaths(state.resolve())).records
    assert (record.site, record.fingerprint, record.node_id) == ("hosp-a", keys.fingerprint, "1001")
    assert record.active and keys.fingerprint in output


def test_a_site_already_registered_is_refused_unless_force(tmp_path: Path,
                                                          fake_flwr: FakeFlwr) -> None:
    # Prepare
    state = _state(tmp_path)
    first, second = make_node_keys(tmp_path / "k1"), make_node_keys(tmp_path / "k2")
    assert _invoke("register", "--site", "a", "--public-key", str(first.public_key),
                   "--state-dir", str(state))[0] == 0
    # Execute / Assert: refused without --force, nothing sent to the SuperLink
    code, output = _invoke("register", "--site", "a", "--public-key", str(second.public_key),
                           "--state-dir", str(state))
    assert code == 3 and "already registered" in output and "--force" in output
    assert len(fake_flwr.calls) == 1
    # --force: the new key is registered, then the old node unregistered
    code, output = _invoke("register", "--site", "a", "--public-key", str(second.public_key),
                           "--state-dir", str(state), "--force")
    assert code == 0, output
    assert [c[0][:2] for c in fake_flwr.calls[1:]] == [["supernode", "register"],
                                                        ["supernode", "unregister"]]
    assert fake_flwr.calls[2][0][2] == "1001"
    records = load_nodes(StatePaths(state.resolve())).records
    assert [(r.fingerprint, r.active) for r in records] == [(first.fingerprint, False),
                                                            (second.fingerprint, True)]


def test_one_key_cannot_be_two_sites(tmp_path: Path, fake_flwr: FakeFlwr) -> None:
    state = _state(tmp_path)
    keys = make_node_keys(tmp_path / "k")
    _invoke("register", "--site", "a", "--public-key", str(keys.public_key), "--state-dir", str(state))
    code, output = _invoke("register", "--site", "b", "--public-key", str(keys.public_key),
                           "--state-dir", str(state))
    assert code == 3 and "already registered as site a" in output


def test_unregister_revokes_and_a_revoked_key_is_never_registered_again(
        tmp_path: Path, fake_flwr: FakeFlwr) -> None:
    # Prepare
    state = _state(tmp_path)
    keys = make_node_keys(tmp_path / "k")
    _invoke("register", "--site", "a", "--public-key", str(keys.public_key), "--state-dir", str(state))
    # Execute
    code, output = _invoke("unregister", "--site", "a", "--state-dir", str(state))
    # Assert
    assert code == 0, output
    assert fake_flwr.calls[-1] == (["supernode", "unregister", "1001"], [])
    assert not load_nodes(StatePaths(state.resolve())).records[0].active
    code, output = _invoke("register", "--site", "a", "--public-key", str(keys.public_key),
                           "--state-dir", str(state))
    assert code == 3 and "revoked" in output and "vesalius node keys --force" in output
    code, output = _invoke("unregister", "--site", "a", "--state-dir", str(state))
    assert code == 3 and "no admitted site" in output


def test_register_on_a_coordinator_without_node_auth_is_refused(tmp_path: Path,
                                                               fake_flwr: FakeFlwr) -> None:
    keys = make_node_keys(tmp_path / "k")
    code, output = _invoke("register", "--site", "a", "--public-key", str(keys.public_key),
                           "--state-dir", str(_state(tmp_path, node_auth=False)))
    assert code == 3 and "--insecure" in output and fake_flwr.calls == []


def test_a_bad_site_name_is_a_usage_error(tmp_path: Path, fake_flwr: FakeFlwr) -> None:
    keys = make_node_keys(tmp_path / "k")
    code, output = _invoke("register", "--site", "../x", "--public-key", str(keys.public_key),
                           "--state-dir", str(_state(tmp_path)))
    assert code == 2 and "site name" in output


# --- status ----------------------------------------------------------------------------------


def test_status_names_flowers_nodes_by_site_and_lists_runs(tmp_path: Path,
                                                          fake_flwr: FakeFlwr) -> None:
    # Prepare: one site registered here and online, one node registered with flwr directly
    state = _state(tmp_path)
    keys = make_node_keys(tmp_path / "k")
    _invoke("register", "--site", "a", "--public-key", str(keys.public_key), "--state-dir", str(state))
    fake_flwr.nodes = [{"node-id": "1001", "status": "online", "created-at": "t0"},
                       {"node-id": "55", "status": "registered", "created-at": "t1"}]
    # Execute
    code, output = _invoke("status", "--state-dir", str(state), "--format", "json")
    # Assert
    assert code == 0, output
    doc = json.loads(output)
    assert [c[0] for c in fake_flwr.calls[-2:]] == [["supernode", "ls"], ["ls"]]
    a, other = doc["nodes"]
    assert (a["site"], a["fingerprint"], a["connected"]) == ("a", keys.fingerprint, True)
    assert (other["site"], other["connected"], other["status"]) == (None, False, "registered")
    assert doc["runs"][0]["run_id"] == "7" and doc["superlink"]["node_auth"] is True
    code, output = _invoke("status", "--state-dir", str(state))
    assert code == 0 and "(not registered here)" in output and "online" in output
    assert "1 node(s) were registered with Flower directly" in output


def test_flwr_commands_put_the_connection_after_the_arguments() -> None:
    cmd = flwr_control.flwr_command(["supernode", "register", "k.pub"], ["--name", "a"])
    assert cmd[1:] == ["supernode", "register", "k.pub", "vesalius", "--format", "json",
                       "--name", "a"]


def test_flwr_refusals_and_an_absent_superlink_become_sentences(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([
        '{"success": false, "error-message": "Using SuperLink: vesalius (x)\\n\\n[code: 23] '
        'Public key already in use."}',
        '{"success": false, "error-message": "Connection to the SuperLink is unavailable."}',
    ])
    monkeypatch.setattr(flwr_control.subprocess, "run", lambda *a, **kw: subprocess.CompletedProcess(
        a, 0, stdout=next(answers), stderr=""))
    with pytest.raises(flwr_control.FlwrFailure, match=r"\[code: 23\] Public key already in use"):
        flwr_control.flwr_json(["supernode", "register", "k"], tmp_path, address="h:1")
    with pytest.raises(ConnectionProblem, match="does not answer at h:1"):
        flwr_control.flwr_json(["supernode", "ls"], tmp_path, address="h:1")


# --- the SuperLink's output --------------------------------------------------------------------


def _refusal_line(public_pem: bytes, path: str = "activate-node", code: int = 2004) -> str:
    return (f"\x1b[91mERROR \x1b[0m:     [/v1/fleet/{path}][ApiError:{code}] Attempted to "
            f"register SuperNode with public key: {public_pem!r}, exception: No SuperNode found "
            "with the given public key.\n")


def _pem(keys_dir: Path) -> tuple[bytes, str]:
    from cryptography.hazmat.primitives import serialization

    keys = make_node_keys(keys_dir)
    public = serialization.load_ssh_public_key(keys.public_key.read_bytes())
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo), keys.fingerprint


def test_a_refused_key_is_named_by_the_fingerprint_node_keys_printed(tmp_path: Path) -> None:
    pem, fingerprint = _pem(tmp_path / "k")
    output = SuperLinkOutput("h:1", lambda fp: None)
    shown = output.line(_refusal_line(pem))
    assert shown == f"refused a node whose key is not registered: {fingerprint}"
    self_reg = output.line(_refusal_line(pem, "register-node", 2001))
    assert self_reg is not None and "tried to register itself" in self_reg
    assert parse_refusal("INFO : [Fleet.ActivateNode] Activated node_id=1") is None


def test_a_revoked_key_is_named_by_its_site(tmp_path: Path, fake_flwr: FakeFlwr) -> None:
    state = _state(tmp_path)
    keys = make_node_keys(tmp_path / "k")
    _invoke("register", "--site", "hosp-a", "--public-key", str(keys.public_key),
            "--state-dir", str(state))
    _invoke("unregister", "--site", "hosp-a", "--state-dir", str(state))
    from cryptography.hazmat.primitives import serialization

    pem = serialization.load_ssh_public_key(keys.public_key.read_bytes()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    registry = load_nodes(StatePaths(state.resolve()))
    shown = SuperLinkOutput("h:1", registry.by_fingerprint).line(_refusal_line(pem))
    assert shown is not None and keys.fingerprint in shown and "site hosp-a, revoked" in shown


def test_a_joining_or_leaving_node_is_named_by_its_site(tmp_path: Path,
                                                       fake_flwr: FakeFlwr) -> None:
    state = _state(tmp_path)
    keys = make_node_keys(tmp_path / "k")
    _invoke("register", "--site", "hosp-a", "--public-key", str(keys.public_key),
            "--state-dir", str(state))
    registry = load_nodes(StatePaths(state.resolve()))
    output = SuperLinkOutput("h:1", registry.by_fingerprint, registry.by_node_id)
    assert output.line("\x1b[92mINFO \x1b[0m:      [Fleet.ActivateNode] Activated node_id=1001"
                       ) == "site hosp-a joined (node id 1001)"
    assert output.line("INFO :      [Fleet.DeactivateNode] Deactivated node_id=77"
                       ) == "a node not registered here left (node id 77)"


def test_access_lines_are_quiet_except_refused_signatures() -> None:
    output = SuperLinkOutput("h:1", lambda fp: None)
    ok = '2026-12-06T12:36:24.909Z INFO [uvicorn.access] 127.0.0.1:34554 - "POST /v1/fleet/pull-messages HTTP/1.1" 200'
    refused = ok.replace(" 200", " 401")
    assert output.line(ok) is None
    shown = output.line(refused)
    assert shown is not None and "refused a request from 127.0.0.1" in shown
    assert output.line("INFO :      ControlServicer.ListNodes") is None
    local = ok.replace("/v1/fleet/pull-messages", "/v1/control/register-node")
    assert output.line(local) is None  # the operator's own flwr/vesalius commands
    remote = output.line(local.replace("127.0.0.1:34554", "10.1.2.3:4000"))
    assert remote is not None and "WARNING: the Control API was called from 10.1.2.3" in remote
    assert output.line("ERROR: [Errno 98] address already in use") is not None and output.bind_failed


# --- --resume ----------------------------------------------------------------------------------


def test_resume_resubmits_the_active_run_with_resume_from(tmp_path: Path,
                                                          fake_flwr: FakeFlwr) -> None:
    from server.resume import write_active_run

    # Prepare: the run a deployed ServerApp recorded before the coordinator died
    state = _state(tmp_path)
    paths = StatePaths(state.resolve())
    out = tmp_path / "run-out"
    write_active_run(paths.root, out, {"num-server-rounds": 5, "model": "cnn"})
    settings = LinkSettings(address="127.0.0.1:9093", tls=True, node_auth=True, ca_cert="")
    # Execute
    said = coordinator_start.resume_active_run(paths, settings)
    # Assert
    (args, options), = fake_flwr.calls
    assert args[0] == "run" and options[0] == "--run-config"
    assert options[1] == (f'num-server-rounds=5 model="cnn" resume-from="{out.resolve()}"')
    assert "Flower run 42" in said and str(out.resolve() / "report.json") in said


def test_resume_without_an_active_run_says_nothing_to_resume(tmp_path: Path,
                                                             fake_flwr: FakeFlwr) -> None:
    paths = StatePaths(_state(tmp_path).resolve())
    settings = LinkSettings(address="127.0.0.1:9093", tls=True, node_auth=True, ca_cert="")
    assert coordinator_start.resume_active_run(paths, settings).startswith("nothing to resume")
    assert fake_flwr.calls == []
