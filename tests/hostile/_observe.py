"""Run the ingestion and the CLI while recording everything they say, and search it.

What is recorded: Python warnings (``warnings.catch_warnings(record=True)``), log records at
the default WARNING level that reach the root logger, the CLI's stdout and stderr
(``CliRunner`` captures them separately) and, through pytest's ``capfd``, anything written to
the real file descriptors. Searches ignore whitespace and rich's box-drawing characters, so a
value wrapped or boxed by a rich table or panel is still found.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from click.testing import Result
from typer.testing import CliRunner

from client.dicom import scan_data_dir
from client.dicom.index import DicomIndex
from client.dicom.reasons import SkipCode
from client.dicom.report import IngestionReport

_DROP = re.compile(r"[\s\u2500-\u257f\u2026]+")


def normalise(text: str) -> str:
    """Drop whitespace, box-drawing characters and ellipses (rich wrapping and framing)."""
    return _DROP.sub("", text)


@dataclass
class Observed:
    """Warnings and log lines recorded while a block ran."""

    warnings: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.sink.append(f"{record.name}: {text}")


@contextmanager
def observe() -> Iterator[Observed]:
    """Record warnings and WARNING+ log records emitted inside the block."""
    obs = Observed()
    handler = _ListHandler(obs.logs)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield obs
        obs.warnings.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        root.removeHandler(handler)


def scan(data_dir: Path, *, require_deidentified: bool) -> tuple[DicomIndex, IngestionReport]:
    """``scan_data_dir`` with ``decode_pixels=True`` when this version has that parameter."""
    kwargs: dict[str, Any] = {"require_deidentified": require_deidentified}
    if "decode_pixels" in inspect.signature(scan_data_dir).parameters:
        kwargs["decode_pixels"] = True
    return scan_data_dir(data_dir, **kwargs)


def invoke(args: Sequence[str]) -> Result:
    """Invoke the real ``vesalius`` typer app in-process (stdout and stderr kept apart)."""
    from cli.app import app

    return CliRunner().invoke(app, list(args))


def outputs(result: Result) -> str:
    """Everything the command printed (stdout and stderr)."""
    try:
        err = result.stderr
    except ValueError:
        err = ""
    return f"{result.stdout}\n{err}"


def assert_clean_exit(result: Result, what: str) -> None:
    """The command ended by itself (no exception escaped to become a traceback)."""
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        raise AssertionError(
            f"{what}: unhandled {type(exc).__name__} escaped the command (a traceback in the "
            f"real CLI): {exc!s:.300}\n--- printed ---\n{outputs(result)[:1500]}"
        )
    assert "Traceback" not in outputs(result), f"{what}: a traceback was printed"


def assert_no_leak(texts: Mapping[str, str], secrets: Iterable[str]) -> None:
    """No secret (nor its random core) appears in any of ``texts``.

    Raises
    ------
    AssertionError
        Naming every (where, value) pair found, with a little context.
    """
    from tests.hostile._mutate import needles

    hits: list[str] = []
    flat = {where: normalise(text) for where, text in texts.items()}
    for secret in sorted({s for s in secrets if s}):
        hit = _first_hit(flat, needles(secret))
        if hit is not None:
            hits.append(f"{secret!r} in {hit}")
    assert not hits, "identifying values on screen/in logs:\n" + "\n".join(hits)


def _first_hit(flat: Mapping[str, str], keys: Iterable[str]) -> str | None:
    for needle in keys:
        key = normalise(needle)
        for where, text in flat.items():
            at = text.find(key)
            if at >= 0:
                return f"{where}: ...{text[max(0, at - 60): at + len(key) + 60]}..."
    return None


def assert_classified(report: IngestionReport, names: Iterable[str], used: Iterable[str]) -> None:
    """Every file counted once: seen == used + skipped, each skip with a code and a sentence."""
    names = set(names)
    used_set = set(used)
    skipped = {s.relpath: s for s in report.skipped}
    assert report.files_seen == len(names), (report.files_seen, sorted(names))
    assert report.files_seen == report.files_used + len(report.skipped), report.to_dict()
    assert used_set | set(skipped) == names and not (used_set & set(skipped)), (
        sorted(used_set), sorted(skipped))
    for rel, skip in skipped.items():
        assert isinstance(skip.code, SkipCode), (rel, skip.code)
        text = skip.text.strip()
        assert len(text) >= 10 and " " in text, f"{rel}: skip {skip.code} has no sentence: {text!r}"


def report_json_without_paths(report: IngestionReport) -> str:
    """The report as JSON with the (local, relative) file names removed."""
    doc = report.to_dict()
    doc["skipped"] = [{k: v for k, v in row.items() if k != "path"} for row in doc["skipped"]]
    return json.dumps(doc)
