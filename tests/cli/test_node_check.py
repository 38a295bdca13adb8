"""`vesalius node check` on pydicom's bundled example files mixed with junk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from cli.app import app

VALID = ["CT_small.dcm", "MR_small.dcm"]  # plain, decodable, greyscale, distinct SOP UIDs
# JPEG-LS: no decoder plugin is installed (JPEG 2000 is decodable here through Pillow, which
# matplotlib brings in, so it no longer serves as the unsupported example).
BROKEN = {
    "MR_truncated.dcm": "truncated",
    "MR_small_jpeg_ls_lossless.dcm": "unsupported-transfer-syntax",
    "rtplan.dcm": "no-pixels",
}


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    for name in [*VALID, *BROKEN]:
        src = get_testdata_file(name)
        assert src is not None, f"pydicom's bundled {name} is missing"
        shutil.copy(src, tmp_path / name)
    (tmp_path / "junk.bin").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.dcm").write_bytes(b"")
    return tmp_path


def test_counts_valid_files_and_gives_a_reason_for_every_skipped_one(mixed: Path) -> None:
    result = CliRunner().invoke(app, ["node", "check", "--data", str(mixed), "--format", "json",
                                      "--allow-identified"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["files_seen"] == 8 and doc["files_used"] == len(VALID)
    codes = {row["path"]: row["code"] for row in doc["skipped"]}
    assert codes == {**BROKEN, "junk.bin": "not-dicom", "notes.txt": "not-dicom", "empty.dcm": "not-dicom"}
    assert all(row["text"] for row in doc["skipped"])


def test_identified_files_are_skipped_as_phi_by_default(mixed: Path) -> None:
    result = CliRunner().invoke(app, ["node", "check", "--data", str(mixed), "--format", "json"])
    doc = json.loads(result.output)
    assert doc["files_used"] == 0
    assert {row["path"] for row in doc["skipped"] if row["code"] == "phi"} >= set(VALID)


def test_table_output_and_missing_folder(mixed: Path) -> None:
    table = CliRunner().invoke(app, ["node", "check", "--data", str(mixed), "--allow-identified"])
    assert table.exit_code == 0 and "truncated" in table.output and "files used" in table.output
    missing = CliRunner().invoke(app, ["node", "check", "--data", str(mixed / "nope")])
    assert missing.exit_code == 2


def test_node_start_refuses_a_folder_without_usable_labelled_data(mixed: Path) -> None:
    # CT_small and MR_small are usable when identified files are allowed, but have no labels
    result = CliRunner().invoke(app, ["node", "start", "--data", str(mixed), "--insecure",
                                      "--allow-identified"])
    assert result.exit_code == 2
    assert "labelled" in result.output and "vesalius node check" in result.output
