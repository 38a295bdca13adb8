"""Is a DICOM header de-identified?

Rule (in the spirit of the DICOM PS3.15 Annex E Basic Application Level Confidentiality
Profile): a file counts as de-identified when

1. (0012,0062) Patient Identity Removed is ``"YES"``, and
2. none of the direct identifiers in :data:`DIRECT_IDENTIFIERS` holds a non-empty value.

(0010,0010) Patient's Name and (0010,0020) Patient ID are *not* checked: after
de-identification they hold a pseudonym, and the node needs (0010,0020) to group images by
patient. Dates other than the birth date (study/acquisition dates) are not checked either;
the Basic Profile allows them to be shifted rather than removed.

Privacy caveat: this is a header check only. It cannot find identifiers burned into the
pixels ((0028,0301) Burned In Annotation is checked when present), nor in private tags,
free-text comments or file names; the hospital's de-identification pipeline remains
responsible for those.
"""

from __future__ import annotations

from collections import abc
from dataclasses import dataclass

from pydicom.dataset import Dataset

#: Keywords of direct identifiers that must be empty or absent, with their tags.
DIRECT_IDENTIFIERS: tuple[tuple[str, str], ...] = (
    ("PatientBirthDate", "(0010,0030) Patient's Birth Date"),
    ("PatientBirthTime", "(0010,0032) Patient's Birth Time"),
    ("PatientAddress", "(0010,1040) Patient's Address"),
    ("PatientTelephoneNumbers", "(0010,2154) Patient's Telephone Numbers"),
    ("OtherPatientIDs", "(0010,1000) Other Patient IDs"),
    ("OtherPatientIDsSequence", "(0010,1002) Other Patient IDs Sequence"),
    ("OtherPatientNames", "(0010,1001) Other Patient Names"),
    ("PatientBirthName", "(0010,1005) Patient's Birth Name"),
    ("PatientMotherBirthName", "(0010,1060) Patient's Mother's Birth Name"),
    ("MedicalRecordLocator", "(0010,1090) Medical Record Locator"),
    ("ReferringPhysicianName", "(0008,0090) Referring Physician's Name"),
    ("ReferringPhysicianAddress", "(0008,0092) Referring Physician's Address"),
    ("ReferringPhysicianTelephoneNumbers", "(0008,0094) Referring Physician's Telephone Numbers"),
    ("InstitutionName", "(0008,0080) Institution Name"),
    ("InstitutionAddress", "(0008,0081) Institution Address"),
    ("InstitutionalDepartmentName", "(0008,1040) Institutional Department Name"),
    ("PerformingPhysicianName", "(0008,1050) Performing Physician's Name"),
    ("OperatorsName", "(0008,1070) Operators' Name"),
    ("AdmissionID", "(0038,0010) Admission ID"),
)


@dataclass(frozen=True)
class PhiVerdict:
    """Outcome of :func:`check_deidentified`.

    Attributes
    ----------
    deidentified : bool
        ``True`` when the header passes the rule above.
    findings : tuple[str, ...]
        Names (tag + description, never values) of what failed the check.
    """

    deidentified: bool
    findings: tuple[str, ...]


def _is_empty(value: object) -> bool:
    """Return ``True`` for ``None``, blank text and empty (or all-blank) multi-values."""
    if value is None:
        return True
    if isinstance(value, (str, bytes)):
        return len(value.strip()) == 0
    if isinstance(value, Dataset):
        return len(value) == 0
    if isinstance(value, abc.Sequence) or isinstance(value, abc.MutableSequence):
        return all(_is_empty(item) for item in value)
    return str(value).strip() == ""


def check_deidentified(ds: Dataset) -> PhiVerdict:
    """Check a (header-only) dataset against the de-identification rule.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Dataset read with ``stop_before_pixels=True`` or deferred pixel data.

    Returns
    -------
    PhiVerdict
        The verdict and the names of the failing attributes (no tag values).
    """
    findings: list[str] = []
    removed = str(ds.get("PatientIdentityRemoved", "") or "").strip().upper()
    if removed != "YES":
        findings.append("(0012,0062) Patient Identity Removed is not YES")
    for keyword, name in DIRECT_IDENTIFIERS:
        if keyword in ds and not _is_empty(ds[keyword].value):
            findings.append(name)
    burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned_in == "YES":
        findings.append("(0028,0301) Burned In Annotation is YES")
    return PhiVerdict(deidentified=not findings, findings=tuple(findings))


def is_deidentified(ds: Dataset) -> bool:
    """Return ``True`` when :func:`check_deidentified` finds nothing."""
    return check_deidentified(ds).deidentified
