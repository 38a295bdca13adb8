"""One sanitiser for every line the project shows or logs.

A hospital's terminal and log files are read by people who may not see patient data, and log
files are copied into tickets. So nothing that passes through Python's ``logging`` (the
project's own loggers, Flower's, pydicom's) or through :mod:`warnings` may carry a DICOM tag
value, a patient id, a UID or a file path. :func:`redact` removes those shapes from a text;
:func:`install_log_sanitiser` applies it to every handler of the root logger and routes Python
warnings (pydicom reports invalid values through :func:`warnings.warn`, with the value quoted)
through the same handlers.

Redaction is by shape, so it errs on the side of removing too much:

- anything in single or double quotes (pydicom quotes the offending value:
  ``Invalid value for VR UI: '05fa52f0…'``);
- dotted numeric identifiers with five or more components (DICOM UIDs, (0008,0018) and
  friends; IPv4 addresses, which have four, survive);
- absolute and home-relative paths (``/data/site-1/…``, ``~/…``, ``C:\\…``);
- DICOM person names in ``Family^Given`` form ((0010,0010) Patient's Name);
- runs of seven or more digits (medical record numbers, dates with times).

Our own code does not rely on this: it never puts such values in messages in the first
place. The sanitiser is the net under third-party libraries.
"""

from __future__ import annotations

import logging
import re

__all__ = ["SanitisingFilter", "install_log_sanitiser", "redact"]

_QUOTED = re.compile(r"(?<!\w)'[^'\n]*'(?!\w)|(?<!\w)\"[^\"\n]*\"(?!\w)")
_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){4,}(?![\w.])")
_PATH = re.compile(
    r"(?<![\w.~/<])(?:~|[A-Za-z]:)?[/\\](?:[\w.\-@+]+[/\\]?)+"
)
_PERSON_NAME = re.compile(r"[^\s^=:,;()]+(?:\^[^\s^=:,;()]*)+")
_LONG_NUMBER = re.compile(r"(?<![\w.])\d{7,}(?![\w.])")


def redact(text: str) -> str:
    """Return ``text`` with quoted values, UIDs, paths, person names and long numbers removed.

    Parameters
    ----------
    text : str
        A log message, warning or error text.

    Returns
    -------
    str
        The same text with each identifying shape replaced by a placeholder
        (``<value>``, ``<uid>``, ``<path>``, ``<name>``, ``<number>``).
    """
    text = _QUOTED.sub("<value>", text)
    text = _UID.sub("<uid>", text)
    text = _PATH.sub("<path>", text)
    text = _PERSON_NAME.sub("<name>", text)
    return _LONG_NUMBER.sub("<number>", text)


class SanitisingFilter(logging.Filter):
    """A handler filter that redacts each record's message (and drops its arguments).

    Exception text attached to a record is redacted too, and its traceback dropped: the
    traceback's frames may quote source lines that hold values.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed format string must not crash logging
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info:
            exc = record.exc_info[1]
            record.msg += f" ({type(exc).__name__}: {redact(str(exc))})" if exc else ""
            record.exc_info = None
            record.exc_text = None
        return True


_FILTER = SanitisingFilter()


def install_log_sanitiser(logger: logging.Logger | None = None) -> None:
    """Redact every record on every handler of ``logger`` (default: the root logger).

    Python warnings are routed to logging (``py.warnings``), so pydicom's warnings about
    invalid values pass the same filter and appear once each, without their values.
    Call it again after adding handlers; it is idempotent.
    """
    target = logger if logger is not None else logging.getLogger()
    logging.captureWarnings(True)
    for handler in target.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    for name in ("flwr", "pydicom"):  # libraries that attach handlers of their own
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
