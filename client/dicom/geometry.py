"""Image geometry from the header: plausible values, valid numbers, expected pixel bytes.

The scanner and the pixel reader read the same elements of the Image Pixel module
(PS3.3 C.7.6.3) and of the Modality LUT (PS3.3 C.11.1); both go through this module, so a
value that would make decoding fail is refused at scan time with a sentence naming the tag.

Integer String (IS) and Decimal String (DS) values are text: pydicom keeps an invalid one
(e.g. ``'1A'`` in (0028,0008) Number of Frames) as a string with a warning, and the decoder
fails later. :func:`numeric_value_problem` finds such values without quoting them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydicom.dataset import Dataset

from client.dicom.reasons import Skip, SkipCode

_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
_BITS_ALLOCATED = (1, 8, 16, 32)
#: Three-sample colour models read with ``accept_color`` (PS3.3 C.7.6.3.1.2).
COLOR_THREE_SAMPLE = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
PALETTE_COLOR = "PALETTE COLOR"
#: Irreversible / reversible colour transforms, defined for JPEG 2000 only (PS3.5 8.2.4).
_J2K_ONLY = ("YBR_RCT", "YBR_ICT")
_J2K_SYNTAXES = (
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
)
_PALETTE_DESCRIPTORS = (
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
)

#: Text-encoded numbers the node reads: (keyword, "(gggg,eeee) Name", is_integer).
NUMERIC_ELEMENTS: tuple[tuple[str, str, bool], ...] = (
    ("NumberOfFrames", "(0028,0008) Number of Frames", True),
    ("InstanceNumber", "(0020,0013) Instance Number", True),
    ("RescaleSlope", "(0028,1053) Rescale Slope", False),
    ("RescaleIntercept", "(0028,1052) Rescale Intercept", False),
)


@dataclass(frozen=True)
class Geometry:
    """The Image Pixel module values the node relies on.

    Attributes
    ----------
    rows, columns : int
        (0028,0010) Rows and (0028,0011) Columns.
    frames : int
        (0028,0008) Number of Frames (1 when absent).
    samples : int
        (0028,0002) Samples per Pixel.
    bits_allocated, bits_stored : int
        (0028,0100) Bits Allocated and (0028,0101) Bits Stored (= allocated when absent).
    signed : bool
        (0028,0103) Pixel Representation is 1.
    photometric : str
        (0028,0004) Photometric Interpretation, upper case ("" when not read).
    """

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str = ""

    @property
    def is_color(self) -> bool:
        """``True`` for a colour image (three samples or PALETTE COLOR)."""
        return self.samples != 1 or self.photometric == PALETTE_COLOR

    @property
    def expected_bytes(self) -> int:
        """Native pixel data length: Rows x Columns x frames x samples x Bits Allocated / 8.

        1-bit data is packed, so the bit count is rounded up to whole bytes. Native
        YBR_FULL_422 keeps two samples per pixel (Y Y Cb Cr for two pixels, PS3.3
        C.7.6.3.1.2), two thirds of the three-sample size.
        """
        bits = self.rows * self.columns * self.frames * self.samples * self.bits_allocated
        if self.photometric == "YBR_FULL_422" and self.samples == 3:
            bits = bits * 2 // 3
        return (bits + 7) // 8


def _text_value(ds: Dataset, keyword: str) -> object:
    value = ds.get(keyword, None)
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        items = list(value)  # type: ignore[call-overload]
        return items[0] if len(items) == 1 else items
    return value


def numeric_value_problem(ds: Dataset) -> str:
    """Name the first IS/DS element the node reads whose value is not a valid number.

    Checks :data:`NUMERIC_ELEMENTS`: present and non-empty values must be a single finite
    number, an integer for IS; (0028,0008) Number of Frames must also be at least 1.

    Returns
    -------
    str
        A sentence naming the tag (never its value), or ``""`` when all are valid.
    """
    for keyword, name, integer in NUMERIC_ELEMENTS:
        value = _text_value(ds, keyword)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        kind = "an integer string (IS)" if integer else "a decimal string (DS)"
        if isinstance(value, list):
            return f"{name} holds several values where one is expected; fix or remove it"
        try:
            number = float(int(str(value).strip())) if integer else float(str(value).strip())
        except (TypeError, ValueError):
            try:
                number = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                return f"{name} holds a value that is not {kind}; fix or remove it"
            if integer and not number.is_integer():
                return f"{name} holds a value that is not {kind}; fix or remove it"
        if not math.isfinite(number):
            return f"{name} holds a value that is not a finite number; fix or remove it"
        if keyword == "NumberOfFrames" and number < 1:
            return f"{name} is less than 1; fix or remove it"
    return ""


def _us(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _color_problem(ds: Dataset, samples: int, photometric: str, bits: int) -> str:
    """Why a colour image cannot be read (naming tags, never values), or ``""``."""
    if bits not in (8, 16):
        return "a colour image whose (0028,0100) Bits Allocated is not 8 or 16"
    if photometric == PALETTE_COLOR:
        if samples != 1:
            return "PALETTE COLOR with (0028,0002) Samples per Pixel other than 1"
        if any(keyword not in ds for keyword in _PALETTE_DESCRIPTORS):
            return "PALETTE COLOR without the (0028,1101)-(0028,1103) palette descriptors"
        return ""
    if samples != 3 or photometric not in COLOR_THREE_SAMPLE:
        return (
            "(0028,0004) Photometric Interpretation and (0028,0002) Samples per Pixel "
            "are not a supported colour model (RGB, YBR_FULL, YBR_FULL_422, YBR_RCT, "
            "YBR_ICT or PALETTE COLOR)"
        )
    planar = _us(ds, "PlanarConfiguration")
    if planar not in (None, 0, 1):
        return "(0028,0006) Planar Configuration is not 0 or 1"
    syntax = str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", "") or "")
    if photometric in _J2K_ONLY and syntax not in _J2K_SYNTAXES:
        return (
            "(0028,0004) YBR_RCT/YBR_ICT is defined only for JPEG 2000 (0002,0010) "
            "Transfer Syntax UIDs"
        )
    return ""


def read_geometry(ds: Dataset, *, accept_color: bool = False) -> Geometry:
    """Check the image geometry and photometry; return the values.

    Parameters
    ----------
    ds : Dataset
        The header.
    accept_color : bool, keyword-only
        Also accept colour images: three samples per pixel with (0028,0004) RGB, YBR_FULL,
        YBR_FULL_422, YBR_RCT or YBR_ICT (the last two under a JPEG 2000 syntax only), or
        PALETTE COLOR with its (0028,1101)-(0028,1103) descriptors; 8 or 16 bits
        allocated. Off by default: training's 2-D path reads greyscale only.

    Raises
    ------
    client.dicom.reasons.Skip
        ``invalid-value`` for an invalid IS/DS value (see :func:`numeric_value_problem`);
        ``unsupported-image`` for missing or implausible (0028,0010) Rows, (0028,0011)
        Columns, (0028,0100) Bits Allocated, (0028,0101) Bits Stored, (0028,0102) High Bit
        (one less than Bits Stored, PS3.3 C.7.6.3.1.1), (0028,0103) Pixel
        Representation, or an image that is not single-sample greyscale
        ((0028,0002) Samples per Pixel 1, (0028,0004) MONOCHROME1/MONOCHROME2).
    """
    problem = numeric_value_problem(ds)
    if problem:
        raise Skip(SkipCode.INVALID_VALUE, problem)
    rows, cols = _us(ds, "Rows"), _us(ds, "Columns")
    bits = _us(ds, "BitsAllocated")
    if not rows or not cols or rows < 1 or cols < 1 or bits not in _BITS_ALLOCATED:
        raise Skip(SkipCode.UNSUPPORTED_IMAGE, "missing or invalid Rows/Columns/Bits Allocated")
    stored = _us(ds, "BitsStored") or bits
    representation = _us(ds, "PixelRepresentation") or 0
    if not 1 <= stored <= bits:
        raise Skip(
            SkipCode.UNSUPPORTED_IMAGE,
            "(0028,0101) Bits Stored is not between 1 and (0028,0100) Bits Allocated",
        )
    high_bit = _us(ds, "HighBit")
    if high_bit is not None and high_bit != stored - 1:
        # PS3.3 C.7.6.3.1.1: (0028,0102) High Bit shall be one less than Bits Stored.
        raise Skip(
            SkipCode.UNSUPPORTED_IMAGE,
            "(0028,0102) High Bit is not one less than (0028,0101) Bits Stored",
        )
    if representation not in (0, 1):
        raise Skip(SkipCode.UNSUPPORTED_IMAGE, "(0028,0103) Pixel Representation is not 0 or 1")
    samples = _us(ds, "SamplesPerPixel")
    samples = 1 if samples is None else samples
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    greyscale = samples == 1 and photometric in _GREYSCALE
    if not greyscale and not accept_color:
        raise Skip(
            SkipCode.UNSUPPORTED_IMAGE,
            "not greyscale: more than one sample per pixel or a colour photometric interpretation",
        )
    if not greyscale:
        problem = _color_problem(ds, samples, photometric, bits)
        if problem:
            raise Skip(SkipCode.UNSUPPORTED_IMAGE, problem)
    frames_value = _text_value(ds, "NumberOfFrames")
    frames = int(float(str(frames_value))) if frames_value not in (None, "") else 1
    return Geometry(
        rows=rows,
        columns=cols,
        frames=max(frames, 1),
        samples=samples,
        bits_allocated=bits,
        bits_stored=stored,
        signed=representation == 1,
        photometric=photometric,
    )
