"""`vesalius node start`: option validation, the data preflight, and WHY a coordinator fails.

Connection cases run on loopback against tiny servers made here (a port nobody listens on, a
plain TCP server that is not TLS, TLS servers with a certificate from another CA or for
another host); they stop in the preflight, before Flower starts. One case runs the real
``flower-supernode`` against a server that drops every connection, to check the supervision.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner, Result

from cli.app import app
from cli.supernode import AUTH_REFUSED, FlowerOutput, LinkProblem, classify_text, parse_address
from common.crypto.certs import make_certificates
from tests.client.dicom._factory import write_image, write_labels

PATIENTS = [f"QPAT-{p:03d}" for p in range(4)]


def _flat(text: str) -> str:
    """The output as one line: rich's panel borders and line wrapping removed."""
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def _assert_clean(result: Result, *secrets: str) -> None:
    assert "Traceback" not in result.output
    for secret in secrets:
        assert secret not in result.output, secret


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, list[str]]:
    """A usable node folder (4 labelled patients); returns it and its identifiers."""
    root = tmp_path / "site"
    studies = [generate_uid() for _ in PATIENTS]
    for p, (pid, study) in enumerate(zip(PATIENTS, studies, strict=True)):
        write_image(root / f"s{p}/img.dcm", patient_id=pid, study_uid=study)
    write_labels(root, [(pid, st, p % 2) for p, (pid, st) in enumerate(zip(PATIENTS, studies, strict=True))])
    return root, [*PATIENTS, *studies, str(root)]


def _start(root: Path, *args: str, home: Path | None = None) -> Result:
    extra = ["--flwr-home", str(home)] if home is not None else []
    return CliRunner().invoke(app, ["node", "start", "--data", str(root), *extra, *args])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """Start a loopback server whose connections ``handle`` serves; returns its port."""
    listeners: list[socket.socket] = []

    def start(handle: Callable[[socket.socket], None]) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        listeners.append(listener)

        def loop() -> None:
            while listener.fileno() != -1:
                try:
                    conn, _ = listener.accept()
                except (TimeoutError, OSError):
                    continue
                with conn:
                    try:
                        handle(conn)
                    except OSError:
                        pass

        threading.Thread(target=loop, daemon=True).start()
        return int(listener.getsockname()[1])

    yield start
    for listener in listeners:
        listener.close()


def _tls_handler(cert_dir: Path) -> Callable[[socket.socket], None]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_dir / "server.crt", cert_dir / "server.key")

    def handle(conn: socket.socket) -> None:
        conn.settimeout(3)
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    return handle


def _plain_http(conn: socket.socket) -> None:
    conn.settimeout(3)
    conn.recv(1024)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


# --- option validation: usage errors, exit 2, no traceback ------------------------------

@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--epsilon-cap", "-1"], "--epsilon-cap"),
        (["--epsilon-cap", "0"], "--epsilon-cap"),
        (["--epsilon-cap", "nan"], "--epsilon-cap"),
        (["--port", "0"], "--port"),
        (["--port", "70000"], "--port"),
        (["--min-release-count", "-1"], "--min-release-count"),
        (["--stats-noise-multiplier", "-0.5"], "--stats-noise-multiplier"),
        (["--max-attempts", "-2"], "--max-attempts"),
        (["--superlink", "no-port-here"], "--superlink"),
        (["--superlink", "host:99999"], "--superlink"),
    ],
)
def test_bad_numbers_and_addresses_are_usage_errors(
    data: tuple[Path, list[str]], args: list[str], option: str
) -> None:
    # Execute
    result = _start(data[0], "--insecure", *args)
    # Assert
    assert result.exit_code == 2
    assert option in result.output
    _assert_clean(result, *data[1])


def test_missing_certificate_file_is_named_by_option_not_path(data: tuple[Path, list[str]]) -> None:
    # Execute
    result = _start(data[0], "--root-certificates", "certs/nowhere-ca.crt")
    # Assert
    assert result.exit_code == 2
    assert "the --root-certificates file does not exist" in _flat(result.output)
    _assert_clean(result, "nowhere-ca", *data[1])


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        ([], "give --root-certificates"),
        (["--insecure", "--root-certificates", "x.crt"], "not both"),
    ],
)
def test_tls_choice_is_required_and_exclusive(
    data: tuple[Path, list[str]], args: list[str], sentence: str
) -> None:
    # Execute
    result = _start(data[0], *args)
    # Assert
    assert result.exit_code == 2 and sentence in _flat(result.output)
    _assert_clean(result, *data[1])


def test_missing_data_folder_is_a_usage_error(tmp_path: Path) -> None:
    # Execute
    result = _start(tmp_path / "absent-site", "--insecure")
    # Assert
    assert result.exit_code == 2
    assert "the --data folder does not exist" in _flat(result.output)
    _assert_clean(result, "absent-site")


