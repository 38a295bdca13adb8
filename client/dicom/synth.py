"""Synthetic, PHI-free demo data for a federation of hospitals, written as real DICOM files.

:func:`synthesize_federation` writes one folder per hospital::

    OUT/site-1/dicom/<pseudo-patient>/<study>/<series>/IM<n>.dcm
    OUT/site-1/labels.csv            # patient_id,study_uid,label (one row per study)
    OUT/site-2/...

Each pseudo-patient has one CT study with one axial series of 2-4 neighbouring slices of an
abdominal phantom (:mod:`client.dicom.synth_phantom`); the study label is 1 when the patient
has a liver lesion (occasionally outside the imaged slab, hence invisible). Hospitals differ
the way real scanners do (:class:`SiteProfile`): intensity calibration, noise, lesion
conspicuity, disease prevalence, (0028,0030) Pixel Spacing, (0028,0101) Bits Stored,
(0028,0103) Pixel Representation and the modality LUT, (0028,1052) Rescale Intercept and
(0028,1053) Rescale Slope.

This module writes the binary task's data (``vesalius synth``'s default). The other tasks'
demo data (multi-class lesion types, ordinal grades, multi-label findings, regression,
segmentation, reconstruction) come from :mod:`client.dicom.synth_tasks`, on the same
phantom, profiles and CT header.

Privacy: no value is derived from a real person. Patient Name (0010,0010) and Patient ID
(0010,0020) hold the same pseudonym, (0012,0062) Patient Identity Removed is ``YES`` and
(0012,0063) De-identification Method says the data are synthetic. Birth date, address,
institution, referring physician and all dates are absent. Output is deterministic for a
given seed, UIDs included (they are hashed from the seed, site and pseudonym).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from client.dicom.synth_common import (
    CtSlice,
    SyntheticPatient,
    UidMaker,
    synthesize_sites,
    write_patients,
)
from client.dicom.synth_profiles import SiteProfile, default_profiles, physical_to_stored

__all__ = [
    "LABELS_HEADER",
    "SiteProfile",
    "SiteSummary",
    "default_profiles",
    "physical_to_stored",
    "synthesize_federation",
    "synthesize_site",
]

logger = logging.getLogger(__name__)

#: Header of each site's ``labels.csv``.
LABELS_HEADER: tuple[str, str, str] = ("patient_id", "study_uid", "label")

_UID_NAMESPACE = "vesalius-synth-v1"


@dataclass(frozen=True)
class SiteSummary:
    """What :func:`synthesize_federation` wrote for one site."""

    site: str
    path: Path
    patients: int
    images: int
    positives: int


def _write_study(
    study_dir: Path, patient: SyntheticPatient, slices: Iterator[CtSlice], uid: UidMaker
) -> tuple[str, str, int, int]:
    """Write one patient's CT series; return (patient_id, study_uid, label, n_images)."""
    series_dir = study_dir / "SE1"
    series_dir.mkdir(parents=True, exist_ok=True)
    for ct in slices:
        ct.dataset.save_as(series_dir / f"IM{ct.index + 1}.dcm", enforce_file_format=True)
    return patient.patient_id, patient.ids.study_uid, patient.label, patient.n_images


def synthesize_site(
    site_dir: str | Path,
    profile: SiteProfile,
    *,
    site_index: int,
    patients: int,
    images_per_patient: tuple[int, int] = (2, 4),
    image_size: int = 64,
    seed: int = 0,
    on_patient: Callable[[], None] | None = None,
) -> SiteSummary:
    """Write one hospital's DICOM files and ``labels.csv`` into ``site_dir``.

    Parameters
    ----------
    site_dir : str or Path
        Destination folder; created if missing.
    profile : SiteProfile
        The hospital's acquisition and population characteristics.
    site_index : int
        Zero-based index of the site; part of the pseudonym (``S<index+1>-P<nnnn>``) and of
        the random stream.
    patients : int
        Number of pseudo-patients (one study each).
    images_per_patient : tuple of int
        Inclusive range of slices per study.
    image_size : int
        (0028,0010) Rows = (0028,0011) Columns.
    seed : int
        Seed; the same arguments always produce byte-identical files.
    on_patient : callable, optional
        Called after each patient is written.

    Returns
    -------
    SiteSummary
        Counts of what was written.
    """
    site_path, written = write_patients(
        site_dir,
        profile,
        _write_study,
        uid_namespace=_UID_NAMESPACE,
        site_index=site_index,
        patients=patients,
        images_per_patient=images_per_patient,
        image_size=image_size,
        seed=seed,
        on_patient=on_patient,
    )
    rows = [(patient_id, study_uid, label) for patient_id, study_uid, label, _ in written]
    n_images = sum(images for *_, images in written)
    with (site_path / "labels.csv").open("w", newline="", encoding="ascii") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(LABELS_HEADER)
        writer.writerows(rows)
    positives = sum(label for _, _, label in rows)
    logger.info(
        "synthesised %s: %d patients, %d images, %d positives",
        profile.name,
        patients,
        n_images,
        positives,
    )
    return SiteSummary(
        site=profile.name, path=site_path, patients=patients, images=n_images, positives=positives
    )


def synthesize_federation(
    out_dir: str | Path,
    *,
    n_sites: int = 3,
    patients_per_site: int = 500,
    images_per_patient: tuple[int, int] = (2, 4),
    image_size: int = 64,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[SiteSummary]:
    """Write a synthetic federation of ``n_sites`` hospitals under ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Root folder; site ``k`` goes to ``out_dir/site-k``. A site folder that already
        contains files is refused, so real data are never overwritten.
    n_sites : int
        Number of hospitals; profiles come from :func:`default_profiles`.
    patients_per_site : int
        Pseudo-patients per hospital (one study each). The default (500) is sized so that
        a small CNN trained with DP-SGD at epsilon 8 over 3 sites x 5-8 FedAvg rounds reaches
        a pooled patient-level AUC of about 0.9 (see the calibration notes in the tests).
    images_per_patient : tuple of int
        Inclusive range of slices per study.
    image_size : int
        (0028,0010) Rows = (0028,0011) Columns.
    seed : int
        Seed; the whole output (pixels, labels, UIDs) is a function of the arguments.
    progress : callable, optional
        ``progress(done, total)`` after each patient, counted over all sites.

    Returns
    -------
    list of SiteSummary
        One summary per site, in site order.
    """
    return synthesize_sites(
        out_dir,
        synthesize_site,
        n_sites=n_sites,
        patients_per_site=patients_per_site,
        images_per_patient=images_per_patient,
        image_size=image_size,
        seed=seed,
        progress=progress,
    )
