"""`vesalius synth --task`: each task's demo hospitals, checked by `node check --task`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cli.app import app


def _run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    ("task", "extra", "k"),
    [
        ("multiclass", ["--num-classes", "3"], 3),
        ("ordinal", [], 5),
        ("multilabel", [], 3),
        ("regression", [], None),
        ("segmentation", [], None),
        ("reconstruction", ["--slices", "3"], None),
    ],
)
def test_node_check_accepts_what_synth_writes_for_each_task(
    tmp_path: Path, task: str, extra: list[str], k: int | None
) -> None:
    # Prepare
    out = tmp_path / "data"
    # Execute
    written = _run("synth", "--out", str(out), "--sites", "2", "--patients", "6", "--task", task,
                   *extra)
    checks = [_run("node", "check", "--data", str(site), "--task", task, "--format", "json",
                   *(["--num-classes", str(k)] if k else []))
              for site in sorted(out.glob("site-*"))]
    # Assert
    assert written.exit_code == 0, written.output
    assert f"--task {task}" in written.output
    assert len(checks) == 2
    for result in checks:
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["usable"] is True and doc["skipped"] == [] and doc["label_problems"] == []
        assert doc["task"] == task and doc.get("num_classes") == k


def test_slices_give_fixed_length_series_for_the_binary_task(tmp_path: Path) -> None:
    # Execute
    result = _run("synth", "--out", str(tmp_path / "d"), "--sites", "1", "--patients", "4",
                  "--slices", "8")
    # Assert
    assert result.exit_code == 0, result.output
    studies = sorted((tmp_path / "d" / "site-1" / "dicom").glob("*/ST1/SE1"))
    assert [len(list(s.glob("IM*.dcm"))) for s in studies] == [8, 8, 8, 8]


def test_many_small_sites_are_summed_up_in_the_table(tmp_path: Path) -> None:
    # Execute
    result = _run("synth", "--out", str(tmp_path / "d"), "--sites", "23", "--patients", "4",
                  "--task", "reconstruction")
    # Assert
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "site-23").is_dir()
    assert "3 more" in result.output and "site-21" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--sites", "1001"],
        ["--task", "detection"],
        ["--task", "multiclass", "--num-classes", "9"],
        ["--task", "binary", "--num-classes", "3"],
        ["--task", "regression", "--num-classes", "3"],
        ["--slices", "0"],
    ],
)
def test_out_of_range_choices_are_usage_errors_before_writing(tmp_path: Path,
                                                              args: list[str]) -> None:
    # Execute
    result = _run("synth", "--out", str(tmp_path / "d"), "--patients", "4", *args)
    # Assert
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "d").exists()
    assert "Traceback" not in result.output