# --- data preflight: exit 4 with the reasons ---------------------------------------------

def test_malformed_labels_refuse_the_start_cleanly(data: tuple[Path, list[str]]) -> None:
    # Prepare: a study listed twice with different labels, and a missing label
    root, secrets = data
    rows = (root / "labels.csv").read_text().splitlines()
    pid, study, _ = rows[1].split(",")
    (root / "labels.csv").write_text("\n".join([*rows, f"{pid},{study},0", f"{pid},{study},"]) + "\n")
    # Execute
    result = _start(root, "--insecure", "--max-attempts", "1")
    # Assert
    assert result.exit_code == 4
    out = _flat(result.output)
    assert "malformed row(s)" in out and "vesalius node check" in out
    _assert_clean(result, *secrets)


def test_folder_without_labels_refuses_the_start(tmp_path: Path) -> None:
    # Prepare
    root = tmp_path / "unlabelled"
    write_image(root / "a.dcm", patient_id="QPAT-LONE")
    # Execute
    result = _start(root, "--insecure")
    # Assert
    assert result.exit_code == 4
    assert "no labels.csv" in _flat(result.output)
    _assert_clean(result, "QPAT-LONE", str(root))


# --- coordinator preflight: classified, counted, bounded ---------------------------------

def test_nobody_listening_is_connection_refused_with_an_attempt_count(
    data: tuple[Path, list[str]], tmp_path: Path
) -> None:
    # Prepare
    port = _free_port()
    # Execute
    result = _start(data[0], "--insecure", "--superlink", f"127.0.0.1:{port}",
                    "--max-attempts", "2", home=tmp_path / "home")
    # Assert
    assert result.exit_code == 8
    out = _flat(result.output)
    assert (f"attempt 1: cannot reach the coordinator at 127.0.0.1:{port} (connection refused); "
            "retrying in 2 s") in out
    assert f"attempt 2: cannot reach the coordinator at 127.0.0.1:{port} (connection refused)" in out
    assert "check the --superlink address" in out
    _assert_clean(result, *data[1], str(tmp_path))


def test_plain_server_is_not_tls(
    data: tuple[Path, list[str]], tmp_path: Path, serve: Callable[..., int]
) -> None:
    # Prepare
    certs = make_certificates(tmp_path / "certs")
    port = serve(_plain_http)
    # Execute
    result = _start(data[0], "--root-certificates", str(certs.ca_cert),
                    "--superlink", f"127.0.0.1:{port}")
    # Assert: a TLS problem does not fix itself, so there is no retry
    assert result.exit_code == 8
    out = _flat(result.output)
    assert f"cannot reach the coordinator at 127.0.0.1:{port} (TLS: the server does not speak TLS)" in out
    assert "retrying" not in out
    _assert_clean(result, *data[1], str(tmp_path))


