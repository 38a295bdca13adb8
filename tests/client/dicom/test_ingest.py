"""scan_data_dir: index + report with label counts; JSON-ready, no absolute paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from client.dicom import IngestionReport, scan_data_dir
from common.errors import DataError
from tests.client.dicom._factory import write_image, write_labels


def _folder(tmp_path: Path) -> Path:
    study_a, study_b, study_c = generate_uid(), generate_uid(), generate_uid()
    series = generate_uid()
    write_image(tmp_path / "p1" / "1.dcm", patient_id="P1", study_uid=study_a, series_uid=series)
    write_image(tmp_path / "p1" / "2.dcm", patient_id="P1", study_uid=study_a, series_uid=series)
    write_image(tmp_path / "p2" / "1.dcm", patient_id="P2", study_uid=study_b)
    write_image(tmp_path / "p3" / "1.dcm", patient_id="P3", study_uid=study_c)
    write_image(tmp_path / "p4" / "phi.dcm", patient_id="P4", deidentified=False)
    (tmp_path / "junk.txt").write_text("x")
    write_labels(tmp_path, [("P1", study_a, 1), ("P2", study_b, 0), ("P9", "1.2.3", 1)])
    return tmp_path


def test_report_counts_and_labels(tmp_path: Path) -> None:
    # Prepare
    data_dir = _folder(tmp_path)
    # Execute
    index, report = scan_data_dir(data_dir)
    # Assert
    assert isinstance(report, IngestionReport)
    assert (report.files_seen, report.files_used) == (6, 4)
    assert (report.num_patients, report.num_studies, report.num_series) == (3, 3, 3)
    assert dict(report.label_counts) == {"0": 1, "1": 2, "unlabelled": 1}
    assert report.labelled_patients == 2
    assert report.unmatched_label_rows == 1
    assert report.skip_counts["phi"] == 1 and report.skip_counts["not-dicom"] == 1
    assert report.fingerprint == index.fingerprint()


def test_to_dict_is_json_and_has_no_absolute_path(tmp_path: Path) -> None:
    # Prepare
    data_dir = _folder(tmp_path)
    _, report = scan_data_dir(data_dir)
    # Execute
    text = json.dumps(report.to_dict())
    # Assert
    assert str(tmp_path) not in text
    payload = json.loads(text)
    assert payload["files_skipped"] == 2
    assert {s["path"] for s in payload["skipped"]} == {"junk.txt", "p4/phi.dcm"}
    assert set(payload["skip_counts"]) >= {"not-dicom", "truncated", "duplicate", "phi"}


def test_missing_labels_file_means_all_unlabelled(tmp_path: Path) -> None:
    # Prepare
    write_image(tmp_path / "a.dcm")
    # Execute
    _, report = scan_data_dir(tmp_path)
    # Assert
    assert dict(report.label_counts) == {"unlabelled": 1}


def test_missing_directory_is_data_error(tmp_path: Path) -> None:
    # Execute
    with pytest.raises(DataError) as info:
        scan_data_dir(tmp_path / "nope")
    # Assert
    assert str(tmp_path) not in info.value.safe_reason
