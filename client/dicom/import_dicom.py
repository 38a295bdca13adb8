"""DICOM files written by ``vesalius import``: Secondary Capture images of one study per patient.

Each imported image becomes one Secondary Capture Image Storage instance
(1.2.840.10008.5.1.4.1.1.7, PS3.3 A.8.1), Explicit VR Little Endian, started with
:func:`client.dicom.synth_common.synthetic_instance` (file meta, SOP identity and the
de-identified Patient module) and completed here:

* (0010,0010) Patient's Name = (0010,0020) Patient ID = the pseudonym; (0012,0062) Patient
  Identity Removed ``YES``; (0012,0063) De-identification Method :data:`IMPORT_METHOD`;
  (0012,0064) the Basic Profile and the Clean Descriptors Option (the study and series
  descriptions are fixed, generic text);
* General Study, General Series and SC Equipment modules: UIDs from
  :func:`pydicom.uid.generate_uid`, derived from the content (a re-import repeats them),
  (0008,0060) Modality ``OT``, (0008,0064) Conversion Type
  ``WSD``; the type 2 attributes (dates, times, (0008,0090) Referring Physician's Name,
  (0008,0050) Accession Number, (0010,0030) Patient's Birth Date) are present and empty;
* Image Pixel module: (0028,0004) Photometric Interpretation MONOCHROME2, one sample per
  pixel, 8 or 16 bits as the source; (0028,0030) Pixel Spacing (nominal: public image
  collections rarely state it);
* for the slices of a 3-D volume, the Image Plane attributes: (0020,0032) Image Position
  (Patient), (0020,0037) Image Orientation (Patient) (axial, ``1\\0\\0\\0\\1\\0``),
  (0018,0050) Slice Thickness, (0018,0088) Spacing Between Slices, (0020,1041) Slice
  Location and a (0020,0052) Frame of Reference UID shared by the series.

Privacy: nothing of the source is written but the pixels: no file name, no source id, no
date. The header is checked by :func:`client.dicom.phi.check_deidentified` like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from client.dicom.import_source import Pixels
from client.dicom.synth_common import StudyIds, synthetic_instance

__all__ = [
    "IMPLEMENTATION_VERSION",
    "IMPORT_METHOD",
    "VolumeGeometry",
    "image_dataset",
    "new_study_ids",
    "pseudonym",
    "write_study",
]

#: Text written to (0012,0063) De-identification Method (a Long String: at most 64 characters).
IMPORT_METHOD = "vesalius import: source pixels only; pseudonym ids; hashed UIDs"
#: (0002,0013) Implementation Version Name of the files written.
IMPLEMENTATION_VERSION = "VESALIUS_IMPORT"
_STUDY_DESCRIPTION = "Imported image collection"


@dataclass(frozen=True)
class VolumeGeometry:
    """Where the slices of one volume lie (axial, along +z).

    Attributes
    ----------
    slice_thickness_mm : float
        (0018,0050) Slice Thickness, also the distance between slice centres.
    """

    slice_thickness_mm: float

    def z_mm(self, index: int) -> float:
        """Slice ``index``'s position along z: ``index * slice_thickness_mm``."""
        return index * self.slice_thickness_mm


def pseudonym(patient: int) -> str:
    """The pseudonym of the zero-based ``patient``: ``IMP-000001`` for 0 (at least 6 digits)."""
    return f"IMP-{patient + 1:06d}"


def new_study_ids(patient_id: str, content_key: str) -> StudyIds:
    """Study, series and frame-of-reference UIDs for one patient's study.

    Derived (:func:`pydicom.uid.generate_uid` with ``entropy_srcs``) from the pseudonym and a
    digest of the patient's pixels and label, so that importing the same source again gives
    the same UIDs, hence the same dataset fingerprint, and the node's ledger goes on counting
    the same privacy budget instead of starting a fresh one. The UIDs reveal nothing of the
    source: they are hashes under pydicom's UID root.
    """
    def uid(part: str) -> str:
        return str(generate_uid(entropy_srcs=["vesalius-import", content_key, patient_id, part]))

    return StudyIds(patient_id=patient_id, study_uid=uid("study"), series_uid=uid("series"),
                    frame_uid=uid("frame"), study_id="1")


