"""Is a DICOM header de-identified? A check against DICOM PS3.15 Annex E.

The rule follows Table E.1-1 of the Basic Application Level Confidentiality Profile
(PS3.15 E.2) for the attributes it lists, with the options below. A file counts as
de-identified when

1. (0012,0062) Patient Identity Removed is ``"YES"``;
2. (0010,0010) Patient's Name is empty, equal to (0010,0020) Patient ID, or a pseudonym
   token (see :func:`patient_name_problem`);
3. every attribute of :data:`RULES` the profile removes or empties (actions X, Z, D) is
   absent or empty, unless the option that retains it (or keeps a cleaned version of it) is
   declared in (0012,0064) De-identification Method Code Sequence (codes of PS3.16
   CID 7050, scheme ``DCM``);
4. no other element with a Person Name (PN) value representation holds a name, at any depth
   of the dataset;
5. no private element (odd group) is present, unless the Retain Safe Private Option
   (113111) is declared; no (60xx,3000) Overlay Data / (60xx,4000) Overlay Comments or
   (50xx,eeee) curve unless the Clean Graphics Option (113103) is declared;
6. (0028,0301) Burned In Annotation is not ``"YES"``.

Options. Always applied (the gate cannot tell the difference, and documents it):

* **Retain Longitudinal Temporal Information with Modified Dates Option** (113107): dates
  and times other than (0010,0030) Patient's Birth Date and (0010,0032) Patient's Birth Time
  are not checked (they may be shifted);
* **Retain UIDs Option** (113110): UIDs are not checked. The node needs (0020,000D),
  (0020,000E) and (0008,0018) to index images; they never leave the node.

Honoured only when declared in (0012,0064): Clean Descriptors (113105: (0008,1030) Study
Description, (0008,103E) Series Description, (0018,1030) Protocol Name and the other
descriptions of :data:`RULES`), Retain Patient Characteristics (113108: age, size, weight,
...), Retain Device Identity (113109), Retain Institution Identity (113112), Retain Safe
Private (113111), Clean Graphics (113103).

Not checked: "Z" attributes that may hold a dummy value ((0010,0040) Patient's Sex,
(0008,0050) Accession Number, (0020,0010) Study ID), which the gate cannot tell from a real
one, and the Clinical Trial attributes, which a de-identifier adds.

Privacy caveat: this is a header check only. It cannot find identifiers burned into the
pixels ((0028,0301) Burned In Annotation is checked when present), nor inside values the
table does not list, nor in file names; the hospital's de-identification pipeline remains
responsible for those. Findings name tags, never values.
"""

from __future__ import annotations

import re
from collections import abc
from dataclasses import dataclass
from enum import Enum

from pydicom.datadict import dictionary_description, dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset


class DeidOption(str, Enum):
    """PS3.16 CID 7050 De-identification Method codes (scheme ``DCM``)."""

    BASIC_PROFILE = "113100"
    CLEAN_PIXEL_DATA = "113101"
    CLEAN_RECOGNIZABLE_VISUAL_FEATURES = "113102"
    CLEAN_GRAPHICS = "113103"
    CLEAN_STRUCTURED_CONTENT = "113104"
    CLEAN_DESCRIPTORS = "113105"
    RETAIN_FULL_DATES = "113106"
    RETAIN_MODIFIED_DATES = "113107"
    RETAIN_PATIENT_CHARACTERISTICS = "113108"
    RETAIN_DEVICE_IDENTITY = "113109"
    RETAIN_UIDS = "113110"
    RETAIN_SAFE_PRIVATE = "113111"
    RETAIN_INSTITUTION_IDENTITY = "113112"

    @property
    def meaning(self) -> str:
        """The code meaning of PS3.16 CID 7050."""
        return OPTION_TITLES[self]


