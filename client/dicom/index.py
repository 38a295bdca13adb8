"""Patient -> study -> series -> instance index of the usable DICOM files of a node.

Built from header-only scan results (see :mod:`client.dicom.scan`). The index is immutable:
every level is a tuple sorted by its identifier, and the instances of a series are sorted by
(0020,0013) Instance Number (files without one come last, then by SOP Instance UID).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class InstanceRecord:
    """One usable DICOM file, described by its header.

    Attributes
    ----------
    path : Path
        Absolute path (local use only; never sent off the node).
    relpath : str
        Path relative to the data directory, POSIX separators.
    file_size : int
        Size in bytes.
    patient_id : str
        (0010,0020) Patient ID (a pseudonym on de-identified data).
    study_instance_uid : str
        (0020,000D) Study Instance UID.
    series_instance_uid : str
        (0020,000E) Series Instance UID.
    sop_instance_uid : str
        (0008,0018) SOP Instance UID.
    instance_number : int | None
        (0020,0013) Instance Number, when present and an integer.
    rows, columns : int
        (0028,0010) Rows and (0028,0011) Columns.
    number_of_frames : int
        (0028,0008) Number of Frames (1 when absent).
    modality : str
        (0008,0060) Modality ("" when absent).
    deidentification_options : tuple[str, ...]
        Recognised PS3.16 CID 7050 codes of (0012,0064) De-identification Method Code
        Sequence (see :class:`client.dicom.phi.DeidOption`); empty when the file declares
        none or the de-identification check was not required.
    """

    path: Path
    relpath: str
    file_size: int
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    instance_number: int | None
    rows: int
    columns: int
    number_of_frames: int = 1
    modality: str = ""
    deidentification_options: tuple[str, ...] = ()


def _instance_sort_key(rec: InstanceRecord) -> tuple[int, int, str]:
    if rec.instance_number is None:
        return (1, 0, rec.sop_instance_uid)
    return (0, rec.instance_number, rec.sop_instance_uid)


@dataclass(frozen=True)
class SeriesEntry:
    """A series: (0020,000E) Series Instance UID and its instances sorted by Instance Number."""

    series_instance_uid: str
    instances: tuple[InstanceRecord, ...]


@dataclass(frozen=True)
class StudyEntry:
    """A study: (0020,000D) Study Instance UID and its series sorted by UID."""

    study_instance_uid: str
    series: tuple[SeriesEntry, ...]

    def instances(self) -> Iterator[InstanceRecord]:
        """Iterate over the study's instances, series by series."""
        for series in self.series:
            yield from series.instances


@dataclass(frozen=True)
class PatientEntry:
    """A patient: (0010,0020) Patient ID and their studies sorted by UID."""

    patient_id: str
    studies: tuple[StudyEntry, ...]

    def instances(self) -> Iterator[InstanceRecord]:
        """Iterate over the patient's instances, study by study."""
        for study in self.studies:
            yield from study.instances()


@dataclass(frozen=True)
class DicomIndex:
    """Immutable patient -> study -> series -> instance tree."""

    patients: tuple[PatientEntry, ...]

    @classmethod
    def from_records(cls, records: Iterable[InstanceRecord]) -> DicomIndex:
        """Group records into the tree; each level sorted by identifier.

        Parameters
        ----------
        records : Iterable[InstanceRecord]
            Usable files; SOP Instance UIDs are expected to be unique (the scanner drops
            duplicates).
        """
        tree: dict[str, dict[str, dict[str, list[InstanceRecord]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list))
        )
        for rec in records:
            tree[rec.patient_id][rec.study_instance_uid][rec.series_instance_uid].append(rec)
        patients = tuple(
            PatientEntry(
                patient_id=pid,
                studies=tuple(
                    StudyEntry(
                        study_instance_uid=study_uid,
                        series=tuple(
                            SeriesEntry(
                                series_instance_uid=series_uid,
                                instances=tuple(sorted(insts, key=_instance_sort_key)),
                            )
                            for series_uid, insts in sorted(series_map.items())
                        ),
                    )
                    for study_uid, series_map in sorted(study_map.items())
                ),
            )
            for pid, study_map in sorted(tree.items())
        )
        return cls(patients=patients)

    def instances(self) -> Iterator[InstanceRecord]:
        """Iterate over every instance in tree order."""
        for patient in self.patients:
            yield from patient.instances()

    def __len__(self) -> int:
        return sum(1 for _ in self.instances())

    @property
    def num_patients(self) -> int:
        """Number of distinct (0010,0020) Patient IDs."""
        return len(self.patients)

    @property
    def num_studies(self) -> int:
        """Number of distinct (patient, study) pairs."""
        return sum(len(p.studies) for p in self.patients)

    @property
    def num_series(self) -> int:
        """Number of distinct (patient, study, series) triples."""
        return sum(len(s.series) for p in self.patients for s in p.studies)

    def fingerprint(self) -> str:
        """Return the dataset fingerprint (hex SHA-256).

        The hash covers the sorted ``(SOP Instance UID, file size)`` pairs of the usable
        files, so it changes when a file is added, removed or rewritten with another size,
        and not when files are moved or renamed. Used by the privacy ledger to tie spends
        to a dataset version. It reveals nothing beyond what the UIDs reveal and stays on
        the node with the ledger.
        """
        return dataset_fingerprint(self.instances())


def dataset_fingerprint(records: Iterable[InstanceRecord]) -> str:
    """SHA-256 (hex) over sorted ``(sop_instance_uid, file_size)`` pairs; see ``fingerprint``."""
    h = hashlib.sha256()
    for uid, size in sorted((r.sop_instance_uid, r.file_size) for r in records):
        h.update(f"{uid}\x1f{size}\n".encode())
    return h.hexdigest()
