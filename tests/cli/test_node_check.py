"""`vesalius node check`: pydicom's example files, junk, and every kind of bad labels.csv.

Every failing case asserts the exit code, the actionable sentence, that no traceback is shown
and that no patient id, study UID, label text or path of the fixture reaches the output.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from typer.testing import CliRunner, Result

from cli.app import app
from client.dicom.scan import scan_directory
from tests.client.dicom._factory import write_image, write_labels

VALID = ["CT_small.dcm", "MR_small.dcm"]  # plain, decodable, greyscale, distinct SOP UIDs
# JPEG Lossless (Process 14): no decoder plugin is installed (JPEG-LS decodes through pyjpegls,
# which highdicom brings in; JPEG 2000 is decodable here through Pillow, which
# matplotlib brings in, so it no longer serves as the unsupported example).
BROKEN = {
    "MR_truncated.dcm": "truncated",
    "JPEG-LL.dcm": "unsupported-transfer-syntax",  # JPEG Lossless, Process 14: no decoder
    "rtplan.dcm": "no-pixels",
}
DECODES = "decode_pixels" in inspect.signature(scan_directory).parameters


def _flat(text: str) -> str:
    """The output as one line: rich's panel borders and line wrapping removed."""
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def _check(*args: str) -> Result:
    return CliRunner().invoke(app, ["node", "check", *args])


def _assert_clean(result: Result, *secrets: str) -> None:
    """No traceback, no fixture value in anything the user sees."""
    assert "Traceback" not in result.output
    for secret in secrets:
        assert secret not in result.output, secret


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


