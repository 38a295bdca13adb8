"""``vesalius coordinator start``: run the coordinator's SuperLink, supervised.

Phases: resolve the state folder and check the TLS certificates (a missing one is one
sentence naming ``vesalius federation certs``); write the ``vesalius`` connection of the
Flower CLI and ``coordinator.json``; run ``flower-superlink`` with TLS, SuperNode
authentication (only registered hospitals join), the state database and log file in the state
folder, and no runtime dependency installation, as a supervised child
(:func:`cli.supernode.supervise`: signals forwarded, the child reaped); its output is
translated by :class:`server.superlink_log.SuperLinkOutput`, which names the fingerprint of
every refused key. A watcher thread says when the SuperLink answers and, with ``--resume``,
resubmits the run the coordinator was running when it stopped
(:func:`server.resume.read_active_run`).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cli.console import err_console
from cli.flower import APP_DIR, executable, flower_env, toml_value, write_connection
from cli.flwr_control import flwr_json
from cli.supernode import FlowerOutput, supervise
from common import messages as k
from common.errors import ConfigError, VesaliusError
from server.coordinator_state import (
    LinkSettings,
    StatePaths,
    default_state_dir,
    load_nodes,
    save_links,
)
from server.superlink_log import SuperLinkOutput

CERT_FILES = ("ca.crt", "server.crt", "server.key")
READY_TIMEOUT_S = 120.0
INSECURE_WARNING = ("WARNING: --insecure: this coordinator serves plain text without TLS and "
                    "admits any SuperNode without authentication. For local development only: "
                    "never use it with patient data or beyond this machine.")
NO_AUTH_WARNING = ("WARNING: --no-node-auth: any process that trusts the CA certificate can "
                   "join this coordinator as a hospital; register hospitals and leave node "
                   "authentication on outside tests.")


def say(text: str) -> None:
    """One line on stderr, as typed (no markup)."""
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def state_paths(state_dir: Path | None) -> StatePaths:
    """The state folder from ``--state-dir`` (default ``$VESALIUS_HOME/coordinator``)."""
    root = state_dir.expanduser() if state_dir is not None else default_state_dir()
    return StatePaths(root.resolve())


def check_certificates(folder: Path, *, given: bool) -> Path:
    """``folder`` if it holds ``ca.crt``, ``server.crt`` and ``server.key``.

    Raises
    ------
    ConfigError
        One is missing: the sentence says how to make them.
    """
    missing = [name for name in CERT_FILES if not (folder / name).is_file()]
    how = (f"make them with `vesalius federation certs --out {folder} --host <this "
           "coordinator's host name or IP>` (or give --certificates DIR), or use --insecure "
           "for local development only")
    if missing:
        where = "the --certificates folder" if given else f"{folder}"
        raise ConfigError(f"no TLS certificates ({', '.join(missing)} missing) in {where}: {how}",
                          safe_reason="TLS certificates missing")
    try:
        for name in ("ca.crt", "server.crt"):
            x509.load_pem_x509_certificate((folder / name).read_bytes())
        serialization.load_pem_private_key((folder / "server.key").read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        raise ConfigError(f"the TLS files in the certificates folder cannot be used (not PEM "
                          f"certificates and an unencrypted key): {how}",
                          safe_reason="TLS certificates unusable") from None
    return folder


def client_host(host: str) -> str:
    """The address the Flower CLI on this machine reaches a SuperLink bound to ``host`` at."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def join(host: str, port: int) -> str:
    """``HOST:PORT`` (``[IPv6]:PORT``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def superlink_command(paths: StatePaths, *, host: str, port: int, certs: Path | None,
                      node_auth: bool) -> list[str]:
    """The ``flower-superlink`` command line (``certs`` None: plain text)."""
    cmd = [executable("flower-superlink"), "--host", host, "--port", str(port),
           "--database", str(paths.database), "--log-file", str(paths.log_file),
           "--disable-runtime-dependency-installation"]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(certs / "ca.crt"),
                "--ssl-certfile", str(certs / "server.crt"),
                "--ssl-keyfile", str(certs / "server.key")]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def answers(address: str, ca_cert: Path | None, timeout: float = 2.0) -> bool:
    """Whether the SuperLink at ``address`` answers its ``/health`` route (over TLS with
    ``ca_cert``)."""
    scheme = "http" if ca_cert is None else "https"
    try:
        context = None if ca_cert is None else ssl.create_default_context(cafile=str(ca_cert))
        with urllib.request.urlopen(f"{scheme}://{address}/health", timeout=timeout,
                                    context=context) as reply:
            return bool(reply.status == 200)
    except (OSError, urllib.error.URLError, ssl.SSLError):
        return False


def port_in_use(host: str, port: int) -> bool:
    """Whether something already accepts connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def resume_active_run(paths: StatePaths, settings: LinkSettings) -> str:
    """Resubmit the run the coordinator was running when it stopped; the sentence to print."""
    from server.resume import read_active_run

    active = read_active_run(paths.root)
    if active is None:
        return "nothing to resume: no run was running when the coordinator stopped"
    out_dir = str(active["out_dir"])
    values = {**dict(active["run_config"]), k.RESUME_FROM: out_dir}
    overrides = " ".join(f"{key}={toml_value(value)}" for key, value in values.items())
    doc = flwr_json(["run", str(APP_DIR)], paths.flwr_home, address=settings.address,
                    options=["--run-config", overrides])
    return (f"resumed the interrupted run (Flower run {doc.get('run-id')}) from its last "
            f"checkpoint; its report will be {Path(out_dir) / 'report.json'} (follow it with "
            f"`FLWR_HOME={paths.flwr_home} flwr log {doc.get('run-id')} vesalius`)")


