"""The ingestion report of a node: what was scanned, used, skipped and labelled.

The report is local: its skipped list holds paths relative to the data directory, which
may be identifying. Only the aggregate counts (``skip_counts``, patients, studies, series,
``label_counts``) are candidates to leave the node, and only through the privacy-aware
statistics path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from client.dicom.index import DicomIndex
from client.dicom.phi import ASSUMED_OPTIONS, DeidOption
from client.dicom.reasons import SkipCode, SkippedFile

UNLABELLED = "unlabelled"
#: Values of ``pixels_checked``.
HEADER_ONLY = "header only"
DECODED = "decoded"


@dataclass(frozen=True)
class IngestionReport:
    """Summary of one scan of a node's data directory.

    Attributes
    ----------
    files_seen : int
        Files considered (hidden files and ``labels.csv`` excluded).
    files_used : int
        Usable DICOM images (indexed).
    skipped : tuple[SkippedFile, ...]
        Every skipped file with its reason, in relative-path order.
    num_patients, num_studies, num_series : int
        Distinct (0010,0020) Patient IDs, (0020,000D) studies and (0020,000E) series
        among the usable files.
    label_counts : Mapping[str, int]
        Usable *images* per label (``"0"``, ``"1"``, ...) and ``"unlabelled"``.
    labelled_patients : int
        Patients with at least one labelled usable image.
    unmatched_label_rows : int
        Labels CSV rows whose (patient, study) has no usable image.
    require_deidentified : bool
        Whether files failing the de-identification check were skipped.
    fingerprint : str
        Hex SHA-256 of the usable files (see :meth:`DicomIndex.fingerprint`).
    pixels_checked : str
        ``"decoded"`` when every usable file's pixels were decoded once during the scan,
        ``"header only"`` when only headers (and a byte-order sample) were read: a file may
        then still fail to decode at training time.
    deidentification_options : Mapping[str, int]
        Usable files per PS3.15 option declared in (0012,0064) De-identification Method
        Code Sequence (code meanings of PS3.16 CID 7050; fixed vocabulary, no file text).
    """

    files_seen: int
    files_used: int
    skipped: tuple[SkippedFile, ...]
    num_patients: int
    num_studies: int
    num_series: int
    label_counts: Mapping[str, int] = field(default_factory=dict)
    labelled_patients: int = 0
    unmatched_label_rows: int = 0
    require_deidentified: bool = True
    fingerprint: str = ""
    pixels_checked: str = HEADER_ONLY
    deidentification_options: Mapping[str, int] = field(default_factory=dict)

    @property
    def skip_counts(self) -> dict[str, int]:
        """Number of skipped files per reason code (every code listed, zeros included)."""
        counts = Counter(s.code.value for s in self.skipped)
        return {code.value: counts.get(code.value, 0) for code in SkipCode}

    @property
    def labelled_images(self) -> int:
        """Usable images that have a label."""
        return sum(n for k, n in self.label_counts.items() if k != UNLABELLED)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready mapping (used by ``vesalius node check --format json``)."""
        return {
            "files_seen": self.files_seen,
            "files_used": self.files_used,
            "files_skipped": len(self.skipped),
            "skip_counts": self.skip_counts,
            "skipped": [s.to_dict() for s in self.skipped],
            "patients": self.num_patients,
            "studies": self.num_studies,
            "series": self.num_series,
            "label_counts": dict(self.label_counts),
            "labelled_images": self.labelled_images,
            "labelled_patients": self.labelled_patients,
            "unmatched_label_rows": self.unmatched_label_rows,
            "require_deidentified": self.require_deidentified,
            "deidentification_rule": {
                "profile": "PS3.15 Annex E Basic Application Level Confidentiality Profile",
                "assumed_options": [o.meaning for o in ASSUMED_OPTIONS],
            },
            "deidentification_options": dict(self.deidentification_options),
            "pixels_checked": self.pixels_checked,
            "fingerprint": self.fingerprint,
        }


def build_report(
    *,
    files_seen: int,
    skipped: tuple[SkippedFile, ...],
    index: DicomIndex,
    labels: Mapping[tuple[str, str], int],
    require_deidentified: bool,
    pixels_decoded: bool = False,
) -> IngestionReport:
    """Assemble an :class:`IngestionReport` from a scan, its index and the study labels.

    Labels join on ((0010,0020) Patient ID, (0020,000D) Study Instance UID).
    """
    counts: Counter[str] = Counter()
    labelled_patients: set[str] = set()
    used_keys: set[tuple[str, str]] = set()
    options: Counter[str] = Counter()
    for rec in index.instances():
        options.update(DeidOption(code).meaning for code in rec.deidentification_options)
        key = (rec.patient_id, rec.study_instance_uid)
        used_keys.add(key)
        label = labels.get(key)
        if label is None:
            counts[UNLABELLED] += 1
        else:
            counts[str(label)] += 1
            labelled_patients.add(rec.patient_id)
    ordered = {k: counts[k] for k in sorted((k for k in counts if k != UNLABELLED), key=int)}
    ordered[UNLABELLED] = counts.get(UNLABELLED, 0)
    return IngestionReport(
        files_seen=files_seen,
        files_used=len(index),
        skipped=skipped,
        num_patients=index.num_patients,
        num_studies=index.num_studies,
        num_series=index.num_series,
        label_counts=ordered,
        labelled_patients=len(labelled_patients),
        unmatched_label_rows=sum(1 for k in labels if k not in used_keys),
        require_deidentified=require_deidentified,
        fingerprint=index.fingerprint(),
        pixels_checked=DECODED if pixels_decoded else HEADER_ONLY,
        deidentification_options=dict(sorted(options.items())),
    )
