"""Synthetic, PHI-free *segmentation* data: CT phantom series plus a lesion-mask series.

:func:`synthesize_segmentation_federation` writes one folder per hospital::

    OUT/site-1/dicom/<pseudo-patient>/ST1/SE1/IM<n>.dcm     # CT images (as synth.py)
    OUT/site-1/dicom/<pseudo-patient>/ST1/SE2/MASK<n>.dcm   # one lesion mask per image
    OUT/site-2/...

The CT images come from the same phantom code paths as :mod:`client.dicom.synth`
(:func:`~client.dicom.synth_phantom.draw_anatomy`, :func:`~client.dicom.synth_phantom.draw_lesion`,
:func:`~client.dicom.synth_phantom.render_slice`, the site profiles and the same CT header);
the mask of a slice is the geometric cross-section of the lesion sphere at that slice,
intersected with the liver, exactly the region to which ``render_slice`` adds the lesion
contrast (where the logistic edge profile exceeds one half). Negative patients and slices
that miss the lesion get an all-zero mask.

Why a mask *series* and not DICOM SEG. A real Segmentation IOD (PS3.3 A.51, SOP Class
1.2.840.10008.5.1.4.1.1.66.4) needs the Segment Sequence, the multi-frame functional groups
and the per-frame Derivation Image references; writing it correctly needs ``highdicom``,
which is not a dependency. Each mask is therefore a single-frame Secondary Capture Image
Storage instance (SOP Class 1.2.840.10008.5.1.4.1.1.7):

* same (0020,000D) Study Instance UID and (0020,0052) Frame of Reference UID as its image,
  its own (0020,000E) Series Instance UID, (0020,0011) Series Number 2;
* (0008,0060) Modality ``OT``, (0008,103E) Series Description :data:`MASK_SERIES_DESCRIPTION`,
  (0008,0008) Image Type ``DERIVED\\SECONDARY\\MASK``, (0008,0064) Conversion Type ``SYN``;
* 8-bit unsigned MONOCHROME2 pixels ((0028,0100) Bits Allocated = (0028,0101) Bits Stored
  = 8), value :data:`LESION_VALUE` inside the lesion and 0 elsewhere;
* (0008,1140) Referenced Image Sequence with one item whose (0008,1150) Referenced SOP Class
  UID and (0008,1155) Referenced SOP Instance UID name the CT image; this is how
  :mod:`client.data.segmentation` pairs masks with images.

No ``labels.csv`` is written: the masks are the targets, and a study-level labels file would
let the classification loader (:mod:`client.data.node_data`) mistake mask instances for
images. Privacy: as for :mod:`client.dicom.synth` (pseudonyms, (0012,0062) Patient Identity
Removed ``YES``, no dates, no institution); UIDs are hashed from the seed with their own
namespace, so they never collide with the classification federation's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage

# The CT images are drawn and encoded by the same code as the classification data.
from client.dicom.synth_common import (
    CtSlice,
    SyntheticPatient,
    UidMaker,
    synthesize_sites,
    synthetic_instance,
    write_patients,
)
from client.dicom.synth_phantom import SLICE_GAP_MM, Anatomy, Lesion
from client.dicom.synth_profiles import SiteProfile
from common.errors import ConfigError

__all__ = [
    "LESION_VALUE",
    "MASK_MODALITY",
    "MASK_SERIES_DESCRIPTION",
    "SegSiteSummary",
    "lesion_mask",
    "synthesize_segmentation_federation",
    "synthesize_segmentation_site",
]

logger = logging.getLogger(__name__)

MASK_MODALITY = "OT"
"""(0008,0060) Modality of the mask instances."""

MASK_SERIES_DESCRIPTION = "LESION MASK"
"""(0008,103E) Series Description of the mask series."""

LESION_VALUE = 1
"""Stored pixel value of lesion pixels in a mask (background is 0)."""

DEFAULT_PREVALENCE = 0.7
"""Share of patients with a lesion (higher than the classification data: more to segment)."""

_UID_NAMESPACE = "vesalius-synth-seg-v1"


@dataclass(frozen=True)
class SegSiteSummary:
    """What one site received: patients, image/mask pairs, lesion pixels written."""

    site: str
    path: Path
    patients: int
    images: int
    lesion_images: int
    lesion_pixels: int


def lesion_mask(
    anatomy: Anatomy, lesion: Lesion | None, *, z_mm: float, size: int, spacing_mm: float
) -> NDArray[np.uint8]:
    """Return the ``(size, size)`` lesion mask of one slice (1 inside, 0 outside).

    Same pixel grid and geometry as :func:`client.dicom.synth_phantom.render_slice`: the
    disc of radius ``sqrt(r^2 - dz^2)`` around the lesion centre, inside the (z-tapered)
    liver.
    """
    out = np.zeros((size, size), dtype=np.uint8)
    if lesion is None:
        return out
    dz = z_mm - lesion.cz
    if abs(dz) >= lesion.radius_mm:
        return out
    coords = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * spacing_mm
    x, y = np.meshgrid(coords, coords)
    taper = 1.0 - anatomy.z_taper * abs(z_mm) / SLICE_GAP_MM
    r_slice = float(np.sqrt(lesion.radius_mm**2 - dz**2))
    inside = (np.hypot(x - lesion.cx, y - lesion.cy) < r_slice) & anatomy.liver.mask(
        x, y, scale=taper
    )
    out[inside] = LESION_VALUE
    return out


def _mask_dataset(
    mask: NDArray[np.uint8], image: Dataset, *, sop_uid: str, series_uid: str
) -> Dataset:
    """Build a Secondary Capture mask instance referencing the CT ``image``."""
    ds = synthetic_instance(
        SecondaryCaptureImageStorage,
        sop_uid,
        image_type=["DERIVED", "SECONDARY", "MASK"],
        modality=MASK_MODALITY,
        patient_id=str(image.PatientID),
    )
    ds.ConversionType = "SYN"
    ds.Manufacturer = image.Manufacturer
    ds.StudyDescription = image.StudyDescription
    ds.SeriesDescription = MASK_SERIES_DESCRIPTION
    ds.StudyInstanceUID = image.StudyInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = image.FrameOfReferenceUID
    ds.StudyID = image.StudyID
    ds.SeriesNumber = 2
    ds.InstanceNumber = image.InstanceNumber
    ds.ImagePositionPatient = image.ImagePositionPatient
    ds.ImageOrientationPatient = image.ImageOrientationPatient
    ds.PixelSpacing = image.PixelSpacing
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
    ds.ReferencedImageSequence = Sequence([ref])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(mask.shape[0]), int(mask.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(mask, dtype=np.uint8).tobytes()
    return ds


def _write_study(
    study_dir: Path, patient: SyntheticPatient, slices: Iterator[CtSlice], uid: UidMaker
) -> tuple[int, int, int]:
    """Write one patient's CT series and mask series; return (images, lesion images, pixels)."""
    mask_series_uid = uid("mask-series")
    (study_dir / "SE1").mkdir(parents=True, exist_ok=True)
    (study_dir / "SE2").mkdir(parents=True, exist_ok=True)
    lesion_images = lesion_pixels = 0
    for ct in slices:
        k = ct.index
        ct.dataset.save_as(study_dir / "SE1" / f"IM{k + 1}.dcm", enforce_file_format=True)
        mask = lesion_mask(
            patient.anatomy,
            patient.lesion,
            z_mm=ct.z_mm,
            size=int(ct.dataset.Rows),
            spacing_mm=ct.spacing_mm,
        )
        mask_ds = _mask_dataset(
            mask, ct.dataset, sop_uid=uid("mask", str(k)), series_uid=mask_series_uid
        )
        mask_ds.save_as(study_dir / "SE2" / f"MASK{k + 1}.dcm", enforce_file_format=True)
        count = int(mask.sum())
        lesion_pixels += count
        lesion_images += int(count > 0)
    return patient.n_images, lesion_images, lesion_pixels


