"""Read a folder of PNG/JPEG images and its labels CSV for ``vesalius import``.

The CSV (UTF-8, comma-separated, a header line) has one row per image. Columns, in any
order (names are case-insensitive; other columns are ignored):

* ``image`` (or ``file``, ``filename``, ``path``): the image's path relative to the image
  folder (``.png``, ``.jpg`` or ``.jpeg``); required;
* ``label``: an integer >= 0 (0 or 1 for today's binary task); required;
* ``patient`` (or ``patient_id``): the source's patient identifier; optional. Rows with the
  same value are one patient, whose images form one study with one label. Without the
  column every image is its own patient.

Every row is checked before any image is decoded; then each image is decoded with Pillow:
8-bit greyscale and 16-bit greyscale PNGs are kept as they are, colour (and palette) images
are converted to greyscale (:func:`client.dicom.import_source.to_greyscale`), an alpha
channel is dropped, and the EXIF orientation of a JPEG is applied. No metadata of the image
files (EXIF dates, GPS, text chunks) is read into the output.

Privacy: the source patient identifiers and file names are used only to group and find the
images; they are never written. Error sentences name CSV line numbers and column names,
never a cell's value or a path.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from client.dicom.import_source import ImageKind, ImportPlan, PatientImages, Pixels, to_greyscale
from common.errors import DataError

__all__ = [
    "IMAGE_COLUMNS",
    "IMAGE_SUFFIXES",
    "LABEL_COLUMN",
    "PATIENT_COLUMNS",
    "decode_image",
    "read_image_folder",
]

#: Accepted names of the image column, in order of preference.
IMAGE_COLUMNS: tuple[str, ...] = ("image", "file", "filename", "path")
#: Accepted names of the optional patient column.
PATIENT_COLUMNS: tuple[str, ...] = ("patient", "patient_id")
LABEL_COLUMN = "label"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_SAFE = "the image folder could not be imported"


@dataclass(frozen=True)
class _Row:
    """One valid CSV row: its line, the image file, the patient key and the label."""

    line: int
    path: Path
    patient: str
    label: int


def _error(message: str) -> DataError:
    return DataError(message, safe_reason=_SAFE)


def _line_error(line: int, text: str) -> DataError:
    return _error(f"line {line} of the labels CSV: {text}")


def _pick(header: list[str], names: tuple[str, ...]) -> str | None:
    lowered = {h.strip().lower(): h for h in header}
    return next((lowered[n] for n in names if n in lowered), None)


def _read_rows(csv_path: Path) -> tuple[list[dict[str, str]], list[int], str, str, str | None]:
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise _error("the labels CSV does not exist; put labels.csv in the image folder or "
                     "name it with --labels") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise _error("the labels CSV cannot be read as UTF-8 text; save it as a UTF-8 CSV "
                     "file") from exc
    reader = csv.DictReader(text.splitlines())
    header = [h or "" for h in (reader.fieldnames or [])]
    image_col = _pick(header, IMAGE_COLUMNS)
    label_col = _pick(header, (LABEL_COLUMN,))
    missing = [name for name, col in (("image", image_col), ("label", label_col)) if col is None]
    if missing or image_col is None or label_col is None:
        raise _error(f"the labels CSV lacks the column(s) {', '.join(missing)}; its first line "
                     "must name the columns image and label (and optionally patient)")
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    try:
        for row in reader:
            rows.append({k: (v if isinstance(v, str) else "") for k, v in row.items() if k})
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise _line_error(reader.line_num, "the line cannot be parsed as CSV (an unclosed quote?); "
                          "fix it") from exc
    return rows, lines, image_col, label_col, _pick(header, PATIENT_COLUMNS)


def _image_path(folder: Path, cell: str, line: int) -> Path:
    if not cell:
        raise _line_error(line, "the image cell is empty; give the image's path relative to the "
                          "image folder, or delete the row")
    relative = Path(cell.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts:
        raise _line_error(line, "the image path is absolute or leaves the image folder; give a "
                          "path relative to the image folder")
    if relative.suffix.lower() not in IMAGE_SUFFIXES:
        raise _line_error(line, "the image is not a .png, .jpg or .jpeg file; convert it or "
                          "remove the row")
    path = folder / relative
    if not path.is_file():
        raise _line_error(line, "no such image file in the image folder; check the path "
                          "(relative to the image folder, case-sensitive) or remove the row")
    return path


def _label(cell: str, line: int) -> int:
    try:
        label = int(cell.strip())
    except ValueError as exc:
        raise _line_error(line, "the label is not an integer; write 0 or 1 (or another "
                          "integer class >= 0)") from exc
    if label < 0:
        raise _line_error(line, "the label is negative; write 0 or 1 (or another integer "
                          "class >= 0)")
    return label


def _parse(folder: Path, csv_path: Path) -> list[_Row]:
    raw_rows, lines, image_col, label_col, patient_col = _read_rows(csv_path)
    rows: list[_Row] = []
    first_line: dict[Path, int] = {}
    for raw, line in zip(raw_rows, lines, strict=True):
        if not any(v.strip() for v in raw.values()):
            continue
        path = _image_path(folder, raw.get(image_col, "").strip(), line)
        key = path.resolve()
        if key in first_line:
            raise _line_error(line, f"the same image is listed on line {first_line[key]}; list "
                              "each image once")
        first_line[key] = line
        label = _label(raw.get(label_col, ""), line)
        if patient_col is None:
            patient = f"row-{line}"
        else:
            patient = raw.get(patient_col, "").strip()
            if not patient:
                raise _line_error(line, "the patient cell is empty; fill it in, or drop the "
                                  "patient column to make each image its own patient")
        rows.append(_Row(line=line, path=path, patient=patient, label=label))
    if not rows:
        raise _error("the labels CSV lists no image; add one row per image (image, label)")
    return rows


def _group(rows: list[_Row]) -> tuple[list[str], dict[str, list[_Row]]]:
    """Patients in order of first appearance, each with its rows; one label per patient."""
    order: list[str] = []
    groups: dict[str, list[_Row]] = {}
    for row in rows:
        group = groups.setdefault(row.patient, [])
        if not group:
            order.append(row.patient)
        elif group[0].label != row.label:
            raise _line_error(row.line, f"this row's patient is listed on line {group[0].line} "
                              "with a different label; a patient's images form one study with "
                              "one label")
        group.append(row)
    return order, groups


def _to_array(image: object) -> tuple[Pixels, bool]:
    """Pillow image -> (greyscale uint8/uint16 array, converted from colour)."""
    from PIL import Image

    assert isinstance(image, Image.Image)
    mode = image.mode
    if mode in ("L", "1"):
        return np.asarray(image.convert("L"), dtype=np.uint8), False
    if mode == "LA":
        return np.asarray(image.getchannel("L"), dtype=np.uint8), False
    if mode.startswith("I;16"):
        return np.asarray(image, dtype=np.uint16).copy(), False
    if mode == "I":
        values: NDArray[np.int64] = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > np.iinfo(np.uint16).max):
            raise ValueError("32-bit values out of the 16-bit range")
        return values.astype(np.uint16), False
    if mode == "F":
        raise ValueError("floating-point image")
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return to_greyscale(rgb)


def decode_image(path: Path, line: int) -> tuple[Pixels, bool]:
    """Decode one PNG/JPEG file to a greyscale array (see the module docstring).

    Parameters
    ----------
    path : Path
        The image file.
    line : int
        Its labels-CSV line, for the error sentence.

    Returns
    -------
    tuple of (ndarray, bool)
        ``(rows, columns)`` uint8 or uint16 pixels, and whether colour was converted.

    Raises
    ------
    DataError
        When Pillow cannot decode the file, it is too large (Pillow's decompression-bomb
        limit) or its pixel format has no greyscale integer equivalent.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.format not in ("PNG", "JPEG", "MPO"):
                raise _line_error(line, "the file is not a PNG or JPEG image although its name "
                                  "says so; convert it or remove the row")
            image.load()
            oriented = ImageOps.exif_transpose(image) if image.format != "PNG" else image
            return _to_array(oriented)
    except Image.DecompressionBombError as exc:
        raise _line_error(line, "the image has more pixels than the decoder's safety limit; "
                          "downscale it or remove the row") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _line_error(line, "the image cannot be decoded (corrupt, truncated or an "
                          "unsupported pixel format); replace it or remove the row") from exc


