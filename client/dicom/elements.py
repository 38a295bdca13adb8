"""The raw element stream of a DICOM file: duplicated elements and byte-order consistency.

pydicom's parsed :class:`~pydicom.dataset.Dataset` is a dictionary keyed by tag: when an
element occurs twice in a file, the last occurrence silently wins. A file with two
(0010,0020) Patient ID elements holding different values would then be filed under
whichever comes last, and another reader may pick the first. :func:`check_element_stream`
walks the top-level elements as they are encoded (with
:func:`pydicom.filereader.data_element_generator`, values larger than a few bytes skipped
over, so it stays header-only) and reports every tag met more than once, in the file meta
group (0002,eeee) and in the top-level dataset.

The same walk tells whether the dataset is encoded as the (0002,0010) Transfer Syntax UID
declares. A little-endian dataset relabelled big endian (or the reverse) reads as byte-swapped
tags and lengths: values run past the end of the file or the tags stop ascending. When the
declared byte order fails that way and the other byte order reads the dataset cleanly, the
file is flagged as a byte-order mismatch. (A mismatch between implicit and explicit VR alone
is not flagged: pydicom detects and reads it correctly, and the pixel bytes are unaffected.)
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag
from pydicom.uid import UID

_PREAMBLE_AND_PREFIX = 132
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: Values above this many bytes are skipped over (seeked past) during the walk.
_DEFER_BYTES = 64
_TRANSFER_SYNTAX = 0x00020010


def tag_text(tag: int) -> str:
    """``(gggg,eeee)`` for a tag, upper-case hex."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class WalkResult:
    """One walk of a dataset's top-level elements under one encoding.

    Attributes
    ----------
    elements : int
        Top-level elements read.
    duplicates : tuple[int, ...]
        Tags met more than once, in order of their second occurrence.
    clean : bool
        ``True`` when the walk reached the end of the data with every element inside the
        file and tags in ascending order.
    """

    elements: int
    duplicates: tuple[int, ...]
    clean: bool


@dataclass(frozen=True)
class StreamCheck:
    """Outcome of :func:`check_element_stream`.

    Attributes
    ----------
    duplicates : tuple[int, ...]
        Tags met more than once in the file meta group or the top-level dataset.
    byte_order_mismatch : bool
        The dataset does not read under the declared byte order but does under the other.
    """

    duplicates: tuple[int, ...]
    byte_order_mismatch: bool


def _walk(fp: BinaryIO, size: int, *, implicit: bool, little: bool) -> WalkResult:
    seen: set[int] = set()
    duplicates: list[int] = []
    previous = -1
    ascending = True
    count = 0
    try:
        for elem in data_element_generator(fp, implicit, little, defer_size=_DEFER_BYTES):
            tag = int(elem.tag)
            count += 1
            if tag in seen:
                duplicates.append(tag)
            seen.add(tag)
            if tag <= previous:
                ascending = False
            previous = tag
            length = getattr(elem, "length", 0)
            tell = getattr(elem, "value_tell", None)
            if length != _UNDEFINED_LENGTH and tell is not None and tell + length > size:
                return WalkResult(count, tuple(duplicates), clean=False)
    except Exception:  # noqa: BLE001 - any parse failure means "not clean"
        return WalkResult(count, tuple(duplicates), clean=False)
    return WalkResult(count, tuple(duplicates), clean=ascending)


def _read_meta(fp: BinaryIO) -> tuple[tuple[int, ...], str]:
    """Walk the file meta group from the current position (just after 'DICM').

    Returns the duplicated meta tags and the (0002,0010) Transfer Syntax UID, and leaves
    ``fp`` at the first dataset element.
    """
    seen: set[int] = set()
    duplicates: list[int] = []
    syntax = ""
    for elem in data_element_generator(
        fp, False, True, stop_when=lambda tag, vr, length: BaseTag(tag).group != 2
    ):
        tag = int(elem.tag)
        if tag in seen:
            duplicates.append(tag)
        seen.add(tag)
        if tag == _TRANSFER_SYNTAX and isinstance(elem.value, bytes):
            syntax = elem.value.decode("ascii", "replace").strip("\0 ")
    return tuple(duplicates), syntax


def check_element_stream(path: Path) -> StreamCheck:
    """Walk a Part 10 file's raw elements; report duplicates and a byte-order mismatch.

    Parameters
    ----------
    path : Path
        A file with the 128-byte preamble and 'DICM' prefix (PS3.10 7.1).

    Returns
    -------
    StreamCheck
        Duplicated tags (meta group and top-level dataset) and whether the dataset reads
        only under the byte order the (0002,0010) Transfer Syntax UID does *not* declare.

    Raises
    ------
    Exception
        Whatever the file meta group's parse raises; the scanner classifies it.
    """
    with path.open("rb") as fp:
        fp.seek(_PREAMBLE_AND_PREFIX)
        meta_duplicates, syntax = _read_meta(fp)
        uid = UID(syntax) if syntax else UID("1.2.840.10008.1.2.1")
        known = uid.is_transfer_syntax
        implicit = bool(uid.is_implicit_VR) if known else False
        little = bool(uid.is_little_endian) if known else True
        stream: BinaryIO = fp
        start = fp.tell()
        size = path.stat().st_size
        if known and uid.is_deflated:
            inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(fp.read())
            stream, start, size = io.BytesIO(inflated), 0, len(inflated)

        def walk(*, implicit_vr: bool, little_endian: bool) -> WalkResult:
            stream.seek(start)
            return _walk(stream, size, implicit=implicit_vr, little=little_endian)

        declared = walk(implicit_vr=implicit, little_endian=little)
        mismatch = False
        if not declared.clean:
            # the other byte order, under either VR encoding (a relabelling may change both)
            for other_implicit in (implicit, not implicit):
                other = walk(implicit_vr=other_implicit, little_endian=not little)
                if other.clean and other.elements > declared.elements:
                    mismatch = True
                    break
    return StreamCheck(
        duplicates=meta_duplicates + declared.duplicates, byte_order_mismatch=mismatch
    )
