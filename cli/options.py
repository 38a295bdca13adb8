"""Option types shared by the commands: checked before anything starts, listed in ``--help``.

Usage errors name the option and what to give, never the value a user typed when it is a
path (a folder name can itself identify a patient or a hospital's internal layout).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import typer

OUTPUT_FORMATS = ("table", "json")


class FiniteRange(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses NaN and infinities (they pass comparisons)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


POSITIVE = FiniteRange(min=0.0, min_open=True)
NON_NEGATIVE = FiniteRange(min=0.0)


class LazyChoice(click.Choice):
    """A :class:`click.Choice` whose values are computed on first use.

    The model registry imports torch; computing its names only when ``--help`` is shown or the
    option is given keeps ``vesalius --help`` fast.
    """

    def __init__(self, values: Callable[[], Sequence[str]]) -> None:
        self._values = values
        self._cached: tuple[str, ...] | None = None
        self.case_sensitive = True

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        if self._cached is None:
            self._cached = tuple(self._values())
        return self._cached

    @choices.setter
    def choices(self, value: Sequence[str]) -> None:
        self._cached = tuple(value)


def federated_models() -> list[str]:
    """Models the federation can train: image models of the registry that serve a task."""
    from common.models import list_models
    from common.tasks import tasks_of

    return [spec.name for spec in list_models()
            if spec.input_kind == "image" and tasks_of(spec.name)]


def model_choice() -> LazyChoice:
    """The ``--model`` type of ``federation run|cv``."""
    return LazyChoice(federated_models)


def _existing(option: str, kind: str, test: Callable[[Path], bool]) -> Callable[[Any], Path | None]:
    def check(value: Path | None) -> Path | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        if not str(value).strip() or not test(path):
            raise typer.BadParameter(f"the {option} {kind} does not exist (or is not a {kind})")
        return path.resolve()

    return check


def existing_folder(option: str) -> Callable[[Any], Path | None]:
    """A callback that resolves a folder option and refuses one that does not exist."""
    return _existing(option, "folder", Path.is_dir)


def existing_file(option: str) -> Callable[[Any], Path | None]:
    """A callback that resolves a file option and refuses one that does not exist."""
    return _existing(option, "file", Path.is_file)


def resolved(value: Path | None) -> Path | None:
    """Resolve a path option (relative paths are relative to where the command was run)."""
    return None if value is None else Path(value).expanduser().resolve()
