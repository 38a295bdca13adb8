"""Build de-identified-looking DICOM files with planted identifiers, and mutate their bytes.

Every identifying value the harness writes is a distinctive random token (``PID-7f3a91c2e4``,
``1.2.826.0.1.3680043.8.498.<20 digits>``), so searching any output for it is meaningful.
Byte-level edits locate top-level elements through pydicom's raw elements (their value
offset and length), so they work for implicit, explicit, little- and big-endian files.
"""

from __future__ import annotations

import io
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

#: pydicom's UID root; planted UIDs append 20 random digits to it.
UID_ROOT = "1.2.826.0.1.3680043.8.498."
#: Explicit VRs whose element header is 12 bytes (2 reserved bytes + a 4-byte length).
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})

PATIENT_ID = Tag(0x0010, 0x0020)
PATIENT_NAME = Tag(0x0010, 0x0010)
PIXEL_DATA = Tag(0x7FE0, 0x0010)

#: Native single-frame greyscale files bundled with pydicom (PHI-free examples).
NATIVE_BASES = ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "rtdose_1frame.dcm")
#: Compressed single-frame greyscale files bundled with pydicom.
COMPRESSED_BASES = ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm")

#: Top-level elements kept from a base file (pixel description and harmless technique).
_KEEP = frozenset(
    {
        "SOPClassUID", "Modality", "InstanceNumber", "Rows", "Columns", "SamplesPerPixel",
        "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
        "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "RescaleType", "PixelData",
        "PixelSpacing", "SliceThickness", "ImagePositionPatient", "ImageOrientationPatient",
        "WindowCenter", "WindowWidth", "StudyDate", "SeriesDate", "ImageType",
        "NumberOfFrames", "FrameIncrementPointer", "DoseUnits", "DoseType", "DoseGridScaling",
        "DoseSummationType", "GridFrameOffsetVector",
    }
)


def token(rng: random.Random, prefix: str) -> str:
    """A distinctive token such as ``PID-7f3a91c2e4`` (10 random hex digits)."""
    return f"{prefix}-{rng.getrandbits(40):010x}"


def planted_uid(rng: random.Random) -> str:
    """A valid UID under pydicom's root with 20 random digits (first digit non-zero)."""
    return UID_ROOT + str(rng.randrange(10**19, 10**20))


