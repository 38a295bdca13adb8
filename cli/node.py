"""``vesalius node``: what a hospital's IT runs (check the data, start the SuperNode)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from cli.console import console, err_console, progress_bar, table
from cli.flower import executable, flower_env, toml_value
from common import messages as k

node_app = typer.Typer(help="Run and inspect a hospital node.", no_args_is_help=True)


@node_app.command("check")
def check(
    data: Path = typer.Option(..., "--data", help="The node's data folder (DICOM + labels.csv)."),
    output_format: str = typer.Option("table", "--format", help="table or json."),
    allow_identified: bool = typer.Option(
        False, "--allow-identified", help="Accept files that carry direct identifiers (PHI)."
    ),
) -> None:
    """Scan DICOM headers and report files used, files skipped (with reasons), labels."""
    from client.dicom import scan_data_dir

    if not data.is_dir():
        err_console.print(f"[red]error:[/red] {data} is not a folder")
        raise typer.Exit(2)
    with progress_bar("scanning headers", enabled=output_format != "json") as progress:
        _, report = scan_data_dir(data, require_deidentified=not allow_identified, progress=progress)
    doc = report.to_dict()
    if output_format == "json":
        console.print_json(json.dumps(doc))
        return
    summary = table(f"Ingestion report for {data}", ["item", "value"])
    for key, value in doc.items():
        if key == "fingerprint":
            summary.add_row("dataset fingerprint", f"{str(value)[:16]}…")
        elif not isinstance(value, (list, dict)):
            summary.add_row(key.replace("_", " "), str(value))
    for key, value in doc.items():
        if isinstance(value, dict):
            summary.add_row(key.replace("_", " "), ", ".join(f"{a}: {b}" for a, b in value.items()) or "-")
    console.print(summary)
    skipped = doc.get("skipped", [])
    if skipped:
        t = table("Skipped files", ["file", "reason code", "why"])
        for row in skipped:
            t.add_row(str(row.get("path")), str(row.get("code")), str(row.get("text")))
        console.print(t)


@node_app.command("start")
def start(
    data: Path = typer.Option(..., "--data", help="The node's data folder (DICOM + labels.csv)."),
    superlink: str = typer.Option("127.0.0.1:9092", "--superlink", help="SuperLink Fleet address."),
    epsilon_cap: float = typer.Option(8.0, "--epsilon-cap", help="Largest epsilon a run may spend here."),
    site_name: str = typer.Option("site", "--site-name", help="Name reported to the coordinator."),
    port: int = typer.Option(9094, "--port", help="Local port for the SuperNode's ClientApp API."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain-text gRPC (loopback tests only)."),
    root_certificates: Path | None = typer.Option(None, "--root-certificates", help="CA cert (TLS)."),
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
        10, "--min-release-count", help="Suppress released counts below this (unless noised)."
    ),
    stats_noise: float = typer.Option(
        0.0, "--stats-noise-multiplier",
        help="Gaussian noise on released statistics (x sensitivity); 0 = exact with suppression.",
    ),
    tabular: Path | None = typer.Option(
        None, "--tabular", help="CSV of clinical covariates for federated regression queries."
    ),
) -> None:
    """Start this hospital's Flower SuperNode with its own node config (runs until stopped)."""
    if not data.is_dir():
        err_console.print(f"[red]error:[/red] data folder {data} does not exist")
        raise typer.Exit(2)
    if not insecure and root_certificates is None:
        err_console.print("[red]error:[/red] give --root-certificates for TLS, or --insecure on loopback")
        raise typer.Exit(2)
    # Preflight: the same header scan as `vesalius node check`, so a node with no usable,
    # labelled data fails here with a hint instead of refusing every round later.
    from client.dicom import scan_data_dir

    _, report = scan_data_dir(data, require_deidentified=not allow_identified)
    if report.files_used == 0 or report.labelled_images == 0:
        err_console.print(
            f"[red]error:[/red] {data} has {report.files_used} usable DICOM file(s) and "
            f"{report.labelled_images} labelled image(s); run `vesalius node check --data {data}`"
        )
        raise typer.Exit(2)
    err_console.print(
        f"data: {report.files_used} usable files ({report.files_seen - report.files_used} skipped), "
        f"{report.num_patients} patients, {report.labelled_images} labelled images"
    )
    node_config = {
        k.NODE_DATA_DIR: str(data.resolve()),
        k.NODE_EPSILON_CAP: float(epsilon_cap),
        k.NODE_SITE_NAME: site_name,
        k.NODE_ALLOW_NON_PRIVATE: allow_non_private,
        k.NODE_REQUIRE_DEIDENTIFIED: not allow_identified,
        k.NODE_RELEASE_HISTOGRAMS: release_histograms,
        k.NODE_MIN_RELEASE_COUNT: int(min_release_count),
        k.NODE_STATS_NOISE: float(stats_noise),
    }
    if ledger_dir is not None:
        node_config[k.NODE_LEDGER_DIR] = str(ledger_dir.expanduser().resolve())
    if tabular is not None:
        node_config[k.NODE_TABULAR_PATH] = str(tabular.expanduser().resolve())
    from common.config import NodeConfig

    ledger_file = NodeConfig.from_user_config(node_config).ledger_path
    err_console.print(f"privacy ledger: {ledger_file} (audit with `vesalius audit show --ledger "
                      f"{ledger_file}`)")
    cmd = [
        executable("flower-supernode"),
        "--superlink", superlink,
        "--port", str(port),
        "--node-config", " ".join(f"{key}={toml_value(v)}" for key, v in node_config.items()),
    ]
    cmd += ["--insecure"] if insecure else ["--root-certificates", str(root_certificates)]
    err_console.print(f"starting SuperNode '{site_name}' -> {superlink} (cap epsilon={epsilon_cap:g})")
    console.file.flush()
    # Replace this process with the SuperNode: signals (Ctrl-C, SIGTERM) reach it directly.
    os.execve(cmd[0], cmd, flower_env(flwr_home))