class Site:
    """A small de-identified node folder: 4 patients x 2 images, file names without ids."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.patients = [f"QPAT-{p:03d}" for p in range(4)]
        self.studies = [generate_uid() for _ in self.patients]
        self.files: list[str] = []
        for p, (pid, study) in enumerate(zip(self.patients, self.studies, strict=True)):
            for i in range(2):
                rel = f"s{p}/img{i}.dcm"
                write_image(root / rel, patient_id=pid, study_uid=study, instance_number=i + 1)
                self.files.append(rel)

    def label_all(self) -> None:
        write_labels(self.root, [(pid, st, p % 2) for p, (pid, st)
                                 in enumerate(zip(self.patients, self.studies, strict=True))])

    def write_csv(self, text: str) -> None:
        (self.root / "labels.csv").write_text(text, encoding="utf-8")

    @property
    def secrets(self) -> list[str]:
        return [*self.patients, *self.studies, str(self.root)]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


def test_healthy_folder_passes_and_lists_the_used_files(site: Site) -> None:
    # Prepare
    site.label_all()
    # Execute
    result = _check("--data", str(site.root), "--format", "json")
    # Assert
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["usable"] is True and doc["problems"] == [] and doc["label_problems"] == []
    assert doc["used_files"] == sorted(site.files)
    assert doc["trainable_images"] == 8 and doc["pixels_decoded"] is DECODES
    _assert_clean(result, *site.secrets)


def test_header_only_skips_the_pixel_decode(site: Site) -> None:
    # Prepare
    site.label_all()
    # Execute
    result = _check("--data", str(site.root), "--format", "json", "--header-only")
    # Assert
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pixels_decoded"] is False


def test_missing_column_is_a_clean_data_error(site: Site) -> None:
    # Prepare
    site.write_csv(f"patient_id,label\n{site.patients[0]},1\n")
    # Execute
    result = _check("--data", str(site.root))
    # Assert
    assert result.exit_code == 4
    out = _flat(result.output)
    assert "the header lacks the column(s) study_uid" in out
    assert "malformed row(s) or header problem(s)" in out
    _assert_clean(result, *site.secrets)


def test_every_bad_row_is_reported_with_its_line_and_never_its_values(site: Site) -> None:
    # Prepare
    p, s = site.patients, site.studies
    site.write_csv(
        "patient_id,study_uid,label\n"
        f"{p[0]},{s[0]},1\n"            # 2: fine
        f"{p[1]},{s[1]},banana\n"       # 3: not an integer
        f",{s[2]},0\n"                  # 4: empty patient_id
        f"{p[0]},{s[0]},0\n"            # 5: conflicts with line 2
        f"QGHOST-9,{generate_uid()},1\n"  # 6: no image
    )
    # Execute
    as_json = _check("--data", str(site.root), "--format", "json")
    as_table = _check("--data", str(site.root))
    # Assert
    assert as_json.exit_code == 4 and as_table.exit_code == 4
    problems = json.loads(as_json.stdout)["label_problems"]
    assert [(row["line"], row["code"]) for row in problems] == [
        (3, "non-integer-label"),
        (4, "empty-id"),
        (5, "conflicting-labels"),
        (6, "no-usable-image"),
        (None, "unlabelled-images"),
    ]
    assert all(row["reason"] for row in problems)
    table = _flat(as_table.output)
    assert "Label problems" in table and "conflicting-labels" in table and "line 2" in table
    for result in (as_json, as_table):
        _assert_clean(result, *site.secrets, "banana", "QGHOST")


def test_labels_other_than_0_and_1_make_the_folder_unusable(site: Site) -> None:
    # Prepare
    write_labels(site.root, [(pid, st, 2 + p % 2) for p, (pid, st)
                             in enumerate(zip(site.patients, site.studies, strict=True))])
    # Execute
    result = _check("--data", str(site.root), "--format", "json")
    # Assert
    assert result.exit_code == 4
    assert "labels other than 0 and 1" in _flat(result.output)
    codes = {row["code"] for row in json.loads(result.stdout)["label_problems"]}
    assert codes == {"non-binary-label"}
    _assert_clean(result, *site.secrets)


def test_no_labelled_image_is_unusable(site: Site) -> None:
    # Prepare: rows whose ids match no image
    write_labels(site.root, [("QOTHER-1", generate_uid(), 1)])
    # Execute
    result = _check("--data", str(site.root))
    # Assert
    assert result.exit_code == 4
    assert "no usable image has a label" in _flat(result.output)
    _assert_clean(result, *site.secrets, "QOTHER")


def test_empty_folder_is_unusable(tmp_path: Path) -> None:
    # Execute
    result = _check("--data", str(tmp_path))
    # Assert
    assert result.exit_code == 4
    assert "the --data folder holds no file" in _flat(result.output)
    _assert_clean(result, str(tmp_path))


def test_counts_valid_files_and_gives_a_reason_for_every_skipped_one(mixed: Path) -> None:
    # Execute
    result = _check("--data", str(mixed), "--format", "json", "--allow-identified")
    # Assert: usable images but no labels.csv, so the folder cannot be trained on
    assert result.exit_code == 4
    doc = json.loads(result.stdout)
    assert doc["files_seen"] == 8 and doc["files_used"] == len(VALID)
    assert doc["used_files"] == sorted(VALID)
    codes = {row["path"]: row["code"] for row in doc["skipped"]}
    assert codes == {**BROKEN, "junk.bin": "not-dicom", "notes.txt": "not-dicom", "empty.dcm": "not-dicom"}
    assert all(row["text"] for row in doc["skipped"])
    assert "no labels.csv" in _flat(result.output)
    _assert_clean(result, str(mixed))


def test_identified_files_are_skipped_as_phi_by_default(mixed: Path) -> None:
    # Execute
    result = _check("--data", str(mixed), "--format", "json")
    # Assert
    assert result.exit_code == 4
    doc = json.loads(result.stdout)
    assert doc["files_used"] == 0 and doc["used_files"] == []
    assert {row["path"] for row in doc["skipped"] if row["code"] == "phi"} >= set(VALID)
    assert "none of the 8 file(s)" in _flat(result.output)


def test_table_output_shows_skip_reasons(mixed: Path) -> None:
    # Execute
    result = _check("--data", str(mixed), "--allow-identified")
    # Assert
    assert result.exit_code == 4
    assert "truncated" in result.output and "files used" in result.output
    _assert_clean(result, str(mixed))


def test_missing_folder_is_a_usage_error_without_the_path(tmp_path: Path) -> None:
    # Execute
    result = _check("--data", str(tmp_path / "nope-folder"))
    # Assert
    assert result.exit_code == 2
    assert "the --data folder does not exist" in _flat(result.output)
    _assert_clean(result, "nope-folder")


@pytest.mark.parametrize("args", [["--format", "xml"], ["--colour", "red"]])
def test_unknown_format_or_option_is_a_usage_error(site: Site, args: list[str]) -> None:
    # Execute
    result = _check("--data", str(site.root), *args)
    # Assert
    assert result.exit_code == 2
    assert "Ingestion report" not in result.output
    _assert_clean(result)


def test_help_lists_the_formats() -> None:
    # Execute
    result = _check("--help")
    # Assert
    assert result.exit_code == 0
    assert "table" in result.output and "json" in result.output and "--header-only" in result.output


# --- --task: each task's rules ------------------------------------------------------------


def test_task_choices_are_the_registry_names() -> None:
    # Prepare
    import typer

    from common.tasks import list_tasks

    command = typer.main.get_command(app).commands["node"].commands["check"]  # type: ignore[attr-defined]
    # Execute
    param = next(p for p in command.params if p.name == "task")
    # Assert
    assert list(param.type.choices) == [task.info.name for task in list_tasks()]
    assert param.default == "binary"


def test_unknown_task_is_a_usage_error(site: Site) -> None:
    # Execute
    result = _check("--data", str(site.root), "--task", "detection")
    # Assert
    assert result.exit_code == 2
    assert "Ingestion report" not in result.output


def test_multiclass_accepts_classes_below_k_and_names_the_rows_above(site: Site) -> None:
    # Prepare: classes 0..3 on the four studies
    write_labels(site.root, [(pid, st, p) for p, (pid, st)
                             in enumerate(zip(site.patients, site.studies, strict=True))])
    # Execute
    fitted = _check("--data", str(site.root), "--format", "json", "--task", "multiclass")
    too_few = _check("--data", str(site.root), "--format", "json", "--task", "multiclass",
                     "--num-classes", "3")
    # Assert
    assert fitted.exit_code == 0, fitted.output
    doc = json.loads(fitted.stdout)
    assert doc["num_classes"] == 4 and doc["trainable_images"] == 8 and doc["task"] == "multiclass"
    assert too_few.exit_code == 4
    rows = json.loads(too_few.stdout)["label_problems"]
    assert [(r["line"], r["code"]) for r in rows] == [(5, "class-out-of-range")]
    assert "the multiclass task cannot use" in _flat(too_few.output)
    _assert_clean(too_few, *site.secrets)


def test_regression_needs_its_value_column_and_finite_values(site: Site) -> None:
    # Prepare
    p, s = site.patients, site.studies
    site.write_csv("patient_id,study_uid,value\n"
                   f"{p[0]},{s[0]},1.5\n{p[1]},{s[1]},-inf\n{p[2]},{s[2]},2\n{p[3]},{s[3]},0\n")
    labels_only = site.root.parent / "other"
    shutil.copytree(site.root, labels_only)
    (labels_only / "labels.csv").write_text(f"patient_id,study_uid,label\n{p[0]},{s[0]},1\n")
    # Execute
    result = _check("--data", str(site.root), "--format", "json", "--task", "regression")
    no_column = _check("--data", str(labels_only), "--task", "regression")
    # Assert
    assert result.exit_code == 4
    doc = json.loads(result.stdout)
    assert [(r["line"], r["code"]) for r in doc["label_problems"]] == [
        (3, "non-finite-value"), (None, "unlabelled-images")]
    assert doc["trainable_images"] == 6 and "num_classes" not in doc
    assert no_column.exit_code == 4 and "lacks the column(s) value" in _flat(no_column.output)
    _assert_clean(result, *site.secrets, "-inf")


def test_reconstruction_needs_no_labels_file(site: Site) -> None:
    # Execute
    result = _check("--data", str(site.root), "--format", "json", "--task", "reconstruction")
    # Assert
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["trainable_images"] == 8 and doc["label_problems"] == []


def test_segmentation_without_masks_is_unusable(site: Site) -> None:
    # Execute
    result = _check("--data", str(site.root), "--format", "json", "--task", "segmentation")
    # Assert
    assert result.exit_code == 4
    assert json.loads(result.stdout)["masks"] == 0
    assert "no segmentation mask" in _flat(result.output)
    _assert_clean(result, *site.secrets)


@pytest.mark.filterwarnings("ignore:The string .* is unlikely:UserWarning")
@pytest.mark.parametrize(("covered", "exit_code"), [(3, 0), (2, 4)])
def test_segmentation_matches_dicom_seg_masks_to_every_image(
    tmp_path: Path, covered: int, exit_code: int
) -> None:
    # Prepare: three CT slices and a DICOM SEG over the first `covered` of them
    from tests.client.dicom.test_seg import _two_segment_masks, _write_ct_slices, _write_seg

    folder = tmp_path / "seg-site"
    folder.mkdir()
    slices = _write_ct_slices(folder, 3)
    _write_seg(folder, slices[:covered], _two_segment_masks(covered))
    # Execute
    result = _check("--data", str(folder), "--format", "json", "--task", "segmentation")
    # Assert
    assert result.exit_code == exit_code, result.output
    doc = json.loads(result.stdout)
    assert doc["masks"] == 1 and doc["trainable_images"] == covered
    assert doc["mask_problems"] == []
    if exit_code:
        assert "1 usable image(s) have no mask" in _flat(result.output)
    _assert_clean(result, str(folder), *(str(s.StudyInstanceUID) for s in slices[:1]))


def test_a_derived_mask_without_its_image_is_listed_not_blocking(tmp_path: Path) -> None:
    # Prepare: the synthetic mask series convention; one CT image removed
    from client.dicom.synth_seg import synthesize_segmentation_federation

    synthesize_segmentation_federation(tmp_path / "d", n_sites=1, patients_per_site=4,
                                       image_size=16, seed=2)
    site = tmp_path / "d" / "site-1"
    next(iter(sorted(site.rglob("SE1/IM1.dcm")))).unlink()
    # Execute
    result = _check("--data", str(site), "--format", "json", "--task", "segmentation")
    # Assert: training ignores a mask without its image, the check names the file
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [row["code"] for row in doc["mask_problems"]] == ["missing-image"]
    assert doc["trainable_images"] == doc["files_used"] - doc["masks"]
    _assert_clean(result, str(tmp_path))