def watch(settings: LinkSettings, *, paths: StatePaths, resume: bool, stop: threading.Event,
          started: float, tell: Callable[[str], None] = say) -> None:
    """Say when the SuperLink answers; then, with ``resume``, resubmit the interrupted run."""
    ca = Path(settings.ca_cert) if settings.tls else None
    while not stop.is_set() and time.monotonic() - started < READY_TIMEOUT_S:
        if answers(settings.address, ca):
            break
        stop.wait(0.2)
    else:
        return
    auth = "on: registered hospitals only" if settings.node_auth else "OFF"
    tell(f"coordinator ready after {time.monotonic() - started:.1f} s at {settings.address} "
         f"(TLS {'on' if settings.tls else 'OFF'}, node authentication {auth})")
    if resume:
        try:
            tell(resume_active_run(paths, settings))
        except VesaliusError as exc:
            tell(f"the interrupted run could not be resumed: {exc}")


class _Output(FlowerOutput):
    """Adapter: :func:`cli.supernode.supervise` reads lines through a ``FlowerOutput``."""

    def __init__(self, inner: SuperLinkOutput) -> None:
        super().__init__(inner.address, lambda: None)
        self.inner = inner

    def line(self, raw: str) -> str | None:
        return self.inner.line(raw)


def start(
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="Coordinator state folder (default $VESALIUS_HOME/coordinator, "
        "i.e. ~/.vesalius/coordinator): SuperLink database, log, registered nodes."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address the SuperLink listens on."),
    port: int = typer.Option(9093, "--port", min=1, max=65535,
                             help="The SuperLink's one port (Fleet, Control and Runtime API)."),
    certificates: Path | None = typer.Option(
        None, "--certificates", help="Folder with ca.crt, server.crt and server.key (from "
        "`vesalius federation certs`; default <state dir>/certs)."),
    insecure: bool = typer.Option(False, "--insecure",
                                  help="Plain text, no node authentication: local development only."),
    no_node_auth: bool = typer.Option(False, "--no-node-auth",
                                      help="TLS but admit any SuperNode (tests only)."),
    resume: bool = typer.Option(False, "--resume", help="Resubmit the run that was running when "
                                "the coordinator stopped, from its last checkpoint."),
) -> None:
    """Run the coordinator's SuperLink (TLS, registered hospitals only, state kept on disk)."""
    if insecure and certificates is not None:
        raise typer.BadParameter("give either --insecure or --certificates, not both",
                                 param_hint="'--insecure'")
    paths = state_paths(state_dir)
    certs = None
    if not insecure:
        folder = certificates.expanduser().resolve() if certificates else paths.certificates
        certs = check_certificates(folder, given=certificates is not None)
    paths.create()
    if insecure:
        say(INSECURE_WARNING)
    elif no_node_auth:
        say(NO_AUTH_WARNING)
    node_auth = not insecure and not no_node_auth
    address = join(client_host(host), port)
    if port_in_use(client_host(host), port):
        raise ConfigError(f"port {port} is already in use on this machine (another SuperLink or "
                          "coordinator?): stop it or choose another --port",
                          safe_reason="port in use")
    ca = certs / "ca.crt" if certs is not None else None
    settings = LinkSettings(address=address, tls=certs is not None, node_auth=node_auth,
                            ca_cert=str(ca) if ca is not None else "")
    write_connection(paths.flwr_home, address, insecure=certs is None, root_cert=ca)
    save_links(paths, settings)

    from server.resume import COORDINATOR_DIR_ENV

    env = flower_env(paths.flwr_home)
    env[COORDINATOR_DIR_ENV] = str(paths.root)
    cmd = superlink_command(paths, host=host, port=port, certs=certs, node_auth=node_auth)
    say(f"starting the coordinator's SuperLink on {join(host, port)} (state in {paths.root}); "
        "Ctrl-C stops it")
    output = SuperLinkOutput(address, lambda fp: load_nodes(paths).by_fingerprint(fp),
                             lambda node_id: load_nodes(paths).by_node_id(node_id))
    stop = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True, args=(settings,),
                               kwargs={"paths": paths, "resume": resume, "stop": stop,
                                       "started": time.monotonic()})
    watcher.start()
    try:
        code = supervise(cmd, env, output=_Output(output), say=say)
    finally:
        stop.set()
        watcher.join(timeout=5.0)
    if code != 0:
        why = ("its port is in use" if output.bind_failed
               else f"exit status {code}; see its messages above and {paths.log_file.name} in "
               "the state folder")
        say(f"the coordinator's SuperLink stopped ({why})")
        raise typer.Exit(1)
