"""`vesalius federation run|cv`: option validation, paths, the live view, an unreachable coordinator."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from server.progress import MARKER, ROUND_MARKER


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the socket goes


def test_unreachable_superlink_gives_a_clear_error_and_exit_code(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [
        "federation", "run", "--superlink", f"127.0.0.1:{_closed_port()}", "--insecure",
        "--rounds", "1", "--out", str(tmp_path / "run"), "--flwr-home", str(tmp_path / "home"),
    ])
    assert result.exit_code == 8  # ConnectionProblem
    assert "no SuperLink answered at 127.0.0.1:" in result.output
    assert "Traceback" not in result.output


def test_simulation_needs_a_data_root(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["federation", "run", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--data-root" in result.output


def test_invalid_privacy_options_are_rejected_before_anything_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["federation", "run", "--data-root", str(tmp_path),
                                      "--epsilon", "0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--epsilon" in result.output and "x>0.0" in result.output


# --- choices, numbers and paths are checked before anything starts (issue 13) ----------------


def _site_root(tmp_path: Path) -> Path:
    (tmp_path / "data" / "site-1").mkdir(parents=True)
    return tmp_path / "data"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "cnn3d", "--samples", "image-2d"], "it serves it on: volume-3d"),
        (["--model", "unet"], "does not serve the binary task"),
        (["--model", "nope"], "densenet"),  # the valid values are listed
        (["--format", "xml"], "'xml' is not one of"),
        (["--on-refusal", "ignore"], "'ignore' is not one of"),
        (["--epsilon-cap", "-1"], "--epsilon-cap"),
        (["--lr", "0"], "--lr"),
        (["--max-grad-norm", "-2"], "--max-grad-norm"),
        (["--noise-multiplier", "-0.5"], "--noise-multiplier"),
        (["--engine", "spark"], "'spark' is not one of"),
    ],
)
@pytest.mark.parametrize("command", ["run", "cv"])
def test_bad_choices_and_numbers_are_usage_errors(command: str, args: list[str], expected: str,
                                                  tmp_path: Path) -> None:
    base = ["federation", command, "--data-root", str(_site_root(tmp_path)),
            "--out", str(tmp_path / "o")] + (["--folds", "2"] if command == "cv" else [])
    result = CliRunner().invoke(app, [*base, *args])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.replace("│", " ").split())
    assert "Traceback" not in result.output and "simulating" not in result.output
    assert not (tmp_path / "o").exists()  # nothing started


def test_help_lists_the_valid_models_and_formats() -> None:
    result = CliRunner().invoke(app, ["federation", "run", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "densenet" in result.output and "table|json" in result.output
    # every image model of the zoo serves some task: volumes and segmentation included
    assert "cnn3d" in result.output and "unet" in result.output


def test_a_missing_data_root_is_named_by_its_option_not_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "hospital-records-smith"
    result = CliRunner().invoke(app, ["federation", "run", "--data-root", str(missing)])
    assert result.exit_code == 2
    assert "--data-root folder does not exist" in result.output
    assert "hospital-records-smith" not in result.output


def test_a_relative_root_certificate_reaches_flower_as_an_absolute_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.chdir(tmp_path)
    seen: dict[str, str] = {}

    class FakeFlwr:
        """Stands in for `flwr run`: records its config, streams markers and repeated lines."""

        def __init__(self, cmd: list[str], env: dict[str, str], **_: object) -> None:
            seen["config"] = (Path(env["FLWR_HOME"]) / "config.toml").read_text()
            summary = {"round": 1, "metrics": {"auc": 0.75}, "train": [{"site": "site-1",
                                                                         "epsilon": 2.5}]}
            self.stdout = iter([
                "WARNING :   a Flower line shown once\n", "WARNING :   a Flower line shown once\n",
                MARKER + json.dumps({"phase": "train", "round": 1, "answered": 1, "expected": 2}) + "\n",
                ROUND_MARKER + json.dumps(summary) + "\n",
            ])

        def wait(self) -> int:
            return 0

    monkeypatch.setattr("cli.federation.subprocess.Popen", FakeFlwr)
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")  # an earlier run's report is kept aside, not shown
    result = CliRunner().invoke(app, ["federation", "run", "--superlink", "127.0.0.1:9093",
                                      "--root-certificates", "certs/ca.crt", "--rounds", "1",
                                      "--out", "run", "--flwr-home", "home"])
    assert f'root-certificates = "{tmp_path / "certs" / "ca.crt"}"' in seen["config"]
    assert result.output.count("a Flower line shown once") == 1
    assert "round 1/1: val AUC 0.750" in result.output and "site-1 ε=2.50" in result.output
    assert "ServerApp wrote no report" in result.output and result.exit_code == 1


def test_run_view_places_phases_on_one_bar() -> None:
    from cli.run_progress import RunView
    from server.progress import ProgressEvent

    class Bar:
        def __init__(self) -> None:
            self.updates: list[dict[str, object]] = []

        def update(self, _task: object, **kwargs: object) -> None:
            self.updates.append(kwargs)

    bar = Bar()
    view = RunView(bar, 0, num_rounds=3, num_folds=2)  # type: ignore[arg-type]
    view.on_progress(ProgressEvent("train", 2, 1, 4))
    view.on_progress(ProgressEvent("evaluate", 3, 4, 4))
    view.on_progress(ProgressEvent("test", 0, 2, 4))
    view.on_progress(ProgressEvent("train", 1, 0, 4))  # deployment CV: next fold
    positions = [u["completed"] for u in bar.updates]
    assert positions == [2.25, 6.0, 6.5, 8.0]
    assert bar.updates[0]["description"] == "fold 1/2 round 2/3 training: 1/4 nodes answered"
    assert str(bar.updates[-1]["description"]).startswith("fold 2/2 round 1/3")


def test_round_line_names_the_site_once_and_shows_bracketed_text() -> None:
    from cli.run_progress import round_line

    line = round_line({"round": 1, "metrics": {}, "train": [], "errors": [
        {"site": "site-2", "phase": "train", "reason": "[site-2] refused: [cap] reached"}]}, 2)
    assert "site-2 (train): refused: \\[cap] reached" in line  # escaped for rich markup
    assert "[site-2] refused" not in line


def test_more_nodes_or_folds_than_the_data_allows_are_refused_before_starting(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for site in ("site-1", "site-2"):
        (root / site).mkdir(parents=True)
        rows = "".join(f"P{site}-{i},1.2.3.{i},{i % 2}\n" for i in range(4))
        (root / site / "labels.csv").write_text("patient_id,study_uid,label\n" + rows)
    run = CliRunner().invoke(app, ["federation", "run", "--data-root", str(root), "--min-nodes", "5",
                                   "--out", str(tmp_path / "o")])
    flat = " ".join((run.output + cv_output(root, tmp_path)).replace("│", " ").split())
    assert run.exit_code == 2 and "holds 2 site-* folder(s)" in flat
    assert "site-1 has 4 labelled patient(s), fewer than the 5 folds" in flat
    assert "simulating" not in flat and not (tmp_path / "o").exists()


def cv_output(root: Path, tmp_path: Path) -> str:
    cv = CliRunner().invoke(app, ["federation", "cv", "--data-root", str(root), "--folds", "5",
                                  "--out", str(tmp_path / "o")])
    assert cv.exit_code == 2
    return cv.output


def test_round_line_shows_the_pooled_auc_the_table_shows_and_names_the_threshold() -> None:
    from cli.run_progress import round_line

    summary = {"round": 2, "metrics": {"auc": 0.905, "auc-pooled": 0.892, "accuracy": 0.545},
               "train": [], "errors": []}
    assert "val AUC 0.892  acc@0.5 0.545" in round_line(summary, 6)
    assert "val macro AUC 0.892  acc 0.545" in round_line(summary, 6, task="multiclass")
    del summary["metrics"]["auc-pooled"]  # a node declined histograms: the sites' mean
    assert "val AUC 0.905" in round_line(summary, 6)
