"""DICOM ingestion: header-only scan -> index (patient/study/series) -> pixels -> report."""

from client.dicom.index import DicomIndex, InstanceRecord
from client.dicom.ingest import scan_data_dir
from client.dicom.reasons import SkipCode, SkippedFile
from client.dicom.report import IngestionReport

__all__ = [
    "DicomIndex",
    "IngestionReport",
    "InstanceRecord",
    "SkipCode",
    "SkippedFile",
    "scan_data_dir",
]