def read_image_folder(folder: str | Path, labels_csv: str | Path | None = None, *,
                      max_images: int | None = None) -> ImportPlan:
    """Plan the import of a folder of PNG/JPEG images (see the module docstring).

    Parameters
    ----------
    folder : str or Path
        The image folder; image paths in the CSV are relative to it.
    labels_csv : str or Path, optional
        The labels CSV; default ``folder/labels.csv``.
    max_images : int, optional
        Keep only the first ``max_images`` rows (images) of the CSV, in file order; every
        row is still checked.

    Returns
    -------
    ImportPlan
        One patient per distinct patient value (per image without the column), in order of
        first appearance; ``decode()`` decodes one patient's images at a time.

    Raises
    ------
    DataError
        For the first problem of the CSV (with its line number), or, while decoding, an
        image that cannot be decoded.
    """
    root = Path(folder)
    rows = _parse(root, Path(labels_csv) if labels_csv is not None else root / "labels.csv")
    if max_images is not None:
        rows = rows[:max_images]
    order, groups = _group(rows)

    def decode() -> Iterator[PatientImages]:
        for index, key in enumerate(order):
            decoded = [decode_image(row.path, row.line) for row in groups[key]]
            yield PatientImages(
                patient=index,
                images=tuple(pixels for pixels, _ in decoded),
                converted_from_colour=sum(int(colour) for _, colour in decoded),
            )

    return ImportPlan(
        source_kind="images",
        kind=ImageKind.IMAGE_2D,
        labels=tuple(groups[key][0].label for key in order),
        images_per_patient=tuple(len(groups[key]) for key in order),
        decode=decode,
    )