def synthesize_segmentation_site(
    site_dir: str | Path,
    profile: SiteProfile,
    *,
    site_index: int,
    patients: int,
    images_per_patient: tuple[int, int] = (2, 4),
    image_size: int = 64,
    seed: int = 0,
    prevalence: float | None = DEFAULT_PREVALENCE,
    on_patient: Callable[[], None] | None = None,
) -> SegSiteSummary:
    """Write one hospital's CT series and lesion-mask series into ``site_dir``.

    Parameters
    ----------
    site_dir : str or Path
        Destination folder; created if missing.
    profile : SiteProfile
        The hospital's acquisition characteristics.
    site_index : int
        Zero-based site index (part of the pseudonym and of the random stream).
    patients : int
        Pseudo-patients (one study each).
    images_per_patient : tuple of int
        Inclusive range of slices per study.
    image_size : int
        (0028,0010) Rows = (0028,0011) Columns of images and masks.
    seed : int
        Seed; the same arguments give byte-identical files.
    prevalence : float or None
        Share of patients with a lesion; ``None`` keeps the profile's prevalence.
    on_patient : callable, optional
        Called after each patient.

    Returns
    -------
    SegSiteSummary
        Counts of what was written.
    """
    if prevalence is not None:
        profile = dataclasses.replace(profile, prevalence=prevalence)
    site_path, written = write_patients(
        site_dir,
        profile,
        _write_study,
        uid_namespace=_UID_NAMESPACE,
        stream_suffix=(1,),
        site_index=site_index,
        patients=patients,
        images_per_patient=images_per_patient,
        image_size=image_size,
        seed=seed,
        on_patient=on_patient,
    )
    images = sum(n for n, _, _ in written)
    lesion_images = sum(with_lesion for _, with_lesion, _ in written)
    lesion_pixels = sum(pixels for _, _, pixels in written)
    logger.info(
        "synthesised segmentation %s: %d patients, %d images, %d with lesion",
        profile.name, patients, images, lesion_images,
    )
    return SegSiteSummary(
        site=profile.name,
        path=site_path,
        patients=patients,
        images=images,
        lesion_images=lesion_images,
        lesion_pixels=lesion_pixels,
    )


def synthesize_segmentation_federation(
    out_dir: str | Path,
    *,
    n_sites: int = 3,
    patients_per_site: int = 60,
    images_per_patient: tuple[int, int] = (2, 4),
    image_size: int = 64,
    seed: int = 0,
    prevalence: float | None = DEFAULT_PREVALENCE,
    progress: Callable[[int, int], None] | None = None,
) -> list[SegSiteSummary]:
    """Write a synthetic segmentation federation of ``n_sites`` hospitals under ``out_dir``.

    Site ``k`` goes to ``out_dir/site-k`` with the profiles of
    :func:`client.dicom.synth_profiles.default_profiles`; a non-empty site folder is refused.
    Other parameters as :func:`synthesize_segmentation_site`; ``progress(done, total)`` is
    called after each patient over all sites.
    """
    if prevalence is not None and not 0.0 <= prevalence <= 1.0:
        raise ConfigError(f"prevalence must be in [0, 1], got {prevalence}")
    return synthesize_sites(
        out_dir,
        functools.partial(synthesize_segmentation_site, prevalence=prevalence),
        n_sites=n_sites,
        patients_per_site=patients_per_site,
        images_per_patient=images_per_patient,
        image_size=image_size,
        seed=seed,
        progress=progress,
    )
