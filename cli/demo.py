"""``vesalius demo``: synthetic hospitals + a simulated DP federation + a report, in one go."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from cli.console import console, progress_bar
from cli.federation import build_run_config, simulate
from cli.options import POSITIVE
from cli.report_view import print_report


def demo(
    out: Path = typer.Option(Path("vesalius-demo"), "--out", help="Folder for data/, report.json, checkpoints/."),
    sites: int = typer.Option(3, "--sites", min=2, max=10),
    patients: int = typer.Option(500, "--patients", min=20, help="Patients per hospital."),
    rounds: int = typer.Option(6, "--rounds", min=1),
    epsilon: float = typer.Option(8.0, "--epsilon", click_type=POSITIVE,
                                  help="Target patient-level ε per hospital (> 0)."),
    seed: int = typer.Option(0, "--seed"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Synthesise DICOM hospitals, train with DP-SGD under Flower, and report AUC and ε."""
    from client.dicom.synth import synthesize_federation

    config = build_run_config(  # checked before anything is written
        rounds=rounds, local_epochs=1, batch_size=32, learning_rate=0.05, epsilon=epsilon,
        noise_multiplier=0.0, max_grad_norm=1.0, private=True, model="cnn", image_size=32,
        seed=seed, out=out, min_nodes=sites,
    )
    data_root = out / "data"
    if not any(data_root.glob("site-*")):
        with progress_bar("writing synthetic DICOM studies") as progress:
            synthesize_federation(data_root, n_sites=sites, patients_per_site=patients, seed=seed,
                                  progress=progress)
        console.print(f"wrote {sites} hospitals' DICOM studies to {data_root}")
    else:
        console.print(f"reusing the DICOM studies in {data_root}")
    ledgers = out / "ledgers"
    if ledgers.exists():
        # The demo's data are synthetic and regenerated identically, so an earlier demo's spend
        # would count against this one and the node would (rightly) refuse. Real nodes never
        # do this: their ledger is append-only and lives outside any run's folder.
        shutil.rmtree(ledgers)
        console.print(f"demo: starting fresh privacy ledgers in {ledgers} (synthetic data)")
    doc = simulate(config, data_root, epsilon_cap=epsilon, allow_non_private=False,
                   verbose=verbose, ledger_root=ledgers)
    print_report(doc)
    console.print(f"report: {out / 'report.json'} (plots: {out / 'report.html'})")
    if doc.get("status") != "completed":
        raise typer.Exit(1)
