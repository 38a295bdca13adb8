"""``vesalius import``: a public image collection as node data directories (DICOM + labels.csv).

The work is done by :mod:`client.dicom.importer`; this module parses the options, draws the
progress bar and prints the summary (``--format table|json``). Errors are the project's
:class:`~common.errors.ConfigError` / :class:`~common.errors.DataError`, printed as one sentence
by the top-level handler (:mod:`cli.errors`); they name options and CSV line numbers, never a
path or a value.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import typer

from cli.console import console, progress_bar, table
from cli.options import OUTPUT_FORMATS, POSITIVE

#: ``vesalius import --help`` (typer's rich help keeps single newlines: one line per paragraph).
HELP = "\n\n".join([
    "Import PNG/JPEG images or a MedMNIST .npz as PHI-free DICOM node data (+ labels.csv).",
    "SOURCE is a MedMNIST-format .npz (train/val/test _images and _labels; [N,H,W], [N,H,W,3] "
    "or 3-D [N,D,H,W]), or a folder of PNG/JPEG images with a labels CSV whose header names "
    "image (or file, filename, path: the path relative to the folder), label (an integer, 0 or "
    "1 for the binary task) and optionally patient (or patient_id: one patient's images form "
    "one study with one label; without it each image is its own patient).",
    "Colour images are converted to greyscale (the node reads MONOCHROME2 only). A 3-D volume "
    "becomes one patient's series of slices with its Image Plane attributes: a federation "
    "trains on it as volumes (`--model cnn3d --samples volume-3d`), or with the default "
    "`--samples image-2d` each slice is one image of that patient's study.",
    "Pseudonyms (IMP-000001, ...) and hashed UIDs; no source file name or id is written. "
    "The UIDs are derived from the images, so re-importing the same collection gives the same "
    "dataset and the node's ledger keeps counting the same privacy budget.",
    "The output passes `vesalius node check` in full; with --sites, `vesalius federation run "
    "--data-root OUT` trains on it.",
])


def _print_summary(summary: object) -> None:
    from client.dicom.importer import ImportSummary

    assert isinstance(summary, ImportSummary)
    kind = "3-D volumes as series of slices" if summary.kind.value == "3d" else "2-D images"
    t = table(f"Imported {summary.source_kind} source ({kind}) into {summary.out}",
              ["node folder", "patients", "files", "label counts"])
    for site in summary.sites:
        counts = ", ".join(f"{label}: {n}" for label, n in sorted(site.label_counts.items()))
        t.add_row(site.site or ".", str(site.patients), str(site.files), counts or "-")
    if len(summary.sites) > 1:
        t.add_row("total", str(summary.patients), str(summary.files), "")
    console.print(t)
    for note in summary.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    volumes = " --model cnn3d --samples volume-3d" if summary.kind.value == "3d" else ""
    target = (f"vesalius federation run --data-root {summary.out}{volumes}"
              if summary.sites[0].site else f"vesalius node check --data {summary.out}")
    console.print(f"next: {target}", highlight=False, soft_wrap=True)


def import_data(
    source: Path = typer.Argument(
        ..., show_default=False,
        help="A MedMNIST-format .npz file, or a folder of PNG/JPEG images with a labels CSV."),
    out: Path = typer.Option(..., "--out", help="New or empty output folder (a node data "
                             "folder, or site-1..N with --sites)."),
    labels: Path | None = typer.Option(
        None, "--labels", help="The image folder's labels CSV; default: SOURCE/labels.csv."),
    sites: int | None = typer.Option(
        None, "--sites", min=1, max=100,
        help="Write N hospitals OUT/site-1..N (for federation run --data-root OUT)."),
    split: str = typer.Option("iid", "--split", click_type=click.Choice(["iid", "dirichlet"]),
                              help="How patients are split among --sites."),
    alpha: float = typer.Option(0.5, "--alpha", click_type=POSITIVE,
                                help="Dirichlet concentration for --split dirichlet (> 0; "
                                "small = strong label skew)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split among sites."),
    max_images: int | None = typer.Option(
        None, "--max-images", min=1,
        help="Import only the first N images (volumes for 3-D; CSV rows), for quick trials."),
    pixel_spacing: float = typer.Option(
        1.0, "--pixel-spacing", click_type=POSITIVE,
        help="(0028,0030) Pixel Spacing in mm (nominal; the sources do not record it)."),
    slice_thickness: float | None = typer.Option(
        None, "--slice-thickness", click_type=POSITIVE,
        help="Slice thickness of volume slices in mm; default: --pixel-spacing."),
    force: bool = typer.Option(False, "--force",
                               help="Replace an earlier vesalius import in --out (nothing else "
                               "is ever deleted)."),
    output_format: str = typer.Option("table", "--format",
                                      click_type=click.Choice(list(OUTPUT_FORMATS)),
                                      help="Summary format."),
) -> None:
    """Import PNG/JPEG images or a MedMNIST .npz as PHI-free DICOM node data (+ labels.csv).

    The full help is :data:`HELP` (set as this function's docstring below).
    """
    from client.dicom.importer import ImportOptions, import_dataset
    from common.errors import ConfigError

    if not source.expanduser().exists():
        raise ConfigError("the SOURCE does not exist; give a .npz file or an image folder")
    if labels is not None and not labels.expanduser().is_file():
        raise ConfigError("the --labels file does not exist; give the image folder's labels CSV")
    options = ImportOptions(sites=sites, split=split, alpha=alpha, seed=seed,
                            max_images=max_images, pixel_spacing_mm=pixel_spacing,
                            slice_thickness_mm=slice_thickness, force=force)
    as_json = output_format == "json"
    with progress_bar("writing DICOM", enabled=not as_json) as progress:
        summary = import_dataset(source, out, labels_csv=labels, options=options,
                                 progress=progress)
    if as_json:
        console.print_json(json.dumps(summary.to_dict()))
    else:
        _print_summary(summary)


import_data.__doc__ = HELP
