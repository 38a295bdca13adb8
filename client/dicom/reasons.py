"""Why a file under a node's data directory was not used.

Each reason is a stable short code (safe to log, to count and to aggregate) plus a fixed
human sentence. The sentences never contain DICOM tag values, patient data or absolute
paths, so the counts per code may be shown to an operator or summarised off the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class SkipCode(str, Enum):
    """Stable codes for files the scanner does not use."""

    NOT_DICOM = "not-dicom"
    TRUNCATED = "truncated"
    NO_PIXELS = "no-pixels"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported-transfer-syntax"
    UNSUPPORTED_IMAGE = "unsupported-image"
    PHI = "phi"
    MISSING_UID = "missing-uid"
    DUPLICATE = "duplicate"
    DUPLICATE_ELEMENT = "duplicate-element"
    TRANSFER_SYNTAX_MISMATCH = "transfer-syntax-mismatch"
    INVALID_VALUE = "invalid-value"
    UNDECODABLE = "undecodable"

    @property
    def text(self) -> str:
        """The fixed human sentence for this code."""
        return SKIP_TEXT[self]


SKIP_TEXT: dict[SkipCode, str] = {
    SkipCode.NOT_DICOM: (
        "not a DICOM Part 10 file (no 'DICM' prefix after the preamble, or unreadable)"
    ),
    SkipCode.TRUNCATED: "file ends before the end of its pixel data",
    SkipCode.NO_PIXELS: "no (7FE0,0010) Pixel Data element",
    SkipCode.UNSUPPORTED_TRANSFER_SYNTAX: (
        "pixel data uses a transfer syntax that no installed decoder can read"
    ),
    SkipCode.UNSUPPORTED_IMAGE: (
        "image is not single-sample greyscale (MONOCHROME1/MONOCHROME2) "
        "or has missing/invalid geometry"
    ),
    SkipCode.PHI: (
        "file is not de-identified (direct identifiers present or identity not removed)"
    ),
    SkipCode.MISSING_UID: (
        "a required identifier (patient ID, study, series or SOP instance UID) is missing"
    ),
    SkipCode.DUPLICATE: "same (0008,0018) SOP Instance UID as a file already indexed",
    SkipCode.DUPLICATE_ELEMENT: (
        "an element occurs more than once in the file, so which value holds is ambiguous; "
        "re-export the file from its source"
    ),
    SkipCode.TRANSFER_SYNTAX_MISMATCH: (
        "the data is not encoded as its (0002,0010) Transfer Syntax UID declares "
        "(byte order or encapsulation), so its pixels would be meaningless; "
        "re-export the file from its source"
    ),
    SkipCode.INVALID_VALUE: (
        "an element the node reads holds a value that is invalid for its value representation"
    ),
    SkipCode.UNDECODABLE: "the pixel data could not be decoded",
}


class Skip(Exception):
    """Raised by the per-file checks: the file is skipped with ``code`` and ``detail``.

    ``detail`` is a fixed sentence (tags named, never values); empty means ``code.text``.
    """

    def __init__(self, code: SkipCode, detail: str = "") -> None:
        super().__init__(code.value)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class SkippedFile:
    """One file that was not used.

    Attributes
    ----------
    relpath : str
        Path relative to the data directory, POSIX separators. Local reports only: a file
        name may itself be identifying, so it must not leave the node.
    code : SkipCode
        The stable reason code.
    detail : str
        A fixed sentence (never a tag value); defaults to ``code.text``.
    """

    relpath: str
    code: SkipCode
    detail: str = ""

    @property
    def text(self) -> str:
        """Human sentence for this skip: ``detail`` when given, else the code's text."""
        return self.detail or self.code.text

    def to_dict(self) -> dict[str, str]:
        """Return a JSON-ready mapping ``{"path", "code", "text"}``."""
        return {"path": self.relpath, "code": self.code.value, "text": self.text}
