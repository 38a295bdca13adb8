"""Which studies of a node can be read as one volume: the series check of ``node check``.

A federation with ``--samples volume-3d`` or ``series`` trains on one volume per study: the
study's longest series that :func:`client.dicom.volume.assemble_volumes` assembles (slices
sorted along the normal of (0020,0037) Image Orientation (Patient) by (0020,0032) Image
Position (Patient)). :func:`check_series` runs the same assembly on headers only, per study,
and reports every series that does not assemble with its code (a gap, mixed orientations,
inconsistent spacing, ...) and the study folder it lies in (local paths: ``node check`` is
local), so a hospital sees before a run which studies would be left out and why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import PurePosixPath

from client.dicom.index import DicomIndex, InstanceRecord
from client.dicom.volume import SeriesCode, assemble_volumes

__all__ = ["SeriesCheck", "check_series"]


@dataclass(frozen=True)
class SeriesCheck:
    """The outcome of :func:`check_series`.

    Attributes
    ----------
    studies : int
        Studies with at least one usable image.
    volumes : int
        Studies with at least one series that assembles (what volume training reads).
    codes : dict[str, int]
        Series per outcome code (:class:`client.dicom.volume.SeriesCode`), nonzero only.
    problems : tuple[dict[str, object], ...]
        One row per series that does not assemble: ``folder`` (the study's folder relative
        to the data folder), ``code``, ``text`` (tags and counts only) and ``slices``.
    """

    studies: int
    volumes: int
    codes: dict[str, int]
    problems: tuple[dict[str, object], ...]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready mapping (``node check --format json``'s ``series``)."""
        return {"studies": self.studies, "volumes": self.volumes, "codes": dict(self.codes),
                "problems": list(self.problems)}


def _folder(records: list[InstanceRecord]) -> str:
    parents = {str(PurePosixPath(r.relpath).parent) for r in records}
    return min(parents) if parents else "."


def check_series(index: DicomIndex) -> SeriesCheck:
    """Assemble every study's series from headers alone and report what does not assemble."""
    studies: dict[tuple[str, str], list[InstanceRecord]] = {}
    for rec in index.instances():
        studies.setdefault((rec.patient_id, rec.study_instance_uid), []).append(rec)
    codes: Counter[str] = Counter()
    problems: list[dict[str, object]] = []
    volumes = 0
    for _key, records in sorted(studies.items()):
        outcome = assemble_volumes([r.path for r in records], decode=False)
        codes.update(r.code.value for r in outcome.series)
        if any(r.code is SeriesCode.ASSEMBLED for r in outcome.series):
            volumes += 1
        problems.extend({"folder": _folder(records), "code": r.code.value, "text": r.text,
                         "slices": r.slices} for r in outcome.series if not r.ok)
    return SeriesCheck(studies=len(studies), volumes=volumes, codes=dict(codes),
                       problems=tuple(problems))
