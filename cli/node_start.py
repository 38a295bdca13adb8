"""``vesalius node start``: check the data, reach the coordinator, run the SuperNode.

Phases: validate every option (a usage error, exit 2, names the option and never a path);
check the data folder with the rules of ``vesalius node check`` (exit 4 with the reasons);
probe the coordinator until it answers, saying why it does not (exit 8 when giving up,
see :mod:`cli.supernode`); then run Flower's SuperNode as a supervised child until it stops
or this process is asked to stop.

Process model (``--worker``):

``warm`` (default)
    ``flower-supernode --isolation process`` (through :mod:`client.warm_worker.supernode`, its
    idle sleeps capped at ``--poll-interval``) plus the warm worker
    (:mod:`client.warm_worker`), which imports torch and the ClientApp once and serves every
    message in that same process, so what the ClientApp caches in memory lasts from one
    message to the next. The two share a random SuperExec secret (a file readable by
    this user only, deleted at the end) and the Runtime API listens on 127.0.0.1 only. A
    crashed worker is restarted with a visible line; the SuperNode keeps its connection.
``per-message``
    Flower's stock behaviour: a fresh ``flwr-clientapp`` process for every message.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import typer

from cli.console import err_console
from cli.flower import flower_env, toml_value
from cli.node_check import inspect_data, require_data_folder, task_names
from cli.options import LazyChoice
from cli.node_processes import Child, WorkerOutput
from cli.supernode import FlowerOutput, parse_address, probe, supervise, wait_for_coordinator
from common import messages as k
from common.errors import DataError


def _say(text: str) -> None:
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _positive(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise typer.BadParameter("must be a number greater than 0 (e.g. 8)")
    return value


def _non_negative(value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise typer.BadParameter("must be a number of at least 0")
    return value


def _address(value: str) -> str:
    try:
        parse_address(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value.strip()


def _existing_file(path: Path | None, option: str) -> Path | None:
    """``path`` made absolute (relative to the working folder); a usage error if it is no file."""
    if path is None:
        return None
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        raise typer.BadParameter(f"the {option} file does not exist or is not a file",
                                 param_hint=f"'{option}'")
    return resolved


WORKER_MODES = ("warm", "per-message")
DEFAULT_POLL_S = 0.2


def _poll_interval(value: float) -> float:
    if not math.isfinite(value) or not 0.01 <= value <= 3:
        raise typer.BadParameter("must be a number of seconds between 0.01 and 3 (e.g. 0.2)")
    return value


@contextmanager
def _superexec_secret() -> Iterator[Path]:
    """A random shared secret for the SuperNode and the worker, in a private file."""
    folder = Path(tempfile.mkdtemp(prefix="vesalius-node-"))  # mode 0700
    secret = folder / "superexec.secret"
    try:
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
        yield secret
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _warm_commands(supernode_args: list[str], *, port: int, secret: Path
                   ) -> tuple[list[str], list[str]]:
    """The SuperNode (capped sleeps, process isolation) and the warm worker command lines."""
    supernode = [sys.executable, "-m", "client.warm_worker.supernode", *supernode_args,
                 "--isolation", "process", "--host", "127.0.0.1",
                 "--superexec-auth-secret-file", str(secret)]
    worker = [sys.executable, "-m", "client.warm_worker",
              "--runtime-api-address", f"127.0.0.1:{port}", "--insecure",
              "--superexec-auth-secret-file", str(secret), "--parent-pid", str(os.getpid())]
    return supernode, worker


def _check_data(root: Path, *, allow_identified: bool, task: str = "binary",
                num_classes: int | None = None) -> None:
    """Refuse a folder training cannot use for ``task``, with the reasons (``node check``'s
    rules)."""
    found = inspect_data(root, require_deidentified=not allow_identified, decode_pixels=False,
                         task=task, num_classes=num_classes)
    if not found.usable:
        for reason in found.blocking:
            err_console.print(f"[red]error:[/red] {reason}", highlight=False, soft_wrap=True)
        raise DataError("the --data folder cannot be trained on; run `vesalius node check "
                        "--data <folder>` for every problem and how to fix it",
                        safe_reason="the node's data could not be used")
    report = found.report
    _say(f"data: {report.files_used} usable files ({report.files_seen - report.files_used} "
         f"skipped), {report.num_patients} patients, {found.trainable_images} images with "
         f"{task} targets"
         + (f", {len(found.label_problems)} label problem(s): run `vesalius node check`"
            if found.label_problems else ""))


def start(
    data: str = typer.Option(..., "--data", help="The node's data folder (DICOM + labels.csv)."),
    superlink: str = typer.Option("127.0.0.1:9092", "--superlink", callback=_address,
                                  help="SuperLink Fleet address, HOST:PORT."),
    epsilon_cap: float = typer.Option(8.0, "--epsilon-cap", callback=_positive,
                                      help="Largest epsilon a run may spend here (> 0)."),
    site_name: str = typer.Option("site", "--site-name", help="Name reported to the coordinator."),
    port: int = typer.Option(9094, "--port", min=1, max=65535,
                             help="Local port for the SuperNode's ClientApp API (1-65535)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain-text connection (loopback tests only)."),
    root_certificates: Path | None = typer.Option(
        None, "--root-certificates", help="CA certificate (PEM) the coordinator's TLS certificate "
        "is signed by."),
    auth_private_key: Path | None = typer.Option(
        None, "--auth-private-key", help="This node's private key for SuperNode authentication "
        "(when the coordinator requires it; TLS only)."),
    task: str = typer.Option(
        "binary", "--task", click_type=LazyChoice(task_names),
        help="The task this hospital's labels serve, checked before joining (a run of another "
        "task is refused by the node when it reads its labels)."),
    num_classes: int | None = typer.Option(
        None, "--num-classes", min=2,
        help="K of a multiclass, ordinal or multilabel task (default: fitted to the labels)."),
    allow_non_private: bool = typer.Option(False, "--allow-non-private", help="Accept non-DP baselines."),
    allow_identified: bool = typer.Option(False, "--allow-identified", help="Accept PHI-bearing files."),
    release_histograms: bool = typer.Option(
        False, "--release-histograms",
        help="Release per-class score histograms of test patients (enables a pooled AUC; not noised).",
    ),
    flwr_home: Path | None = typer.Option(None, "--flwr-home", help="FLWR_HOME for this node."),
    ledger_dir: Path | None = typer.Option(
        None, "--ledger-dir",
        help="Folder of the node's signed privacy ledger and key (default "
        "$VESALIUS_HOME/ledger, i.e. ~/.vesalius/ledger). Keep it outside the app directory.",
    ),
    min_release_count: int = typer.Option(
        10, "--min-release-count", min=0, help="Suppress released counts below this (unless noised)."
    ),
    stats_noise: float = typer.Option(
        0.0, "--stats-noise-multiplier", callback=_non_negative,
        help="Gaussian noise on released statistics (x sensitivity, >= 0); 0 = exact with suppression.",
    ),
    tabular: Path | None = typer.Option(
        None, "--tabular", help="CSV of clinical covariates for federated regression queries."
    ),
    physical_batch_size: int = typer.Option(
        0, "--physical-batch-size", min=0,
        help="Largest forward/backward pass of DP training, in samples (0 = automatic: volumes "
        "in parts of half the batch size, 2D images whole). Bounds the memory a large Poisson "
        "batch takes (a GPU's, with large images); the step and its ε are the same."),
    max_attempts: int = typer.Option(
        0, "--max-attempts", min=0,
        help="Give up after this many failed attempts to reach the coordinator (0 = never).",
    ),
    worker: str = typer.Option(
        "warm", "--worker", click_type=click.Choice(WORKER_MODES),
        help="warm: one long-lived process serves every message (torch imported once); "
        "per-message: Flower's stock fresh process per message.",
    ),
    poll_interval: float = typer.Option(
        DEFAULT_POLL_S, "--poll-interval", callback=_poll_interval,
        help="Warm worker only: longest idle wait of the SuperNode between two requests for "
        "work, in seconds (0.01-3; Flower's stock wait is 3).",
    ),
) -> None:
    """Start this hospital's Flower SuperNode with its own node config (runs until stopped)."""
    root = require_data_folder(data)
    if insecure and root_certificates is not None:
        raise typer.BadParameter("give either --insecure or --root-certificates, not both",
                                 param_hint="'--insecure'")
    if not insecure and root_certificates is None:
        raise typer.BadParameter("give --root-certificates (the coordinator's CA certificate) "
                                 "for TLS, or --insecure on a loopback test",
                                 param_hint="'--root-certificates'")
    if insecure and auth_private_key is not None:
        raise typer.BadParameter("SuperNode authentication needs TLS: give --root-certificates "
                                 "instead of --insecure", param_hint="'--auth-private-key'")
    if worker == "warm":
        from client.warm_worker.flower_seams import FlowerVersionError, require_pinned_flower

        try:
            require_pinned_flower()
        except FlowerVersionError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--worker'") from None
    ca_file = _existing_file(root_certificates, "--root-certificates")
    auth_key = _existing_file(auth_private_key, "--auth-private-key")
    tabular_file = _existing_file(tabular, "--tabular")
    _check_data(root, allow_identified=allow_identified, task=task, num_classes=num_classes)

    node_config: dict[str, object] = {
        k.NODE_DATA_DIR: str(root),
        k.NODE_EPSILON_CAP: float(epsilon_cap),
        k.NODE_SITE_NAME: site_name,
        k.NODE_ALLOW_NON_PRIVATE: allow_non_private,
        k.NODE_REQUIRE_DEIDENTIFIED: not allow_identified,
        k.NODE_RELEASE_HISTOGRAMS: release_histograms,
        k.NODE_MIN_RELEASE_COUNT: int(min_release_count),
        k.NODE_STATS_NOISE: float(stats_noise),
    }
    if physical_batch_size:
        node_config[k.NODE_PHYSICAL_BATCH] = int(physical_batch_size)
    if ledger_dir is not None:
        node_config[k.NODE_LEDGER_DIR] = str(ledger_dir.expanduser().resolve())
    if tabular_file is not None:
        node_config[k.NODE_TABULAR_PATH] = str(tabular_file)
    from common.config import NodeConfig

    ledger_file = NodeConfig.from_user_config(node_config).ledger_path
    where = "the --ledger-dir folder" if ledger_dir is not None else "$VESALIUS_HOME/ledger"
    _say(f"privacy ledger: {ledger_file.name} in {where} (audit it with `vesalius audit show "
         "--ledger <that file>`)")

    attempt = wait_for_coordinator(superlink, ca_file=ca_file, max_attempts=max_attempts, say=_say)
    if attempt > 1:
        _say(f"attempt {attempt}: the coordinator at {superlink} answers")
    args = [
        "--superlink", superlink,
        "--port", str(port),
        "--node-config", " ".join(f"{key}={toml_value(v)}" for key, v in node_config.items()),
    ]
    args += ["--insecure"] if ca_file is None else ["--root-certificates", str(ca_file)]
    if auth_key is not None:
        args += ["--auth-supernode-private-key", str(auth_key)]
    if max_attempts > 0:
        args += ["--max-retries", str(max_attempts - 1)]
    home = flwr_home.expanduser().resolve() if flwr_home is not None else None
    env = flower_env(home)
    _say(f"starting SuperNode '{site_name}' -> {superlink} (cap epsilon={epsilon_cap:g}, "
         f"{worker} worker)")
    host, link_port = parse_address(superlink)
    output = FlowerOutput(superlink, lambda: probe(host, link_port, ca_file=ca_file, timeout=3.0))
    from client.warm_worker.supernode import PARENT_PID_ENV, SLEEP_CAP_ENV, STOCK_SLEEP_CAP_S

    env[PARENT_PID_ENV] = str(os.getpid())  # the SuperNode ends with this process
    if worker == "per-message":  # Flower's SuperNode as shipped (its 3 s polls kept)
        env[SLEEP_CAP_ENV] = repr(STOCK_SLEEP_CAP_S)
        code = supervise([sys.executable, "-m", "client.warm_worker.supernode", *args], env,
                         output=output, say=_say)
    else:
        env[SLEEP_CAP_ENV] = repr(poll_interval)
        with _superexec_secret() as secret:
            supernode_cmd, worker_cmd = _warm_commands(args, port=port, secret=secret)
            code = supervise(supernode_cmd, env, output=output, say=_say, helpers=[
                Child("the warm worker", worker_cmd, WorkerOutput(), restart=True)])
    if code != 0:
        _say(f"the SuperNode stopped with exit status {code}; see its messages above")
        raise typer.Exit(1)
