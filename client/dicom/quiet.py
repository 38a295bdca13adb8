"""Keep pydicom's warnings and log lines, which quote tag values, off the node's streams.

pydicom reports a malformed value by quoting it, e.g. "Invalid value for VR UI: '1.2.3...'",
both through :mod:`warnings` and through its ``"pydicom"`` logger (``warn_and_log``). A UID,
a patient name or a date quoted there would reach stderr and the node's log. Everything the
scanner and the pixel reader do with pydicom therefore runs inside :func:`quiet_pydicom`:

* warnings raised in the block are recorded (``warnings.catch_warnings(record=True)``),
  never shown;
* records of the ``pydicom`` logger are captured by a temporary handler and the logger
  stops propagating to the root logger for the duration of the block.

Only a *kind* per captured message is kept (see :func:`message_kind`: a fixed label such as
``"invalid-value"``), never the message text. Callers add the kinds to a
:class:`PydicomNoise` counter and log the counts at INFO.

Caveat: :func:`warnings.catch_warnings` changes process-wide state; a warning raised by
another thread during the block is recorded here too (and so hidden, never shown).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_PYDICOM_LOGGER = logging.getLogger("pydicom")
_state_lock = threading.Lock()
_depth = 0
_saved_propagate = True
_local = threading.local()

#: Fixed labels for captured pydicom messages, first match wins (matched lower-case).
_KINDS: tuple[tuple[str, str], ...] = (
    ("invalid value for vr", "invalid-value"),
    ("value length", "invalid-length"),
    ("end of file", "truncated"),
    ("expected explicit vr", "vr-encoding"),
    ("expected implicit vr", "vr-encoding"),
    ("unknown vr", "vr-encoding"),
    ("vr of", "vr-mismatch"),
    ("decompression", "decoder-limit"),
    ("pixel data", "pixel-data"),
    ("character set", "character-set"),
)


def message_kind(text: str) -> str:
    """Map a pydicom warning or log message to a fixed label (never the text itself)."""
    lowered = text.lower()
    for needle, kind in _KINDS:
        if needle in lowered:
            return kind
    return "other"


@dataclass
class PydicomNoise:
    """Counts of captured pydicom messages by kind (see :func:`message_kind`)."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, kinds: list[str]) -> None:
        """Add the kinds captured for one file."""
        self.counts.update(kinds)

    @property
    def total(self) -> int:
        """Messages captured in all."""
        return sum(self.counts.values())

    def log(self, what: str) -> None:
        """Log the counts per kind at INFO (no values), when any was captured."""
        if self.total:
            summary = ", ".join(f"{kind} {n}" for kind, n in sorted(self.counts.items()))
            logger.info(
                "%s: %d pydicom messages withheld (values not shown): %s",
                what,
                self.total,
                summary,
            )


class _Capture(logging.Handler):
    """Appends the kind of each pydicom record to the current thread's capture list."""

    def emit(self, record: logging.LogRecord) -> None:
        stack: list[list[str]] | None = getattr(_local, "stack", None)
        if stack:
            try:
                stack[-1].append(message_kind(record.getMessage()))
            except Exception:  # noqa: BLE001 - a bad format string must not escape
                stack[-1].append("other")


_HANDLER = _Capture(level=logging.DEBUG)


def _enter_logger() -> None:
    global _depth, _saved_propagate
    with _state_lock:
        if _depth == 0:
            _saved_propagate = _PYDICOM_LOGGER.propagate
            _PYDICOM_LOGGER.propagate = False
            _PYDICOM_LOGGER.addHandler(_HANDLER)
        _depth += 1


def _exit_logger() -> None:
    global _depth
    with _state_lock:
        _depth -= 1
        if _depth == 0:
            _PYDICOM_LOGGER.removeHandler(_HANDLER)
            _PYDICOM_LOGGER.propagate = _saved_propagate


@dataclass
class Captured:
    """What :func:`quiet_pydicom` caught so far: pydicom log records and warnings."""

    log_kinds: list[str] = field(default_factory=list)
    caught: list[warnings.WarningMessage] = field(default_factory=list)

    def kinds(self) -> list[str]:
        """One fixed label per captured record or warning (see :func:`message_kind`)."""
        return self.log_kinds + [message_kind(str(w.message)) for w in self.caught]


@contextmanager
def quiet_pydicom(*, errors: tuple[type[Warning], ...] = ()) -> Iterator[Captured]:
    """Run a block with pydicom's warnings and log records captured, not shown.

    Parameters
    ----------
    errors : tuple of Warning subclasses, keyword-only
        Warning categories turned into exceptions inside the block (the pixel reader
        passes Pillow's ``DecompressionBombWarning`` so that an oversized image is refused
        instead of decoded).

    Yields
    ------
    Captured
        Filled as the block runs; read :meth:`Captured.kinds` for the labels.
    """
    captured = Captured()
    stack: list[list[str]] = getattr(_local, "stack", None) or []
    _local.stack = stack
    stack.append(captured.log_kinds)
    _enter_logger()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for category in errors:
                warnings.simplefilter("error", category)
            captured.caught = caught
            yield captured
    finally:
        _exit_logger()
        stack.pop()
