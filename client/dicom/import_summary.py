"""What ``vesalius import`` wrote: per node data directory, and the notes for the user."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.data.labels import BINARY_LABELS
from client.dicom.import_source import ImageKind, ImportPlan

__all__ = ["ImportSummary", "SiteImport", "summary_notes"]


@dataclass(frozen=True)
class SiteImport:
    """What one node data directory of an import holds.

    Attributes
    ----------
    site : str or None
        ``site-k``, or ``None`` when ``OUT`` itself is the node data directory.
    folder : Path
        The node data directory.
    patients, files : int
        Patients (= studies) and DICOM files written.
    label_counts : dict of int to int
        Patients per label.
    """

    site: str | None
    folder: Path
    patients: int
    files: int
    label_counts: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return {"site": self.site, "folder": str(self.folder), "patients": self.patients,
                "files": self.files,
                "labels": {str(k): v for k, v in sorted(self.label_counts.items())}}


@dataclass(frozen=True)
class ImportSummary:
    """The outcome of :func:`import_dataset`.

    Attributes
    ----------
    source_kind : str
        ``"npz"`` or ``"images"``.
    kind : ImageKind
        2-D images or 3-D volumes.
    out : Path
        The output folder.
    sites : tuple of SiteImport
        One per node data directory written.
    colour_converted : int
        Colour images converted to greyscale.
    notes : tuple of str
        What the user should know about the output (one sentence each).
    """

    source_kind: str
    kind: ImageKind
    out: Path
    sites: tuple[SiteImport, ...]
    colour_converted: int
    notes: tuple[str, ...]

    @property
    def files(self) -> int:
        """DICOM files written."""
        return sum(s.files for s in self.sites)

    @property
    def patients(self) -> int:
        """Patients (= studies) written."""
        return sum(s.patients for s in self.sites)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping (``vesalius import --format json``)."""
        return {"source": self.source_kind, "kind": self.kind.value, "out": str(self.out),
                "files": self.files, "patients": self.patients,
                "colour_converted": self.colour_converted,
                "sites": [s.to_dict() for s in self.sites], "notes": list(self.notes)}



def summary_notes(plan: ImportPlan, pixel_spacing_mm: float, converted: int) -> tuple[str, ...]:
    """The notes of an import's summary: nominal spacing, colour, volumes, non-binary labels."""
    notes = [f"(0028,0030) Pixel Spacing is {pixel_spacing_mm:g} mm, a nominal value: "
             "the source does not record it"]
    if converted:
        notes.append(f"{converted} colour image(s) were converted to greyscale (ITU-R BT.601 "
                     "luma): the node reads single-sample MONOCHROME2 images only")
    if plan.kind is ImageKind.VOLUME_3D:
        notes.append("each 3-D volume was written as one series of slices (one patient, one "
                     "study): train on volumes with --model cnn3d --samples volume-3d (or on "
                     "slices as 2-D images with the default --samples image-2d)")
    if any(label not in BINARY_LABELS for label in plan.labels):
        notes.append("some labels are neither 0 nor 1: train them as a multiclass (or "
                     "ordinal) task with --task multiclass --num-classes K, and check the "
                     "folders with vesalius node check --task multiclass --num-classes K")
    return tuple(notes)
