"""CLI tests of the learning paradigms; :func:`partly_labelled_federation` is their shared data."""

from __future__ import annotations

import csv
from pathlib import Path


def partly_labelled_federation(root: Path, *, sites: int, patients: int, size: int) -> Path:
    """``sites`` synthetic hospitals under ``root`` (seed 1); site-2's labels.csv lacks every
    fourth row, so a quarter of its patients are unlabelled."""
    from client.dicom.synth import synthesize_federation

    synthesize_federation(root, n_sites=sites, patients_per_site=patients,
                          images_per_patient=(1, 2), image_size=size, seed=1)
    labels = root / "site-2" / "labels.csv"
    rows = list(csv.DictReader(labels.open()))
    with labels.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(row for i, row in enumerate(rows) if i % 4)
    return root
