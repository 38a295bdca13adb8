"""Shared console helpers for the CLI: one rich Console, progress bars, logging setup."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    """Library code logs through ``logging``; the CLI shows warnings (or info with -v).

    Every record and every Python warning passes :func:`common.logsafe.redact` first, at
    every level, so no tag value, UID or path reaches the screen through a library's log.
    """
    from common.logsafe import install_log_sanitiser

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=verbose,
                              rich_tracebacks=False)],
        force=True,
    )
    install_log_sanitiser()


@contextmanager
def progress_bar(description: str, *, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yield a ``progress(done, total)`` callback drawing a rich bar (no-op when disabled)."""
    if not enabled:
        yield lambda done, total: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def fmt(value: object, spec: str = ".3f") -> str:
    """Format a number for a table; '-' for missing/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def table(title: str, columns: list[str]) -> Table:
    """A rich table with the given column headers."""
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col)
    return t
