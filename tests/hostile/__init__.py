"""Hostile-input harness: mutated DICOM files, labels CSVs and bad CLI arguments (issue 13)."""