OPTION_TITLES: dict[DeidOption, str] = {
    DeidOption.BASIC_PROFILE: "Basic Application Confidentiality Profile",
    DeidOption.CLEAN_PIXEL_DATA: "Clean Pixel Data Option",
    DeidOption.CLEAN_RECOGNIZABLE_VISUAL_FEATURES: "Clean Recognizable Visual Features Option",
    DeidOption.CLEAN_GRAPHICS: "Clean Graphics Option",
    DeidOption.CLEAN_STRUCTURED_CONTENT: "Clean Structured Content Option",
    DeidOption.CLEAN_DESCRIPTORS: "Clean Descriptors Option",
    DeidOption.RETAIN_FULL_DATES: "Retain Longitudinal Temporal Information Full Dates Option",
    DeidOption.RETAIN_MODIFIED_DATES: (
        "Retain Longitudinal Temporal Information Modified Dates Option"
    ),
    DeidOption.RETAIN_PATIENT_CHARACTERISTICS: "Retain Patient Characteristics Option",
    DeidOption.RETAIN_DEVICE_IDENTITY: "Retain Device Identity Option",
    DeidOption.RETAIN_UIDS: "Retain UIDs Option",
    DeidOption.RETAIN_SAFE_PRIVATE: "Retain Safe Private Option",
    DeidOption.RETAIN_INSTITUTION_IDENTITY: "Retain Institution Identity Option",
}

#: Options the gate always applies (see the module docstring).
ASSUMED_OPTIONS: tuple[DeidOption, ...] = (
    DeidOption.RETAIN_MODIFIED_DATES,
    DeidOption.RETAIN_UIDS,
)

_ALWAYS: tuple[str, ...] = (
    # persons, their identifiers and contacts
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "OperatorsName",
    "OperatorIdentificationSequence", "RequestingPhysician", "ScheduledPerformingPhysicianName",
    "ScheduledPerformingPhysicianIdentificationSequence", "NamesOfIntendedRecipientsOfResults",
    "IntendedRecipientsOfResultsIdentificationSequence", "PersonAddress",
    "PersonTelephoneNumbers", "OrderEnteredBy", "OrderEntererLocation",
    "OrderCallbackPhoneNumber", "VerifyingObserverName", "VerifyingObserverSequence",
    "VerifyingOrganization", "PersonName", "ResponsiblePerson", "ResponsibleOrganization",
    "DistributionName", "DistributionAddress", "PhysicianApprovingInterpretation",
    # the patient: identifiers, birth, contacts, history
    "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar", "PatientInsurancePlanCodeSequence",
    "PatientPrimaryLanguageCodeSequence", "PatientPrimaryLanguageModifierCodeSequence",
    "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence", "PatientBirthName",
    "PatientAddress", "InsurancePlanIdentification", "PatientMotherBirthName", "MilitaryRank",
    "BranchOfService", "MedicalRecordLocator", "ReferencedPatientPhotoSequence",
    "MedicalAlerts", "Allergies", "CountryOfResidence", "RegionOfResidence",
    "PatientTelephoneNumbers", "PatientTelecomInformation", "Occupation",
    "AdditionalPatientHistory", "PatientReligiousPreference", "ReferencedPatientSequence",
    "ReferencedPatientAliasSequence",
    # visit, admission, order
    "AdmissionID", "IssuerOfAdmissionIDSequence", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "DischargeDiagnosisDescription", "SpecialNeeds",
    "ServiceEpisodeID", "ServiceEpisodeDescription", "CurrentPatientLocation",
    "PatientInstitutionResidence", "PatientState", "RequestingService",
    "ScheduledStudyLocation", "ScheduledStudyLocationAETitle", "ScheduledStationAETitle",
    "ScheduledStationName", "ScheduledProcedureStepLocation", "PerformedStationAETitle",
    "PerformedStationName", "PerformedLocation", "RequestAttributesSequence",
    "RequestedProcedureID", "PatientTransportArrangements", "RequestedProcedureLocation",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "ReasonForTheImagingServiceRequest", "ReasonForStudy",
    # free text
    "IdentifyingComments", "PatientComments", "StudyComments", "VisitComments",
    "ImageComments", "AcquisitionComments", "CommentsOnThePerformedProcedureStep",
    "RequestedProcedureComments", "ImagingServiceRequestComments",
    "ConfidentialityConstraintOnPatientDataDescription", "TextValue", "ContentSequence",
    "InterpretationText", "ResultsComments", "TextComments", "Arbitrary",
    "OriginalAttributesSequence",
)

