"""Every file of pydicom's test corpus (bundled files and ``pydicom-data``), scanned as-is.

Requirements: no crash; every file classified; no Patient ID, Patient's Name or instance
UID read from any corpus file appears in the scan report, warnings, WARNING+ logs or the
output of ``vesalius node check`` (json and table, default and ``--allow-identified``).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files

from tests.hostile._observe import (
    assert_classified,
    assert_clean_exit,
    assert_no_leak,
    invoke,
    observe,
    outputs,
    report_json_without_paths,
    scan,
)

KEYWORDS = ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID",
            "SOPInstanceUID", "AccessionNumber", "InstitutionName", "ReferringPhysicianName")


def _identifying_values(path: Path) -> set[str]:
    """Distinctive identifying values of one corpus file (8+ characters, not just digits)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        values = {str(ds.get(k, "") or "").strip() for k in KEYWORDS}
    except Exception:  # noqa: BLE001 - unreadable here: nothing to look for
        return set()
    return {v for v in values if len(v) >= 8 and not v.isdigit()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], set[str]]:
    """Copies of every corpus file as ``c000.dcm``... and the values planted in them."""
    folder = tmp_path_factory.mktemp("corpus-q7xk29") / "data"
    folder.mkdir()
    names, secrets = [], set()
    for i, src in enumerate(sorted(p for p in map(Path, get_testdata_files()) if p.is_file())):
        name = f"c{i:03d}.dcm"
        shutil.copyfile(src, folder / name)
        names.append(name)
        secrets |= _identifying_values(src)
    return folder, names, secrets


@pytest.mark.slow
@pytest.mark.parametrize("allow_identified", [False, True], ids=["default", "allow-identified"])
def test_corpus_is_classified_without_crash_or_leak(
        capfd: pytest.CaptureFixture[str], corpus: tuple[Path, list[str], set[str]],
        allow_identified: bool) -> None:
    # Prepare
    folder, names, secrets = corpus
    assert len(names) > 200 and len(secrets) > 50  # the search is meaningful
    capfd.readouterr()
    # Execute
    with observe() as obs:
        index, report = scan(folder, require_deidentified=not allow_identified)
    flags = ["--allow-identified"] if allow_identified else []
    texts = {"scan report": report_json_without_paths(report),
             "scan warnings": "\n".join(obs.warnings), "scan logs": "\n".join(obs.logs)}
    for mode in ("json", "table"):
        with observe() as cli_obs:
            result = invoke(["node", "check", "--data", str(folder), "--format", mode, *flags])
        assert_clean_exit(result, f"corpus node check --format {mode}")
        texts[f"{mode} output"] = outputs(result)
        texts[f"{mode} warnings"] = "\n".join(cli_obs.warnings)
        texts[f"{mode} logs"] = "\n".join(cli_obs.logs)
    fd = capfd.readouterr()
    texts["real stdout"], texts["real stderr"] = fd.out, fd.err
    # Assert
    assert_classified(report, names, {rec.relpath for rec in index.instances()})
    if allow_identified:
        assert report.files_used > 0
    assert_no_leak(texts, secrets | {str(folder), folder.parent.name})
