"""``vesalius import`` through the CLI: summary, exit codes, errors as one sentence, and a
simulated federation trained on an imported BreastMNIST.

The command is registered here on a small app with the project's error handler
(:class:`cli.errors.SafeGroup`) and ``vesalius node``, as ``cli/app.py`` registers it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cli.errors import SafeGroup
from cli.import_data import import_data
from cli.node import node_app

VESALIUS = str(Path(sys.executable).parent / "vesalius")

app = typer.Typer(cls=SafeGroup, pretty_exceptions_enable=False, add_completion=False)
app.command("import")(import_data)
app.add_typer(node_app, name="node")


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), terminal_width=200)
    return result.exit_code, result.output


def _image_folder(root: Path, csv_text: str) -> Path:
    root.mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.fromarray(np.full((12, 12), ord(name[0]), dtype=np.uint8)).save(root / name)
    (root / "labels.csv").write_text(csv_text, encoding="utf-8")
    return root


def test_npz_import_prints_a_summary_and_node_check_accepts_the_output(
    shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    # Prepare
    source = shared_file("medmnist/breastmnist.npz")
    out = tmp_path / "node"
    # Execute
    code, output = _run("import", str(source), "--out", str(out), "--max-images", "30")
    check_code, check_output = _run("node", "check", "--data", str(out), "--format", "json")
    # Assert
    assert code == 0, output
    assert "30" in output and "Pixel Spacing" in output and "vesalius node check" in output
    assert check_code == 0, check_output
    report = json.loads(check_output)
    assert report["usable"] and report["files_used"] == report["files_seen"] == 30
    assert report["trainable_images"] == 30 and not report["label_problems"]
    assert report["pixels_decoded"] is True


def test_json_summary_lists_each_site_with_its_label_counts(
    shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    # Prepare
    source = shared_file("medmnist/adrenalmnist3d.npz")
    # Execute
    code, output = _run("import", str(source), "--out", str(tmp_path / "fed"), "--sites", "2",
                        "--max-images", "4", "--format", "json")
    # Assert
    assert code == 0, output
    doc = json.loads(output)
    assert doc["kind"] == "3d" and doc["patients"] == 4 and doc["files"] == 4 * 28
    assert [s["site"] for s in doc["sites"]] == ["site-1", "site-2"]
    assert sum(sum(s["labels"].values()) for s in doc["sites"]) == 4
    assert any("slices" in note for note in doc["notes"])
    for site in ("site-1", "site-2"):
        check_code, check_output = _run("node", "check", "--data", str(tmp_path / "fed" / site))
        assert check_code == 0, check_output


def test_png_folder_import_and_its_check_succeed(tmp_path: Path) -> None:
    # Prepare
    folder = _image_folder(tmp_path / "src", "image,patient,label\na.png,p1,1\nb.png,p1,1\n"
                           "c.png,p2,0\nd.png,p3,0\n")
    # Execute
    code, output = _run("import", str(folder), "--out", str(tmp_path / "node"))
    check_code, check_output = _run("node", "check", "--data", str(tmp_path / "node"))
    # Assert
    assert code == 0, output
    assert re.search(r"│ \.\s+│ 3\s+│ 4\s+│ 0: 2, 1: 1", output), output
    assert check_code == 0, check_output


@pytest.mark.parametrize(
    ("csv_text", "expected"),
    [
        ("image,diagnosis\na.png,1\n", "lacks the column(s) label"),
        ("image,label\na.png,1\nsecret_scan.png,0\n", "line 3 of the labels CSV: no such image"),
        ("image,label\na.png,yes\n", "line 2 of the labels CSV: the label is not an integer"),
    ],
    ids=["missing column", "unknown image", "non-integer label"],
)
def test_bad_input_ends_with_one_sentence_and_exit_4(csv_text: str, expected: str,
                                                     tmp_path: Path) -> None:
    # Prepare
    folder = _image_folder(tmp_path / "src", csv_text)
    # Execute
    code, output = _run("import", str(folder), "--out", str(tmp_path / "node"))
    # Assert
    assert code == 4  # DataError
    assert expected in output and output.count("error:") == 1
    assert "Traceback" not in output and "secret_scan" not in output
    assert str(tmp_path) not in output
    assert not (tmp_path / "node").exists()


def test_corrupt_png_and_bad_npz_are_data_errors(tmp_path: Path) -> None:
    # Prepare
    folder = _image_folder(tmp_path / "src", "image,label\na.png,1\nb.png,0\n")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    npz = tmp_path / "keys.npz"
    np.savez(npz, images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, np.uint8))
    # Execute
    png_code, png_output = _run("import", str(folder), "--out", str(tmp_path / "a"))
    npz_code, npz_output = _run("import", str(npz), "--out", str(tmp_path / "b"))
    # Assert
    assert png_code == 4 and "line 3 of the labels CSV: the image cannot be decoded" in png_output
    assert npz_code == 4 and "lacks the array(s) train_images" in npz_output
    for output in (png_output, npz_output):
        assert "Traceback" not in output and str(tmp_path) not in output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--split", "dirichlet"], "give --sites"),
        (["--labels", "nowhere.csv"], "the --labels file does not exist"),
    ],
)
def test_option_problems_are_config_errors(args: list[str], expected: str,
                                           tmp_path: Path) -> None:
    # Prepare
    folder = _image_folder(tmp_path / "src", "image,label\na.png,1\n")
    # Execute
    code, output = _run("import", str(folder), "--out", str(tmp_path / "node"), *args)
    # Assert
    assert code == 3 and expected in output and "Traceback" not in output


def test_missing_source_and_non_empty_out_are_refused_without_paths(tmp_path: Path) -> None:
    # Prepare
    folder = _image_folder(tmp_path / "src", "image,label\na.png,1\n")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("x")
    # Execute
    missing_code, missing_output = _run("import", str(tmp_path / "nope.npz"), "--out",
                                        str(tmp_path / "o"))
    busy_code, busy_output = _run("import", str(folder), "--out", str(busy))
    forced_code, forced_output = _run("import", str(folder), "--out", str(busy), "--force")
    # Assert
    assert missing_code == 3 and "the SOURCE does not exist" in missing_output
    assert busy_code == 3 and "--force" in busy_output
    assert forced_code == 3 and "holds no earlier vesalius import" in forced_output
    assert sorted(p.name for p in busy.iterdir()) == ["mine.txt"]
    for output in (missing_output, busy_output, forced_output):
        assert str(tmp_path) not in output


def test_bad_choices_and_numbers_are_usage_errors(tmp_path: Path) -> None:
    # Execute
    results = [_run("import", str(tmp_path), "--out", str(tmp_path / "o"), *extra)
               for extra in (["--split", "skewed"], ["--alpha", "0"], ["--sites", "0"],
                             ["--format", "xml"], ["--max-images", "0"])]
    # Assert
    assert all(code == 2 for code, _ in results), [o for _, o in results]
    assert not (tmp_path / "o").exists()


def test_help_says_how_volumes_train_and_names_the_csv_columns() -> None:
    # Execute
    code, output = _run("import", "--help")
    # Assert
    assert code == 0
    flat = " ".join(output.split())
    assert "--model cnn3d --samples volume-3d" in flat
    assert "image (or file, filename, path" in flat and "patient_id" in flat
    assert "--max-images" in flat and "--sites" in flat and "--force" in flat


@pytest.mark.slow
def test_a_federation_trains_on_an_imported_breastmnist(
    shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    # Prepare: BreastMNIST as three hospitals; fresh ledgers (budgets are per dataset).
    source = shared_file("medmnist/breastmnist.npz")
    data = tmp_path / "data"
    code, output = _run("import", str(source), "--out", str(data), "--sites", "3",
                        "--seed", "1")
    assert code == 0, output
    env = {**os.environ, "VESALIUS_HOME": str(tmp_path / "home"),
           "FLWR_HOME": str(tmp_path / "flwr"), "COLUMNS": "200"}
    out = tmp_path / "run"
    # Execute
    run = subprocess.run(
        [VESALIUS, "federation", "run", "--data-root", str(data), "--rounds", "2",
         "--min-release-count", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    # Assert
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    doc = json.loads((out / "report.json").read_text())
    assert doc["status"] == "completed" and not doc["excluded"]
    assert len(doc["rounds"]) == 2
    assert sorted(s["site"] for s in doc["sites"]) == ["site-1", "site-2", "site-3"]
    assert all(0 < s["epsilon"] <= 8.0 for s in doc["sites"])
    assert 0.0 <= doc["final"]["auc_pooled"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize(("name", "model_args"), [
    # breastmnist.npz: test_npz_import_prints_a_summary_and_node_check_accepts_the_output and
    # test_a_federation_trains_on_an_imported_breastmnist above
    ("pneumoniamnist.npz", []),
    ("adrenalmnist3d.npz", ["--model", "cnn3d", "--samples", "volume-3d"]),
])
def test_each_shared_npz_imports_passes_node_check_and_trains(
    name: str, model_args: list[str], shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    # Prepare: the first 120 images (volumes) of the real collection as two hospitals
    source = shared_file(f"medmnist/{name}")
    data = tmp_path / "data"
    code, output = _run("import", str(source), "--out", str(data), "--sites", "2",
                        "--max-images", "120", "--seed", "1")
    assert code == 0, output
    # Execute: node check on every hospital, then one federated round (3D: on volumes)
    checks = [_run("node", "check", "--data", str(data / site), "--format", "json")
              for site in ("site-1", "site-2")]
    from cli.app import app as vesalius

    run = CliRunner().invoke(vesalius, [
        "federation", "run", "--data-root", str(data), "--rounds", "1", "--image-size", "16",
        "--min-release-count", "1", "--ledger-dir", str(tmp_path / "ledgers"),
        "--out", str(tmp_path / "run"), *model_args], terminal_width=200)
    # Assert: every file accepted, and a completed run that spent within the cap
    for check_code, check_output in checks:
        assert check_code == 0, check_output
        report = json.loads(check_output)
        assert report["usable"] and report["files_used"] == report["files_seen"]
        assert not report["label_problems"]
    assert run.exit_code == 0, run.output[-3000:]
    doc = json.loads((tmp_path / "run" / "report.json").read_text())
    assert doc["status"] == "completed"
    assert all(0 < s["epsilon"] <= 8.0 for s in doc["sites"])
    if model_args:  # one record per volume: patients, not slices
        assert doc["config"]["samples"] == "volume-3d"
        assert sum(s["num_examples"] for s in doc["sites"]) <= 120