_BY_OPTION: dict[DeidOption, tuple[str, ...]] = {
    DeidOption.CLEAN_DESCRIPTORS: (
        "StudyDescription", "SeriesDescription", "ProtocolName", "DerivationDescription",
        "AcquisitionDeviceProcessingDescription", "RequestedProcedureDescription",
        "PerformedProcedureStepDescription", "ScheduledProcedureStepDescription",
        "AcquisitionProtocolDescription", "ContributionDescription",
    ),
    DeidOption.RETAIN_PATIENT_CHARACTERISTICS: (
        "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup", "SmokingStatus",
        "PregnancyStatus", "PatientSexNeutered",
    ),
    DeidOption.RETAIN_DEVICE_IDENTITY: (
        "StationName", "DeviceSerialNumber", "DetectorID", "GantryID", "GeneratorID",
        "PlateID", "CassetteID",
    ),
    DeidOption.RETAIN_INSTITUTION_IDENTITY: (
        "InstitutionName", "InstitutionAddress", "InstitutionCodeSequence",
        "InstitutionalDepartmentName",
    ),
}


@dataclass(frozen=True)
class Rule:
    """One Table E.1-1 attribute: must be absent or empty unless ``retained_by`` is declared.

    Attributes
    ----------
    tag : int
        The attribute's tag.
    keyword : str
        Its pydicom keyword.
    label : str
        ``"(gggg,eeee) Name"`` as PS3.6 names it.
    retained_by : DeidOption | None
        The option under which a (cleaned) value may stay; ``None``: never.
    """

    tag: int
    keyword: str
    label: str
    retained_by: DeidOption | None


def _label(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {dictionary_description(tag)}"


def _rule(keyword: str, option: DeidOption | None) -> Rule:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"unknown DICOM keyword {keyword}")
    return Rule(tag=tag, keyword=keyword, label=_label(tag), retained_by=option)


#: Every attribute checked by rule 3 (see the module docstring), in tag order.
RULES: tuple[Rule, ...] = tuple(
    sorted(
        [_rule(k, None) for k in _ALWAYS]
        + [_rule(k, opt) for opt, keywords in _BY_OPTION.items() for k in keywords],
        key=lambda r: r.tag,
    )
)

#: Backwards-compatible view: (keyword, label) of the attributes that are never retained.
DIRECT_IDENTIFIERS: tuple[tuple[str, str], ...] = tuple(
    (r.keyword, r.label) for r in RULES if r.retained_by is None
)

#: Placeholders de-identifiers commonly write to (0010,0010) Patient's Name (upper-case).
NAME_PLACEHOLDERS: frozenset[str] = frozenset(
    {"ANONYMOUS", "ANONYMIZED", "ANONYMISED", "ANON", "REMOVED", "DEIDENTIFIED", "UNKNOWN"}
)
_TOKEN = re.compile(r"^[A-Za-z0-9._-]+$")
_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_MAX_FINDINGS_SHOWN = 3
#: Top-level tags the PN rule leaves to the Patient's Name rule and to :data:`RULES`.
_TOP_LEVEL_SKIP = frozenset({_PATIENT_NAME} | {r.tag for r in RULES})


