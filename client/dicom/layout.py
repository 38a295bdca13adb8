"""Does the (7FE0,0010) Pixel Data fit the declared transfer syntax and geometry?

Checks, from the header and (for the byte order) a small sample of the pixel bytes:

* encapsulation: pixel data is encapsulated (undefined length, PS3.5 A.4) if and only if the
  (0002,0010) Transfer Syntax UID is a compressed one; native pixel data of the wrong length
  that starts with an (FFFE,E000) Item tag is encapsulated data relabelled as native;
* length, native syntaxes: the value holds at least Rows x Columns x frames x samples x
  Bits Allocated / 8 bytes and lies inside the file (trailing padding is tolerated, as
  pydicom tolerates it: the decoder reads the announced bytes only);
* byte order, native 16- and 32-bit data: a file relabelled between little and big endian
  with its pixel bytes left as they were decodes to noise. Natural images are smooth: the
  mean absolute difference between horizontal neighbours is far smaller in the true byte
  order than in the swapped one (a factor above 100 on CT and MR). A sample of at most
  :data:`SAMPLE_BYTES` from the middle of the first frame is read; when it is more than
  :data:`SWAP_FACTOR` times rougher as declared than byte-swapped, the file is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from client.dicom.geometry import Geometry
from client.dicom.reasons import Skip, SkipCode

PIXEL_DATA = Tag(0x7FE0, 0x0010)
UNDEFINED_LENGTH = 0xFFFFFFFF
#: Largest sample of pixel bytes read for the byte-order check.
SAMPLE_BYTES = 64 * 1024
#: Declared-order roughness above this multiple of the swapped-order roughness is refused.
SWAP_FACTOR = 8.0
_ITEM_LE = b"\xfe\xff\x00\xe0"
_ITEM_BE = b"\xff\xfe\xe0\x00"


def _mismatch(detail: str) -> Skip:
    return Skip(SkipCode.TRANSFER_SYNTAX_MISMATCH, detail)


def _roughness(values: np.ndarray) -> float:
    return float(np.abs(np.diff(values.astype(np.float64), axis=1)).mean())


def byte_order_swapped(sample: bytes, geometry: Geometry, *, little_endian: bool) -> bool:
    """Return ``True`` when ``sample`` looks far smoother read in the other byte order.

    Parameters
    ----------
    sample : bytes
        Whole rows of native pixel data.
    geometry : Geometry
        For (0028,0011) Columns, (0028,0100) Bits Allocated and the signedness.
    little_endian : bool
        The byte order the transfer syntax declares.
    """
    width = geometry.bits_allocated // 8
    if width not in (2, 4) or geometry.columns < 2:
        return False
    kind = "i" if geometry.signed else "u"
    declared = np.dtype(f"{'<' if little_endian else '>'}{kind}{width}")
    row_bytes = geometry.columns * width
    usable = (len(sample) // row_bytes) * row_bytes
    if usable == 0:
        return False
    as_declared = np.frombuffer(sample[:usable], dtype=declared).reshape(-1, geometry.columns)
    swapped = np.frombuffer(sample[:usable], dtype=declared.newbyteorder()).reshape(
        -1, geometry.columns
    )
    rough_declared, rough_swapped = _roughness(as_declared), _roughness(swapped)
    return rough_declared > SWAP_FACTOR * rough_swapped


def _starts_with_item(path: Path, offset: int, value: object) -> bool:
    """``True`` when the value starts with an (FFFE,E000) Item tag (encapsulated fragments)."""
    if offset >= 0:
        with path.open("rb") as fh:
            fh.seek(offset)
            head = fh.read(4)
    elif isinstance(value, (bytes, bytearray)):
        head = bytes(value[:4])
    else:
        return False
    return head in (_ITEM_LE, _ITEM_BE)


def _sample(path: Path, offset: int, geometry: Geometry, length: int) -> bytes:
    """Whole rows around the middle of the first frame, at most :data:`SAMPLE_BYTES`."""
    row_bytes = geometry.columns * geometry.bits_allocated // 8
    rows = max(1, min(geometry.rows, SAMPLE_BYTES // max(row_bytes, 1)))
    first = max(0, geometry.rows // 2 - rows // 2)
    start = first * row_bytes
    size = min(rows * row_bytes, max(length - start, 0))
    with path.open("rb") as fh:
        fh.seek(offset + start)
        return fh.read(size)


def check_pixel_layout(ds: Dataset, path: Path, geometry: Geometry) -> None:
    """Check (7FE0,0010) Pixel Data against the transfer syntax and the geometry.

    Parameters
    ----------
    ds : Dataset
        Read with deferred values (the pixel data not loaded).
    path : Path
        The file (for the byte-order sample).
    geometry : Geometry
        From :func:`client.dicom.geometry.read_geometry`.

    Raises
    ------
    client.dicom.reasons.Skip
        ``no-pixels``, ``truncated`` or ``transfer-syntax-mismatch``.
    """
    elem = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if elem is None:
        raise Skip(SkipCode.NO_PIXELS)
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if isinstance(elem, RawDataElement):
        declared = elem.length
        undefined = declared == UNDEFINED_LENGTH
    else:
        value = elem.value
        declared = len(value) if isinstance(value, (bytes, bytearray)) else 0
        undefined = bool(elem.is_undefined_length)
    if syntax.is_compressed:
        if not undefined:
            raise _mismatch(
                "(7FE0,0010) Pixel Data is not encapsulated although (0002,0010) Transfer "
                "Syntax UID declares a compressed syntax; re-export the file from its source"
            )
        return  # encapsulated: sizes are not predictable; decode errors show up as skips
    if undefined:
        raise _mismatch(
            "(7FE0,0010) Pixel Data is encapsulated although (0002,0010) Transfer Syntax UID "
            "declares a native (uncompressed) syntax; re-export the file from its source"
        )
    expected = geometry.expected_bytes
    offset = -1
    if isinstance(elem, RawDataElement) and elem.value is not None:
        available = len(elem.value)
    elif isinstance(elem, RawDataElement) and not syntax.is_deflated:
        offset = int(elem.value_tell or 0)
        available = path.stat().st_size - offset
    else:
        available = declared
    if declared != expected and _starts_with_item(path, offset, elem.value):
        raise _mismatch(
            "(7FE0,0010) Pixel Data holds encapsulated (compressed) fragments although "
            "(0002,0010) Transfer Syntax UID declares a native syntax; re-export the file "
            "from its source"
        )
    if declared < expected or available < declared:
        raise Skip(SkipCode.TRUNCATED)
    if offset >= 0:
        sample = _sample(path, offset, geometry, declared)
    elif isinstance(elem.value, (bytes, bytearray)):
        sample = bytes(elem.value[:SAMPLE_BYTES])
    else:
        sample = b""
    if byte_order_swapped(sample, geometry, little_endian=bool(syntax.is_little_endian)):
        raise _mismatch(
            "the pixel bytes are in the opposite byte order to the one (0002,0010) Transfer "
            "Syntax UID declares; re-export the file from its source"
        )
