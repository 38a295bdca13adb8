"""`vesalius federation run`: option validation and an unreachable coordinator."""

from __future__ import annotations

import socket
from pathlib import Path

from typer.testing import CliRunner

from cli.app import app


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the socket goes


def test_unreachable_superlink_gives_a_clear_error_and_exit_code(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [
        "federation", "run", "--superlink", f"127.0.0.1:{_closed_port()}", "--insecure",
        "--rounds", "1", "--out", str(tmp_path / "run"), "--flwr-home", str(tmp_path / "home"),
    ])
    assert result.exit_code == 1
    assert "did not complete" in result.output and "SuperLink" in result.output


def test_simulation_needs_a_data_root(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["federation", "run", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--data-root" in result.output


def test_invalid_privacy_options_are_rejected_before_anything_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["federation", "run", "--data-root", str(tmp_path),
                                      "--epsilon", "0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "target-epsilon" in result.output