@dataclass(frozen=True)
class PhiVerdict:
    """Outcome of :func:`check_deidentified`.

    Attributes
    ----------
    deidentified : bool
        ``True`` when the header passes the rule of the module docstring.
    findings : tuple[str, ...]
        What failed, each naming a tag and a condition, never a value.
    declared_options : tuple[DeidOption, ...]
        Recognised codes of (0012,0064) De-identification Method Code Sequence.
    applied_options : tuple[DeidOption, ...]
        The options this verdict was reached under: :data:`ASSUMED_OPTIONS` plus the
        declared ones.
    """

    deidentified: bool
    findings: tuple[str, ...]
    declared_options: tuple[DeidOption, ...] = ()
    applied_options: tuple[DeidOption, ...] = ASSUMED_OPTIONS

    @property
    def reason(self) -> str:
        """One sentence for an operator: the first findings (tags, never values)."""
        if self.deidentified:
            return ""
        shown = "; ".join(self.findings[:_MAX_FINDINGS_SHOWN])
        more = len(self.findings) - _MAX_FINDINGS_SHOWN
        suffix = f" (and {more} more)" if more > 0 else ""
        return f"not de-identified: {shown}{suffix}"


def _is_empty(value: object) -> bool:
    """Return ``True`` for ``None``, blank text and empty (or all-blank) multi-values."""
    if value is None:
        return True
    if isinstance(value, (str, bytes)):
        return len(value.strip(b"\0 " if isinstance(value, bytes) else "\0 ")) == 0
    if isinstance(value, Dataset):
        return len(value) == 0
    if isinstance(value, abc.Sequence):
        return all(_is_empty(item) for item in value)
    return str(value).strip() == ""


def _present(ds: Dataset, tag: int) -> bool:
    """``True`` when ``tag`` is in ``ds`` with a non-empty value (deferred values untouched)."""
    if tag not in ds:
        return False
    raw = ds.get_item(tag, keep_deferred=True)
    if isinstance(raw, RawDataElement):
        if raw.length == 0:
            return False
        if raw.value is None:  # deferred: too long to be empty
            return True
    try:
        return not _is_empty(ds[tag].value)
    except Exception:  # noqa: BLE001 - an undecodable value is a value
        return True


def patient_name_problem(name: str, patient_id: str, *, identity_removed: bool) -> str:
    """Why (0010,0010) Patient's Name is not acceptable, or ``""``.

    Accepted: an empty name (all components empty); a name equal to (0010,0020) Patient
    ID; a placeholder of :data:`NAME_PLACEHOLDERS`; or, when (0012,0062) Patient Identity
    Removed is YES, a pseudonym token: one component (no ``^`` or ``=`` separator) of
    letters, digits, ``.``, ``_`` or ``-`` holding at least one digit (``PSEUDO-001``,
    ``SUBJ0042``). Refused: any ``Family^Given`` person-name form with a non-empty
    component, an alphabetic word, and any non-empty name in a file that does not declare
    its identity removed (there a token is no evidence of a pseudonym).
    """
    stripped = name.strip()
    components = [c.strip() for c in re.split(r"[\^=]", stripped)]
    if not any(components):
        return ""
    if stripped == patient_id.strip() or stripped.upper() in NAME_PLACEHOLDERS:
        return ""
    label = "(0010,0010) Patient's Name"
    if "^" in stripped or "=" in stripped:
        return f"{label} has the form of a person's name"
    if not identity_removed:
        return f"{label} holds a name and the file does not declare its identity removed"
    if not _TOKEN.match(stripped) or not any(ch.isdigit() for ch in stripped):
        return f"{label} is not empty, not the Patient ID and not a pseudonym token"
    return ""


def declared_options(ds: Dataset) -> tuple[DeidOption, ...]:
    """Recognised CID 7050 codes of (0012,0064) De-identification Method Code Sequence."""
    found: list[DeidOption] = []
    try:
        items = ds.get("DeidentificationMethodCodeSequence", None) or []
        for item in items:
            code = str(item.get("CodeValue", "") or "").strip()
            scheme = str(item.get("CodingSchemeDesignator", "") or "").strip().upper()
            if scheme == "DCM" and code in {o.value for o in DeidOption}:
                option = DeidOption(code)
                if option not in found:
                    found.append(option)
    except Exception:  # noqa: BLE001 - a malformed sequence declares nothing
        return ()
    return tuple(found)


