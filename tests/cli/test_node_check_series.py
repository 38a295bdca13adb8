"""``vesalius node check --samples volume-3d``: which studies assemble into one volume, and why
the others do not (per series, with its code), before a hospital joins a volume run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app

REAL_SERIES = "dicom/totalsegmentator_example_ct_dicom"


def _check(*args: str) -> tuple[int, dict[str, object] | str]:
    result = CliRunner().invoke(app, ["node", "check", *args, "--format", "json"],
                                terminal_width=200)
    try:
        return result.exit_code, json.loads(result.stdout)
    except json.JSONDecodeError:
        return result.exit_code, result.output


def test_the_real_ct_series_without_patient_ids_is_refused_naming_the_tag(
    shared_file: Callable[[str], Path],
) -> None:
    # Prepare: the real 20-slice JPEG 2000 series (tests/client/dicom/test_volume.py assembles
    # it with the right spacing and orientation); its files have no (0010,0020) Patient ID
    folder = shared_file(f"{REAL_SERIES}/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016573"
                         ).parent
    # Execute
    code, doc = _check("--data", str(folder), "--task", "reconstruction", "--samples",
                       "volume-3d", "--allow-identified", "--header-only")
    # Assert: a node cannot file a study under no patient; it says which element is missing
    assert code == 4 and isinstance(doc, dict), doc
    assert doc["skip_counts"]["missing-uid"] == 20
    assert all("PatientID" in row["text"] for row in doc["skipped"] if row["code"] == "missing-uid")


@pytest.fixture(scope="module")
def four_slice_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth_tasks import synthesize_task_federation

    root = tmp_path_factory.mktemp("vol")
    synthesize_task_federation(root, task="multiclass", num_classes=3, n_sites=1,
                               patients_per_site=6, images_per_patient=(4, 4), image_size=16,
                               seed=2)
    return root / "site-1"


def test_a_series_with_a_missing_slice_is_named_with_its_study_folder_and_code(
    four_slice_site: Path, tmp_path: Path
) -> None:
    # Prepare: a copy of the site in which one study lost an inner slice
    import shutil

    site = tmp_path / "site"
    shutil.copytree(four_slice_site, site)
    study = sorted(p.parent for p in site.rglob("*.dcm"))[0]
    slices = sorted(study.glob("*.dcm"))
    slices[1].unlink()
    # Execute
    code, doc = _check("--data", str(site), "--task", "multiclass", "--samples", "volume-3d")
    # Assert: the folder stays usable (the other studies assemble); the broken series is named
    assert code == 0 and isinstance(doc, dict), doc
    series = doc["series"]
    assert series["studies"] == 6 and series["volumes"] == 5
    (problem,) = series["problems"]
    assert problem["code"] in ("gap", "inconsistent-spacing") and problem["slices"] == 3
    assert str(problem["folder"]) == str(study.relative_to(site))


def test_no_study_that_assembles_blocks_a_volume_run(four_slice_site: Path, tmp_path: Path) -> None:
    # Prepare: every study keeps a single slice (no slice spacing)
    import shutil

    site = tmp_path / "site"
    shutil.copytree(four_slice_site, site)
    for study in {p.parent for p in site.rglob("*.dcm")}:
        for extra in sorted(study.glob("*.dcm"))[1:]:
            extra.unlink()
    # Execute
    code, doc = _check("--data", str(site), "--task", "multiclass", "--samples", "volume-3d")
    two_d, _ = _check("--data", str(site), "--task", "multiclass")
    # Assert: exit 4 with the reason for volumes; the same folder is fine as 2-D images
    assert code == 4 and isinstance(doc, dict)
    assert any("no study assembles into a volume" in p for p in doc["problems"])
    assert doc["series"]["codes"] == {"too-few-slices": 6}
    assert two_d == 0