def _decimal(value: float) -> str:
    """A Decimal String (DS) value of at most 16 characters."""
    return f"{value:.6g}"


def image_dataset(
    pixels: Pixels,
    *,
    ids: StudyIds,
    instance_number: int,
    pixel_spacing_mm: float,
    volume: VolumeGeometry | None = None,
) -> Dataset:
    """Build one Secondary Capture dataset (file meta included) for ``pixels``.

    Parameters
    ----------
    pixels : ndarray
        ``(rows, columns)`` uint8 or uint16 greyscale pixels.
    ids : StudyIds
        The patient's pseudonym and the study, series and frame-of-reference UIDs.
    instance_number : int
        (0020,0013) Instance Number, 1-based; for a volume slice, its index + 1.
    pixel_spacing_mm : float
        (0028,0030) Pixel Spacing, both directions.
    volume : VolumeGeometry, optional
        Given for the slices of a 3-D volume: adds the Image Plane attributes.

    Returns
    -------
    Dataset
        Ready to ``save_as(..., enforce_file_format=True)``.
    """
    ds = synthetic_instance(
        SecondaryCaptureImageStorage,
        str(generate_uid(entropy_srcs=[ids.series_uid, str(instance_number)])),
        image_type=["DERIVED", "SECONDARY"],
        modality="OT",
        patient_id=ids.patient_id,
    )
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.DeidentificationMethod = IMPORT_METHOD
    ds.PatientBirthDate = ""
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = ""
    ds.StudyDescription = _STUDY_DESCRIPTION
    ds.SeriesDescription = "Imported volume slices" if volume else "Imported images"
    ds.StudyInstanceUID = ids.study_uid
    ds.SeriesInstanceUID = ids.series_uid
    ds.StudyID = ids.study_id
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ConversionType = "WSD"
    ds.PatientOrientation = ""
    ds.set_pixel_data(np.ascontiguousarray(pixels), "MONOCHROME2",
                      8 * pixels.dtype.itemsize, generate_instance_uid=False)
    ds.PixelSpacing = [_decimal(pixel_spacing_mm), _decimal(pixel_spacing_mm)]
    if volume is not None:
        z_mm = volume.z_mm(instance_number - 1)
        ds.FrameOfReferenceUID = ids.frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [
            _decimal(-0.5 * pixel_spacing_mm * (pixels.shape[1] - 1)),
            _decimal(-0.5 * pixel_spacing_mm * (pixels.shape[0] - 1)),
            _decimal(z_mm),
        ]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceThickness = _decimal(volume.slice_thickness_mm)
        ds.SpacingBetweenSlices = _decimal(volume.slice_thickness_mm)
        ds.SliceLocation = _decimal(z_mm)
    return ds


def write_study(
    study_dir: Path,
    ids: StudyIds,
    images: tuple[Pixels, ...],
    *,
    pixel_spacing_mm: float,
    volume: VolumeGeometry | None = None,
) -> int:
    """Write one patient's study, one series: ``study_dir/SE1/IM<n>.dcm``.

    Parameters
    ----------
    study_dir : Path
        ``<node>/dicom/<pseudonym>/ST1``; created.
    ids : StudyIds
        See :func:`image_dataset`.
    images : tuple of ndarray
        The 2-D images, or a volume's slices in order.
    pixel_spacing_mm : float
        (0028,0030) Pixel Spacing.
    volume : VolumeGeometry, optional
        Given when ``images`` are the slices of one volume.

    Returns
    -------
    int
        The number of files written.
    """
    series_dir = study_dir / "SE1"
    series_dir.mkdir(parents=True, exist_ok=True)
    for number, pixels in enumerate(images, start=1):
        ds = image_dataset(pixels, ids=ids, instance_number=number,
                           pixel_spacing_mm=pixel_spacing_mm, volume=volume)
        ds.save_as(series_dir / f"IM{number}.dcm", enforce_file_format=True)
    return len(images)
