"""How every ``vesalius`` command ends when something goes wrong.

- The project's own errors (:class:`~common.errors.VesaliusError`) end with one red sentence
  (their message, passed through :func:`common.logsafe.redact`) and an exit code per kind
  (:data:`EXIT_CODES`), so scripts can tell a bad configuration from unusable data or an
  exhausted budget.
- Anything unexpected ends with a short sentence naming the exception's type and the path of
  a local log file that holds the full traceback, written **without local variables** (typer's
  pretty tracebacks print every frame's locals, which can hold a labels CSV's text).
- Usage errors stay click's (exit 2); Ctrl-C exits 130.

:class:`SafeGroup` is the ``cls`` of the top-level typer app; sub-groups run inside its
:meth:`~SafeGroup.invoke`, so one handler covers every command, and ``CliRunner`` tests see
exactly what a user sees.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click
from typer.core import TyperGroup

from common.errors import (
    BudgetExceededError,
    ConfigError,
    ConnectionProblem,
    DataError,
    PrivacyConfigError,
    VesaliusError,
)
from common.ledger.errors import LedgerError
from common.logsafe import redact

#: Exit code per kind of project error (most specific class first). 1 = a run that did not
#: complete, 2 = usage (click), 70 = unexpected (EX_SOFTWARE), 130 = interrupted.
EXIT_CODES: tuple[tuple[type[VesaliusError], int], ...] = (
    (ConfigError, 3),
    (DataError, 4),
    (BudgetExceededError, 5),
    (PrivacyConfigError, 6),
    (LedgerError, 7),
    (ConnectionProblem, 8),
    (VesaliusError, 9),
)
EXIT_UNEXPECTED = 70
EXIT_INTERRUPTED = 130


def exit_code_for(exc: VesaliusError) -> int:
    """The exit code of a project error (its most specific listed class)."""
    return next(code for cls, code in EXIT_CODES if isinstance(exc, cls))


def log_dir() -> Path:
    """Where unexpected errors are written: ``$VESALIUS_HOME/logs`` (default ``~/.vesalius/logs``)."""
    home = os.environ.get("VESALIUS_HOME")
    return (Path(home) if home else Path.home() / ".vesalius") / "logs"


def write_crash_log(exc: BaseException) -> Path | None:
    """Write ``exc``'s traceback (frames and source lines, no locals) to a new log file.

    The file is created owner-only (0600): a traceback can still quote a source line that
    holds a value. Returns ``None`` when no log file can be written.
    """
    try:
        folder = log_dir()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / f"vesalius-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        text = format_redacted(exc)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"vesalius {' '.join(sys.argv[1:2])}: unexpected error\n{text}")
        return path
    except OSError:
        return None


def format_redacted(exc: BaseException) -> str:
    """``exc``'s traceback with its chain; each exception's own message passes :func:`redact`.

    The frames (source files, line numbers, code) are kept for developers; the messages,
    which may quote a value from the data, are redacted.
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    blocks = [
        "Traceback (most recent call last):\n"
        + "".join(traceback.format_tb(item.__traceback__))
        + redact("".join(traceback.format_exception_only(type(item), item)))
        for item in reversed(chain)
    ]
    return "\nDuring handling of the above exception, another one followed:\n\n".join(blocks)


def _say(message: str) -> None:
    from cli.console import err_console

    err_console.print(f"[red]error:[/red] {message}", markup=True, highlight=False, soft_wrap=True)


class SafeGroup(TyperGroup):
    """The top-level group: turns every error a command raises into a sentence and a code."""

    def invoke(self, ctx: click.Context) -> Any:
        from cli.console import setup_logging

        setup_logging(verbose=False)  # commands with --verbose raise the level themselves
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:  # `vesalius ... | head`: the reader left; nothing to say
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush
            raise click.exceptions.Exit(0) from None
        except KeyboardInterrupt:
            _say("interrupted")
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except VesaliusError as exc:
            _say(redact(str(exc)) or exc.safe_reason)
            raise click.exceptions.Exit(exit_code_for(exc)) from None
        except Exception as exc:  # the net under everything: never a traceback on screen
            path = write_crash_log(exc)
            where = f"the full traceback is in {path}" if path else "no log file could be written"
            _say(f"unexpected error ({type(exc).__name__}); {where}. "
                 "Please report it with that file (its messages are redacted).")
            raise click.exceptions.Exit(EXIT_UNEXPECTED) from None
