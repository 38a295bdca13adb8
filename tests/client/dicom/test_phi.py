"""De-identification rule: (0012,0062) YES and no direct identifier present."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from client.dicom.phi import RULES, check_deidentified, is_deidentified
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