def _vr(ds: Dataset, tag: int) -> str:
    raw = ds.get_item(tag, keep_deferred=True)
    vr = getattr(raw, "VR", None)
    if vr:
        return str(vr)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def _person_names(ds: Dataset, *, skip: frozenset[int], depth: int = 0) -> list[str]:
    """Findings for non-empty PN elements at any depth (top-level tags in ``skip`` left out)."""
    found: list[str] = []
    if depth > 8:
        return found
    for tag in [int(t) for t in ds.keys()]:
        if tag in skip:
            continue
        vr = _vr(ds, tag)
        if vr == "PN" and _present(ds, tag):
            found.append(f"{_label(tag)} (a person name) is not empty")
        elif vr == "SQ":
            try:
                items = ds[tag].value
            except Exception:  # noqa: BLE001
                continue
            for item in items:
                found.extend(_person_names(item, skip=frozenset(), depth=depth + 1))
    return found


def _private_and_graphics(ds: Dataset, options: set[DeidOption]) -> list[str]:
    findings: list[str] = []
    private = graphics = False
    for tag in ds.keys():
        group, element = int(tag) >> 16, int(tag) & 0xFFFF
        if group % 2 == 1:
            private = True
        elif (group & 0xFF00 == 0x6000 and element in (0x3000, 0x4000)) or (
            group & 0xFF00 == 0x5000
        ):
            graphics = True
    if private and DeidOption.RETAIN_SAFE_PRIVATE not in options:
        findings.append(
            "private elements (odd group numbers) are present; remove them or declare the "
            "Retain Safe Private Option in (0012,0064)"
        )
    if graphics and DeidOption.CLEAN_GRAPHICS not in options:
        findings.append(
            "(60xx,3000) Overlay Data, (60xx,4000) Overlay Comments or curve data present; "
            "remove them or declare the Clean Graphics Option in (0012,0064)"
        )
    return findings


def check_deidentified(ds: Dataset) -> PhiVerdict:
    """Check a (header-only) dataset against the de-identification rule.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Dataset read with ``stop_before_pixels=True`` or deferred pixel data.

    Returns
    -------
    PhiVerdict
        The verdict, the failing attributes (tags, no values) and the options applied.
    """
    options = declared_options(ds)
    option_set = set(options)
    findings: list[str] = []
    removed = str(ds.get("PatientIdentityRemoved", "") or "").strip().upper() == "YES"
    if not removed:
        findings.append("(0012,0062) Patient Identity Removed is not YES")
    name = str(ds.get("PatientName", "") or "") if _PATIENT_NAME in ds else ""
    patient_id = str(ds.get("PatientID", "") or "")
    problem = patient_name_problem(name, patient_id, identity_removed=removed)
    if problem:
        findings.append(problem)
    for rule in RULES:
        if not _present(ds, rule.tag):
            continue
        if rule.retained_by is None:
            findings.append(f"{rule.label} is not empty")
        elif rule.retained_by not in option_set:
            findings.append(
                f"{rule.label} is not empty (allowed only under the "
                f"{rule.retained_by.meaning} declared in (0012,0064))"
            )
    findings.extend(_person_names(ds, skip=_TOP_LEVEL_SKIP))
    findings.extend(_private_and_graphics(ds, option_set))
    burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned_in == "YES":
        findings.append("(0028,0301) Burned In Annotation is YES")
    applied = tuple(dict.fromkeys((*ASSUMED_OPTIONS, *options)))
    return PhiVerdict(
        deidentified=not findings,
        findings=tuple(findings),
        declared_options=options,
        applied_options=applied,
    )


def is_deidentified(ds: Dataset) -> bool:
    """Return ``True`` when :func:`check_deidentified` finds nothing."""
    return check_deidentified(ds).deidentified
