"""Patient/study/series index and the dataset fingerprint."""

from __future__ import annotations

from pathlib import Path

from client.dicom.index import DicomIndex, InstanceRecord


def _rec(
    pid: str, study: str, series: str, sop: str, number: int | None, size: int = 100
) -> InstanceRecord:
    return InstanceRecord(
        path=Path("/data") / sop,
        relpath=sop,
        file_size=size,
        patient_id=pid,
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        instance_number=number,
        rows=8,
        columns=8,
    )


def test_tree_grouping_and_counts() -> None:
    # Prepare
    records = [
        _rec("P2", "S1", "A", "1.1", 1),
        _rec("P1", "S2", "B", "1.2", 1),
        _rec("P1", "S2", "C", "1.3", 1),
        _rec("P1", "S3", "D", "1.4", 1),
    ]
    # Execute
    index = DicomIndex.from_records(records)
    # Assert
    assert [p.patient_id for p in index.patients] == ["P1", "P2"]
    assert (index.num_patients, index.num_studies, index.num_series, len(index)) == (2, 3, 4, 4)


def test_instances_sorted_by_instance_number_missing_last() -> None:
    # Prepare
    records = [
        _rec("P", "S", "X", "uid-c", None),
        _rec("P", "S", "X", "uid-a", 10),
        _rec("P", "S", "X", "uid-b", 2),
    ]
    # Execute
    series = DicomIndex.from_records(records).patients[0].studies[0].series[0]
    # Assert
    assert [i.sop_instance_uid for i in series.instances] == ["uid-b", "uid-a", "uid-c"]


def test_fingerprint_depends_on_uids_and_sizes_not_order_or_path() -> None:
    # Prepare
    a = _rec("P", "S", "X", "1.1", 1)
    b = _rec("P", "S", "X", "1.2", 2)
    moved = InstanceRecord(**{**a.__dict__, "path": Path("/else/where"), "relpath": "x"})
    resized = InstanceRecord(**{**a.__dict__, "file_size": 101})
    # Execute
    base = DicomIndex.from_records([a, b]).fingerprint()
    # Assert
    assert len(base) == 64 and int(base, 16) >= 0
    assert DicomIndex.from_records([b, a]).fingerprint() == base
    assert DicomIndex.from_records([moved, b]).fingerprint() == base
    assert DicomIndex.from_records([resized, b]).fingerprint() != base
    assert DicomIndex.from_records([a]).fingerprint() != base
