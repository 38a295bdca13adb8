"""``vesalius federation``: what a coordinator operator runs."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import typer

from cli.console import console, err_console
from cli.flower import APP_DIR, CONNECTION, executable, flower_env, toml_value, write_connection
from cli.report_view import print_report, print_round
from common.config import NodeConfig, RunConfig, TrainPlan
from common.errors import ConfigError

federation_app = typer.Typer(help="Start and follow federated runs.", no_args_is_help=True)


def build_run_config(
    *, rounds: int, local_epochs: int, batch_size: int, learning_rate: float, epsilon: float,
    noise_multiplier: float, max_grad_norm: float, private: bool, model: str, image_size: int,
    seed: int, out: Path, min_nodes: int,
) -> RunConfig:
    """Typed run config from CLI options (validated on construction)."""
    plan = TrainPlan(
        num_rounds=rounds, local_epochs=local_epochs, batch_size=batch_size,
        learning_rate=learning_rate, private=private, target_epsilon=epsilon,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, model=model,
        image_size=image_size, seed=seed,
    )
    return RunConfig(plan=plan, out_dir=str(out.resolve()), min_nodes=min_nodes)


def site_dirs(data_root: Path) -> list[Path]:
    """The ``site-*`` folders of a demo federation, in order."""
    dirs = sorted(p for p in data_root.iterdir() if p.is_dir() and p.name.startswith("site-"))
    if not dirs:
        raise typer.BadParameter(f"no site-* folders in {data_root} (make some with `vesalius synth`)")
    return dirs


def simulate(config: RunConfig, data_root: Path, *, epsilon_cap: float, allow_non_private: bool,
             verbose: bool) -> dict[str, object]:
    """Run a simulated federation over the ``site-*`` folders of ``data_root``."""
    from server.simulation import run_simulation

    nodes = [
        # Simulated hospitals on this machine: histograms may be released for the pooled AUC.
        NodeConfig(data_dir=d, epsilon_cap=epsilon_cap, site_name=d.name,
                   allow_non_private=allow_non_private, release_histograms=True)
        for d in site_dirs(data_root)
    ]
    total = config.plan.num_rounds
    console.print(f"simulating {len(nodes)} hospitals x {total} rounds "
                  f"({'DP-SGD, target ε=%g' % config.plan.target_epsilon if config.plan.private else 'non-private'})")
    report = run_simulation(config, nodes, on_round=lambda e: print_round(e, total), verbose=verbose)
    return report.to_dict()


def run_on_superlink(config: RunConfig, superlink: str, *, insecure: bool,
                     root_certificates: Path | None, flwr_home: Path | None) -> dict[str, object]:
    """Submit the run to a SuperLink with ``flwr run --stream`` and read the report it writes."""
    home = flwr_home or Path(tempfile.mkdtemp(prefix="vesalius-flwr-"))
    write_connection(home, superlink, insecure=insecure, root_cert=root_certificates)
    overrides = " ".join(f"{key}={toml_value(v)}" for key, v in config.to_dict().items())
    cmd = [executable("flwr"), "run", str(APP_DIR), CONNECTION, "--run-config", overrides, "--stream"]
    report_path = Path(config.out_dir) / "report.json"
    if report_path.exists():  # never show an earlier run's report as this one's
        kept = report_path.with_name(f"report-{int(report_path.stat().st_mtime)}.json")
        report_path.rename(kept)
        err_console.print(f"an earlier report in {config.out_dir} was kept as {kept.name}")
    console.print(f"submitting run to SuperLink {superlink}")
    proc = subprocess.run(cmd, env=flower_env(home), check=False)
    if proc.returncode != 0:
        err_console.print(f"[red]error:[/red] the run did not complete (flwr run exit {proc.returncode}; "
                          f"is a SuperLink listening at {superlink}?)")
        raise typer.Exit(1)
    if not report_path.exists():
        err_console.print(f"[red]error:[/red] the ServerApp wrote no report to {report_path} "
                          "(see the SuperLink's log; --out must be a path on the coordinator)")
        raise typer.Exit(1)
    return json.loads(report_path.read_text(encoding="utf-8"))


@federation_app.command("run")
def run(
    superlink: str | None = typer.Option(None, "--superlink", help="SuperLink address (HOST:PORT of its Control API). Omit to simulate."),
    data_root: Path | None = typer.Option(None, "--data-root", help="Simulation: folder with site-* data folders."),
    out: Path = typer.Option(Path("vesalius-out"), "--out", help="Where report.json and checkpoints go."),
    rounds: int = typer.Option(5, "--rounds", min=1),
    local_epochs: int = typer.Option(1, "--local-epochs", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    learning_rate: float = typer.Option(0.05, "--lr"),
    epsilon: float = typer.Option(8.0, "--epsilon", help="Target patient-level ε per hospital for the whole run."),
    noise_multiplier: float = typer.Option(0.0, "--noise-multiplier", help="Fix σ instead of deriving it from --epsilon."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm"),
    non_private: bool = typer.Option(False, "--non-private", help="Baseline without DP (nodes must allow it)."),
    model: str = typer.Option("cnn", "--model"),
    image_size: int = typer.Option(32, "--image-size"),
    seed: int = typer.Option(42, "--seed"),
    min_nodes: int = typer.Option(2, "--min-nodes", min=1),
    epsilon_cap: float = typer.Option(8.0, "--epsilon-cap", help="Simulation: each simulated hospital's cap."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain-text connection (loopback tests only)."),
    root_certificates: Path | None = typer.Option(None, "--root-certificates"),
    flwr_home: Path | None = typer.Option(None, "--flwr-home", help="FLWR_HOME for `flwr run`."),
    output_format: str = typer.Option("table", "--format", help="table or json."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Start a federated run: simulated on this machine, or on a SuperLink."""
    try:
        config = build_run_config(
            rounds=rounds, local_epochs=local_epochs, batch_size=batch_size,
            learning_rate=learning_rate, epsilon=epsilon, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, private=not non_private, model=model,
            image_size=image_size, seed=seed, out=out, min_nodes=min_nodes,
        )
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    if superlink is None:
        if data_root is None:
            raise typer.BadParameter("give --data-root for a simulation, or --superlink ADDRESS")
        doc = simulate(config, data_root, epsilon_cap=epsilon_cap, allow_non_private=non_private,
                       verbose=verbose)
    else:
        doc = run_on_superlink(config, superlink, insecure=insecure,
                               root_certificates=root_certificates, flwr_home=flwr_home)
    if output_format == "json":
        console.print_json(json.dumps(doc))
    else:
        print_report(doc)
        console.print(f"report: {Path(config.out_dir) / 'report.json'}")
    if doc.get("status") != "completed":
        raise typer.Exit(1)


@federation_app.command("certs")
def certs(
    out: Path = typer.Option(..., "--out", help="Folder for ca.crt, server.crt and their keys."),
    host: list[str] = typer.Option(["127.0.0.1", "localhost"], "--host",
                                   help="SuperLink host name or IP (repeat for several)."),
    valid_days: int = typer.Option(365, "--valid-days", min=1),
) -> None:
    """Make a private CA and a SuperLink TLS certificate (for pilots and tests)."""
    from common.crypto.certs import make_certificates

    paths = make_certificates(out, hosts=host, valid_days=valid_days)
    console.print(f"CA certificate (give to every node and operator): {paths.ca_cert}")
    console.print(f"SuperLink: --ssl-ca-certfile {paths.ca_cert} --ssl-certfile {paths.server_cert} "
                  f"--ssl-keyfile {paths.server_key}")
