"""De-identification rule: PS3.15 Annex E Basic Profile (Table E.1-1) with declared options."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from client.dicom.phi import (
    RULES,
    DeidOption,
    check_deidentified,
    is_deidentified,
    patient_name_problem,
)
from client.dicom.reasons import SkipCode
from client.dicom.scan import scan_directory
from tests.client.dicom._factory import make_dataset

REQUIRED_KEYWORDS = [
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientNames",
    "ReferringPhysicianName",
    "InstitutionName",
    "InstitutionAddress",
]


def test_factory_dataset_is_deidentified_with_pseudonym() -> None:
    # Prepare
    ds = make_dataset(patient_id="PSEUDO-42")
    # Execute
    verdict = check_deidentified(ds)
    # Assert
    assert verdict.deidentified
    assert verdict.findings == ()


def test_identity_removed_must_be_yes() -> None:
    # Prepare
    ds = make_dataset()
    ds.PatientIdentityRemoved = "NO"
    # Execute
    verdict = check_deidentified(ds)
    # Assert
    assert not verdict.deidentified
    assert any("(0012,0062)" in f for f in verdict.findings)


def test_missing_identity_removed_fails() -> None:
    # Prepare
    ds = make_dataset()
    del ds.PatientIdentityRemoved
    # Execute / Assert
    assert not is_deidentified(ds)


@pytest.mark.parametrize("keyword", REQUIRED_KEYWORDS)
def test_each_required_identifier_is_checked(keyword: str) -> None:
    # Prepare
    assert keyword in {r.keyword for r in RULES}
    ds = make_dataset()
    value = "19800101" if keyword == "PatientBirthDate" else "SOMEVALUE"
    setattr(ds, keyword, value)
    # Execute
    verdict = check_deidentified(ds)
    # Assert
    assert not verdict.deidentified
    assert len(verdict.findings) == 1
    assert "SOMEVALUE" not in verdict.findings[0] and "1980" not in verdict.findings[0]


@pytest.mark.parametrize("keyword", REQUIRED_KEYWORDS)
def test_empty_identifier_is_allowed(keyword: str) -> None:
    # Prepare: Basic Profile action Z (zero-length) keeps the element, empty
    ds = make_dataset()
    setattr(ds, keyword, "")
    # Execute / Assert
    assert is_deidentified(ds)


def test_other_patient_ids_sequence_with_item_fails() -> None:
    # Prepare
    ds = make_dataset()
    item = Dataset()
    item.PatientID = "MRN-1"
    ds.OtherPatientIDsSequence = Sequence([item])
    # Execute / Assert
    assert not is_deidentified(ds)


def test_burned_in_annotation_fails() -> None:
    # Prepare
    ds = make_dataset()
    ds.BurnedInAnnotation = "YES"
    # Execute / Assert
    assert not is_deidentified(ds)


# --- PS3.15 Annex E Table E.1-1 (issue 13) ---------------------------------------------

REAL_CT = Path("/work/shared/data/dicom/dcmqi_ct_3slice_liverseg")


def _declare(ds: Dataset, *codes: str) -> Dataset:
    items = []
    for code in codes:
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = "option"
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    return ds


def test_every_rule_resolves_to_a_dictionary_tag_and_label() -> None:
    # Execute
    labels = [r.label for r in RULES]
    # Assert: "(gggg,eeee) Name", and the free-text attributes of the issue are listed
    assert all(label.startswith("(") and ") " in label for label in labels)
    listed = {r.keyword for r in RULES}
    assert {
        "PatientComments", "ImageComments", "AdditionalPatientHistory", "StudyComments",
        "IdentifyingComments", "TextValue", "ProtocolName", "StudyDescription",
        "SeriesDescription",
    } <= listed


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("", True),
        ("^^^^", True),
        ("PSEUDO-001", True),  # equal to the Patient ID
        ("SUBJ0042", True),  # a pseudonym token
        ("anonymous", True),  # a placeholder
        ("Doe^John", False),
        ("DOE^JOHN^^MR", False),
        ("Smith", False),  # an alphabetic word
        ("Jane Doe 1", False),  # spaces: not a token
    ],
)
def test_patient_name_rule(name: str, accepted: bool) -> None:
    # Prepare
    ds = make_dataset(patient_id="PSEUDO-001")
    ds.PatientName = name
    # Execute
    verdict = check_deidentified(ds)
    # Assert
    assert verdict.deidentified is accepted
    if not accepted:
        assert any(f.startswith("(0010,0010) Patient's Name") for f in verdict.findings)
        assert all(name not in f for f in verdict.findings if name)


def test_a_token_name_is_no_pseudonym_without_identity_removed() -> None:
    # Prepare: the shared real CT slices carry a token-like test name and no (0012,0062)
    ds = make_dataset(patient_id="99000")
    ds.PatientName = "JANCT000"
    del ds.PatientIdentityRemoved
    # Execute
    problem = patient_name_problem("JANCT000", "99000", identity_removed=False)
    verdict = check_deidentified(ds)
    # Assert
    assert problem.startswith("(0010,0010)")
    assert "JANCT" not in verdict.reason and "(0010,0010)" in verdict.reason


@pytest.mark.parametrize(
    ("keyword", "tag"),
    [
        ("PatientComments", "(0010,4000) Patient Comments"),
        ("ImageComments", "(0020,4000) Image Comments"),
        ("AdditionalPatientHistory", "(0010,21B0) Additional Patient History"),
        ("IdentifyingComments", "(0008,4000) Identifying Comments"),
        ("PatientAddress", "(0010,1040) Patient's Address"),
    ],
)
def test_free_text_and_contacts_are_named_in_the_reason(keyword: str, tag: str) -> None:
    # Prepare
    ds = make_dataset()
    setattr(ds, keyword, "seen by Dr Who, MRN 12345")
    # Execute
    verdict = check_deidentified(ds)
    # Assert
    assert verdict.reason == f"not de-identified: {tag} is not empty"
    assert "12345" not in verdict.reason and "Who" not in verdict.reason


@pytest.mark.parametrize(
    ("keyword", "option"),
    [
        ("StudyDescription", DeidOption.CLEAN_DESCRIPTORS),
        ("ProtocolName", DeidOption.CLEAN_DESCRIPTORS),
        ("PatientAge", DeidOption.RETAIN_PATIENT_CHARACTERISTICS),
        ("StationName", DeidOption.RETAIN_DEVICE_IDENTITY),
        ("InstitutionName", DeidOption.RETAIN_INSTITUTION_IDENTITY),
    ],
)
def test_optional_attributes_need_their_declared_option(
    keyword: str, option: DeidOption
) -> None:
    # Prepare
    value = "045Y" if keyword == "PatientAge" else "CHEST"
    plain = make_dataset()
    setattr(plain, keyword, value)
    declared = _declare(make_dataset(), DeidOption.BASIC_PROFILE.value, option.value)
    setattr(declared, keyword, value)
    # Execute
    refused, accepted = check_deidentified(plain), check_deidentified(declared)
    # Assert
    assert not refused.deidentified and option.meaning in refused.reason
    assert accepted.deidentified
    assert accepted.declared_options == (DeidOption.BASIC_PROFILE, option)
    assert option in accepted.applied_options


def test_person_names_in_nested_items_and_private_elements_are_refused() -> None:
    # Prepare
    nested = make_dataset()
    item = Dataset()
    item.VerifyingObserverName = "Doe^Jane"
    nested.ReferencedStudySequence = Sequence([item])
    private = make_dataset()
    private.add_new(0x00091010, "LO", "vendor data")
    kept = _declare(make_dataset(), DeidOption.RETAIN_SAFE_PRIVATE.value)
    kept.add_new(0x00091010, "LO", "vendor data")
    # Execute / Assert
    assert "(0040,A075)" in check_deidentified(nested).reason
    assert "private elements" in check_deidentified(private).reason
    assert check_deidentified(kept).deidentified


def test_dates_other_than_birth_stay_under_the_modified_dates_option() -> None:
    # Prepare
    ds = make_dataset()
    ds.StudyDate = "20200102"
    ds.AcquisitionTime = "101010"
    # Execute
    verdict = check_deidentified(ds)
    # Assert
    assert verdict.deidentified
    assert DeidOption.RETAIN_MODIFIED_DATES in verdict.applied_options


def test_reason_lists_three_findings_then_counts_the_rest() -> None:
    # Prepare
    ds = make_dataset()
    for keyword in ("PatientAddress", "PatientComments", "ImageComments", "Occupation"):
        setattr(ds, keyword, "x")
    # Execute
    reason = check_deidentified(ds).reason
    # Assert
    assert reason.count(";") == 2 and reason.endswith("(and 1 more)")


@pytest.mark.skipif(not REAL_CT.is_dir(), reason="shared real CT slices not available")
def test_real_ct_slices_refused_by_default_naming_patient_name(tmp_path: Path) -> None:
    # Prepare
    for name in ("01.dcm", "02.dcm", "03.dcm"):
        shutil.copyfile(REAL_CT / name, tmp_path / name)
    # Execute
    strict = scan_directory(tmp_path, require_deidentified=True)
    allowed = scan_directory(tmp_path, require_deidentified=False, decode_pixels=True)
    # Assert
    assert [s.code for s in strict.skipped] == [SkipCode.PHI] * 3
    assert all("(0010,0010) Patient's Name" in s.text for s in strict.skipped)
    assert all("JANCT" not in s.text and "99000" not in s.text for s in strict.skipped)
    assert len(allowed.records) == 3 and allowed.skipped == ()