@dataclass(frozen=True)
class Planted:
    """The identifying values written into one file (and its labels row)."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    frame_uid: str
    accession: str
    study_id: str
    label: int
    extra: tuple[str, ...] = field(default=())

    @classmethod
    def draw(cls, rng: random.Random, *, label: int = 0) -> Planted:
        """Draw a fresh set of distinctive values."""
        return cls(
            patient_id=token(rng, "PID"), study_uid=planted_uid(rng),
            series_uid=planted_uid(rng), sop_uid=planted_uid(rng), frame_uid=planted_uid(rng),
            accession=token(rng, "ACC"), study_id=token(rng, "STU"), label=label,
        )

    def values(self) -> tuple[str, ...]:
        """Every planted value (what must never be printed)."""
        return (self.patient_id, self.study_uid, self.series_uid, self.sop_uid,
                self.frame_uid, self.accession, self.study_id, *self.extra)


def needles(value: str) -> tuple[str, ...]:
    """Strings to search output for: the value and its random core (catches truncation).

    The core is the part after the last ``-`` or after :data:`UID_ROOT`; only cores of 8+
    characters are used, so that a hit is never a coincidence.
    """
    found = [value]
    core = value[len(UID_ROOT):] if value.startswith(UID_ROOT) else value.rsplit("-", 1)[-1]
    if len(core) >= 8 and core != value:
        found.append(core[:10])
    return tuple(found)


def build_base(name: str, planted: Planted) -> bytes:
    """Read a bundled pydicom file and return it de-identified-looking, with ``planted`` ids.

    Keeps only the pixel description (:data:`_KEEP`), sets (0012,0062) Patient Identity
    Removed = YES, (0010,0010) Patient's Name = (0010,0020) Patient ID, plants the UIDs,
    (0008,0050) Accession Number and (0020,0010) Study ID, keeps the original transfer syntax.
    """
    src = get_testdata_file(name)
    assert src is not None, f"pydicom's bundled {name} is missing"
    ds = pydicom.dcmread(src)
    for elem in list(ds):
        if elem.keyword not in _KEEP:
            del ds[elem.tag]
    ds.PatientName = planted.patient_id
    ds.PatientID = planted.patient_id
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "hostile harness"
    ds.StudyInstanceUID = planted.study_uid
    ds.SeriesInstanceUID = planted.series_uid
    ds.SOPInstanceUID = planted.sop_uid
    ds.FrameOfReferenceUID = planted.frame_uid
    ds.AccessionNumber = planted.accession
    ds.StudyID = planted.study_id
    if "InstanceNumber" not in ds:
        ds.InstanceNumber = 1
    if "RescaleSlope" not in ds:
        ds.RescaleSlope = 1
        ds.RescaleIntercept = 0
    ds.file_meta.MediaStorageSOPInstanceUID = planted.sop_uid
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- element spans ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """Where one top-level data element lies in the file bytes."""

    tag: int
    vr: str
    start: int
    value_start: int
    length: int
    implicit: bool
    little: bool

    @property
    def header_len(self) -> int:
        """Bytes before the value: 8, or 12 for an explicit long-VR element."""
        return self.value_start - self.start

    @property
    def length_field(self) -> tuple[int, int]:
        """(offset, size) of the length field."""
        size = 4 if self.implicit or self.vr in LONG_VRS else 2
        return self.value_start - size, size

    @property
    def end(self) -> int:
        """Offset just past the value (defined lengths only)."""
        return self.value_start + self.length


def spans(data: bytes) -> dict[int, Span]:
    """Top-level elements of the dataset (not the file meta) with defined lengths."""
    ds = pydicom.dcmread(io.BytesIO(data), defer_size=64)
    out: dict[int, Span] = {}
    for tag in ds.keys():
        raw = ds.get_item(tag, keep_deferred=True)
        if not isinstance(raw, RawDataElement) or raw.value_tell is None:
            continue
        if raw.length == 0xFFFFFFFF:
            continue
        implicit = bool(raw.is_implicit_VR)
        vr = str(raw.VR or "")
        head = 8 if implicit or vr not in LONG_VRS else 12
        out[int(tag)] = Span(tag=int(tag), vr=vr, start=int(raw.value_tell) - head,
                             value_start=int(raw.value_tell), length=int(raw.length),
                             implicit=implicit, little=bool(raw.is_little_endian))
    return out


def set_length(data: bytes, span: Span, length: int) -> bytes:
    """Overwrite the length field of ``span`` (modulo the field size)."""
    offset, size = span.length_field
    fmt = ("<" if span.little else ">") + ("I" if size == 4 else "H")
    packed = struct.pack(fmt, length % (1 << (8 * size)))
    return data[:offset] + packed + data[offset + size:]


def set_value(data: bytes, span: Span, value: bytes, *, pad: bytes = b" ") -> bytes:
    """Replace the value of ``span`` (padded to even length) and fix its length field."""
    if len(value) % 2:
        value += pad
    head = set_length(data[: span.value_start], span, len(value))
    return head + value + data[span.end:]


def remove(data: bytes, span: Span) -> bytes:
    """Cut ``span`` (header and value) out of the file."""
    return data[: span.start] + data[span.end:]


def encode_element(span: Span, tag: int, vr: str, value: bytes) -> bytes:
    """Encode one element in the same encoding as ``span``."""
    if len(value) % 2:
        value += b" "
    end = "<" if span.little else ">"
    head = struct.pack(end + "HH", tag >> 16, tag & 0xFFFF)
    if span.implicit:
        return head + struct.pack(end + "I", len(value)) + value
    if vr in LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack(end + "I", len(value)) + value
    return head + vr.encode() + struct.pack(end + "H", len(value)) + value


# --- file meta (always Explicit VR Little Endian, PS3.10 7.1) -----------------------------------


def split_meta(data: bytes) -> tuple[list[tuple[int, str, bytes]], bytes]:
    """Return the file-meta elements ``(tag, vr, value)`` and the dataset bytes after them."""
    pos, elems = 132, []
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4: pos + 6].decode("latin-1")
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        elems.append(((group << 16) | elem, vr, data[start: start + length]))
        pos = start + length
    return elems, data[pos:]


def with_transfer_syntax(data: bytes, uid: str | None) -> bytes:
    """Relabel (0002,0010) Transfer Syntax UID (``None`` removes it); the dataset is unchanged."""
    elems, body = split_meta(data)
    out = b""
    for tag, vr, value in elems:
        if tag == 0x00020000:
            continue
        if tag == 0x00020010:
            if uid is None:
                continue
            value = uid.encode("ascii", "replace")
            value += b"\0" * (len(value) % 2)
        long = vr in LONG_VRS
        out += struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
        out += (b"\0\0" + struct.pack("<I", len(value))) if long else struct.pack("<H", len(value))
        out += value
    group_length = struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(out))
    return data[:132] + group_length + out + body


def write_files(folder: Path, files: list[bytes]) -> list[str]:
    """Write ``files`` as ``f000.dcm``, ``f001.dcm``, ...; return their relative paths."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, data in enumerate(files):
        name = f"f{i:03d}.dcm"
        (folder / name).write_bytes(data)
        names.append(name)
    return names


def labels_csv(rows: list[Planted]) -> str:
    """A valid labels CSV for ``rows``."""
    lines = ["patient_id,study_uid,label"]
    lines += [f"{p.patient_id},{p.study_uid},{p.label}" for p in rows]
    return "\n".join(lines) + "\n"
