"""Every command ends in one sentence and an exit code: never a traceback, never locals."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli.app import app as vesalius_app
from cli.errors import EXIT_UNEXPECTED, SafeGroup, exit_code_for
from common.errors import BudgetExceededError, ConfigError, ConnectionProblem, DataError
from common.ledger.errors import LedgerError

SECRET_PID = "PID-93af1c"
SECRET_UID = "1.2.826.0.1.3680043.8.498.77123456789"


def _app_raising(exc: BaseException) -> typer.Typer:
    app = typer.Typer(cls=SafeGroup, pretty_exceptions_enable=False)

    @app.command("boom")
    def boom(labels: str = typer.Option("patient_id,study_uid\n" + SECRET_PID)) -> None:
        rows = labels.splitlines()  # a local holding patient data, as in a CSV reader  # noqa: F841
        raise exc

    @app.command("other")
    def other() -> None:
        """A second command, so that 'boom' is a sub-command as in the real app."""

    return app


@pytest.mark.parametrize(
    ("exc", "code"),
    [(ConfigError("give --rounds >= 1"), 3), (DataError("labels.csv line 4: empty patient_id"), 4),
     (BudgetExceededError("the plan needs ε 9 > cap 8"), 5), (LedgerError("torn last entry"), 7),
     (ConnectionProblem("cannot reach the coordinator at 127.0.0.1:9092"), 8)],
)
def test_project_errors_print_one_sentence_with_their_exit_code(exc: Exception, code: int,
                                                               tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESALIUS_HOME", str(tmp_path))
    result = CliRunner().invoke(_app_raising(exc), ["boom"])
    assert result.exit_code == code == exit_code_for(exc)  # type: ignore[arg-type]
    assert result.output.strip().startswith("error:") and str(exc).split()[0] in result.output
    assert "Traceback" not in result.output and SECRET_PID not in result.output
    assert len(result.output.strip().splitlines()) <= 2
    assert not (tmp_path / "logs").exists()  # an expected error writes no crash log


def test_project_error_messages_are_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESALIUS_HOME", str(tmp_path))
    exc = DataError(f"study {SECRET_UID} of '{SECRET_PID}' under /data/site-1/img.dcm")
    result = CliRunner().invoke(_app_raising(exc), ["boom"])
    assert result.exit_code == 4
    for value in (SECRET_UID, SECRET_PID, "/data/site-1"):
        assert value not in result.output


def test_unexpected_errors_log_a_traceback_without_locals(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESALIUS_HOME", str(tmp_path))
    result = CliRunner().invoke(_app_raising(KeyError(SECRET_PID)), ["boom"])
    assert result.exit_code == EXIT_UNEXPECTED
    assert "unexpected error (KeyError)" in result.output
    assert "Traceback" not in result.output and SECRET_PID not in result.output
    logs = list((tmp_path / "logs").glob("vesalius-*.log"))
    assert len(logs) == 1 and str(logs[0]) in result.output.replace("\n", "")
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "raise exc" in text
    assert SECRET_PID not in text  # neither the local `rows` nor the KeyError's value
    assert logs[0].stat().st_mode & 0o077 == 0


def test_the_real_app_never_shows_locals() -> None:
    assert vesalius_app.pretty_exceptions_show_locals is False
    assert vesalius_app.pretty_exceptions_enable is False
    assert vesalius_app.info.cls is SafeGroup