def test_certificate_from_another_ca_is_not_trusted_and_relative_ca_path_works(
    data: tuple[Path, list[str]], tmp_path: Path, serve: Callable[..., int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    server_side = make_certificates(tmp_path / "server-pki")
    make_certificates(tmp_path / "work" / "certs")  # another CA, given as a relative path
    port = serve(_tls_handler(server_side.ca_cert.parent))
    monkeypatch.chdir(tmp_path / "work")
    # Execute
    result = _start(data[0], "--root-certificates", "certs/ca.crt",
                    "--superlink", f"127.0.0.1:{port}")
    # Assert
    assert result.exit_code == 8
    out = _flat(result.output)
    assert "(TLS: certificate not trusted)" in out and "--root-certificates" in out
    _assert_clean(result, *data[1], str(tmp_path))


def test_certificate_for_another_host_is_a_host_name_problem(
    data: tuple[Path, list[str]], tmp_path: Path, serve: Callable[..., int]
) -> None:
    # Prepare
    certs = make_certificates(tmp_path / "pki", hosts=("coordinator.invalid",))
    port = serve(_tls_handler(certs.ca_cert.parent))
    # Execute
    result = _start(data[0], "--root-certificates", str(certs.ca_cert),
                    "--superlink", f"127.0.0.1:{port}")
    # Assert
    assert result.exit_code == 8
    assert "(TLS: the certificate does not name this host)" in _flat(result.output)
    _assert_clean(result, *data[1], str(tmp_path))


def test_supernode_retry_lines_become_counted_classified_sentences(
    data: tuple[Path, list[str]], tmp_path: Path, serve: Callable[..., int]
) -> None:
    # Prepare: the preflight connects; then every Flower request is dropped unanswered
    port = serve(lambda conn: None)
    # Execute: the real flower-supernode, bounded by --max-attempts
    result = _start(data[0], "--insecure", "--superlink", f"127.0.0.1:{port}",
                    "--port", str(_free_port()), "--max-attempts", "2", home=tmp_path / "home")
    # Assert
    out = _flat(result.output)
    assert result.exit_code == 8, out
    assert f"attempt 1: cannot reach the coordinator at 127.0.0.1:{port}" in out
    assert "retrying in" in out
    assert "Connection attempt failed" not in out  # Flower's own line is replaced, not doubled
    _assert_clean(result, *data[1], str(tmp_path))


# --- the translation of Flower's output ---------------------------------------------------

def test_flower_output_translation() -> None:
    # Prepare
    out = FlowerOutput("10.1.2.3:9092", lambda: None)
    lines = [
        "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 0.80 seconds",
        "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 1.92 seconds",
        "Traceback (most recent call last):",
        '  File "/opt/site/flwr/x.py", line 3, in f',
        "    raise KeyError(patient)",
        "KeyError: 'QPAT-001'",
        "INFO :      reading /data/site-1/QPAT-001/img.dcm",
    ]
    # Execute
    shown = [out.line(text) for text in lines]
    # Assert
    assert shown[0] == ("attempt 1: cannot reach the coordinator at 10.1.2.3:9092 "
                        "(the connection dropped); retrying in 0.8 s")
    assert shown[1] is not None and shown[1].startswith("attempt 2:")
    assert shown[2:5] == [None, None, None]
    assert shown[5] == "the SuperNode stopped on an internal error (KeyError); its traceback is not shown"
    assert shown[6] is not None and "/data/site-1" not in shown[6]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered "
         "via the CLI.", AUTH_REFUSED),
        ("Client error '401 Unauthorized' for url", AUTH_REFUSED),
        ("StatusCode.UNAUTHENTICATED", AUTH_REFUSED),
        ("StatusCode.PERMISSION_DENIED", AUTH_REFUSED),
        ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local "
         "issuer certificate (_ssl.c:1006)", "TLS: certificate not trusted"),
        ("[SSL: WRONG_VERSION_NUMBER] wrong version number", "TLS: the server does not speak TLS"),
        ("[Errno 111] Connection refused", "connection refused"),
        ("[Errno -2] Name or service not known", "host name not found"),
    ],
)
def test_classify_flower_and_openssl_texts(text: str, expected: LinkProblem | str) -> None:
    # Execute
    problem = classify_text(text)
    # Assert
    assert problem is not None
    assert (problem == expected) if isinstance(expected, LinkProblem) else problem.cause == expected


def test_auth_refusal_line_is_translated_and_remembered() -> None:
    # Prepare
    out = FlowerOutput("coordinator.example:9092", lambda: None)
    # Execute
    shown = out.line("[code: 2001] SuperNode authentication is enabled. All SuperNodes must be "
                     "registered via the CLI.")
    # Assert
    assert shown is not None and shown.startswith(
        "this node was refused by the coordinator at coordinator.example:9092 "
        "(authentication refused)")
    assert out.problem is AUTH_REFUSED


@pytest.mark.parametrize(
    ("address", "parsed"),
    [("127.0.0.1:9092", ("127.0.0.1", 9092)), ("[::1]:9092", ("::1", 9092)),
     ("link.hospital.org:443", ("link.hospital.org", 443))],
)
def test_parse_address(address: str, parsed: tuple[str, int]) -> None:
    # Execute / Assert
    assert parse_address(address) == parsed


def test_graded_labels_are_checked_with_the_task_the_hospital_declares(tmp_path: Path) -> None:
    # Prepare: a hospital whose labels are grades 0..2 (an ordinal task)
    from client.dicom.synth_tasks import synthesize_task_federation

    synthesize_task_federation(tmp_path / "d", task="ordinal", num_classes=3, n_sites=1,
                               patients_per_site=8, images_per_patient=(1, 1), image_size=16)
    root = tmp_path / "d" / "site-1"
    # Execute: the default (binary) rules, then the declared task's
    binary = _start(root, "--insecure", "--max-attempts", "1")
    ordinal = _start(root, "--insecure", "--max-attempts", "1", "--superlink", "127.0.0.1:1",
                     "--task", "ordinal", "--num-classes", "3")
    # Assert: binary refuses the grades with the data exit code; ordinal passes the data check
    # and goes on to the connection (refused on a closed port: exit 8)
    assert binary.exit_code == 4 and "other than 0 and 1" in _flat(binary.output)
    assert ordinal.exit_code == 8, ordinal.output
    assert "images with ordinal targets" in _flat(ordinal.output)


def test_flowers_refusal_of_an_unregistered_key_is_an_authentication_problem() -> None:
    from cli.supernode import classify_text

    problem = classify_text("ERROR :     [code: 2004] Failed to activate SuperNode.")
    assert problem is not None and problem.kind == "auth" and not problem.retryable
    assert "vesalius coordinator register" in problem.fix
