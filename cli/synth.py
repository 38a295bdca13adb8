"""``vesalius synth``: write a demo federation of DICOM hospitals."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.console import console, fmt, progress_bar, table


def synth(
    out: Path = typer.Option(..., "--out", help="Folder to write site-1/, site-2/, ... into."),
    sites: int = typer.Option(3, "--sites", min=1, max=20, help="Number of hospitals."),
    patients: int = typer.Option(500, "--patients", min=4, help="Patients per hospital."),
    seed: int = typer.Option(0, "--seed", help="Random seed (output is deterministic)."),
) -> None:
    """Write synthetic, PHI-free DICOM studies and a labels CSV for each hospital."""
    from client.dicom.synth import synthesize_federation

    if not str(out).strip() or str(out) == ".":
        raise typer.BadParameter("give --out a new folder to write the hospitals into",
                                 param_hint="--out")

    with progress_bar("writing DICOM") as progress:
        summaries = synthesize_federation(
            out, n_sites=sites, patients_per_site=patients, seed=seed, progress=progress
        )
    t = table(f"Synthetic federation in {out}", ["site", "patients", "images", "positive"])
    for s in summaries:
        t.add_row(s.site, str(s.patients), str(s.images), fmt(s.positives, "d"))
    console.print(t)
