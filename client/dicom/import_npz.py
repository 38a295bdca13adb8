"""Read a MedMNIST-format ``.npz`` for ``vesalius import``.

The file holds ``train_images``, ``train_labels``, ``val_images``, ``val_labels``,
``test_images`` and ``test_labels`` (MedMNIST v2, Yang et al., Scientific Data 10, 41, 2023).
Every item becomes one patient with one study; the splits are concatenated in the order
train, val, test (the node draws its own patient-level splits). Accepted image arrays, per
split (uint8 or uint16):

* ``[N, H, W]`` or ``[N, H, W, 1]``: greyscale 2-D images;
* ``[N, H, W, 3]``: colour 2-D images, converted to greyscale
  (:func:`client.dicom.import_source.to_greyscale`);
* ``[N, D, H, W]`` or ``[N, D, H, W, 1]``: 3-D volumes, each written as ``D`` slices.

Labels are ``[N]`` or ``[N, 1]`` non-negative integers; multi-label arrays (``[N, K]``,
ChestMNIST) are refused.

Images are streamed from the archive one item at a time (the ``.npy`` header gives the
shape), so a large volume collection is never held in memory whole.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from numpy.typing import NDArray

from client.dicom.import_source import ImageKind, ImportPlan, PatientImages, Pixels, to_greyscale
from common.errors import DataError

__all__ = ["NPZ_SPLITS", "read_npz"]

#: The splits read, in this order.
NPZ_SPLITS: tuple[str, ...] = ("train", "val", "test")
_PIXEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
#: What a damaged archive member raises while it is read.
_ARCHIVE_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class _ArrayHeader:
    """The ``.npy`` header of one member: shape and dtype (C order)."""

    shape: tuple[int, ...]
    dtype: np.dtype[np.generic]


def _error(message: str) -> DataError:
    return DataError(message, safe_reason="the .npz file could not be imported")


def _open_archive(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise _error(
            "the .npz file cannot be read as a NumPy archive (corrupt or another format); "
            "give a MedMNIST-format .npz file"
        ) from exc


def _read_header(handle: IO[bytes]) -> _ArrayHeader:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        raise ValueError("unsupported .npy version")
    if fortran or dtype.hasobject:
        raise ValueError("Fortran-ordered or object array")
    return _ArrayHeader(shape=tuple(int(s) for s in shape), dtype=dtype)


def _member_header(archive: zipfile.ZipFile, key: str) -> _ArrayHeader:
    try:
        with archive.open(f"{key}.npy") as handle:
            return _read_header(handle)
    except _ARCHIVE_ERRORS as exc:
        raise _error(f"the array {key} of the .npz file is damaged; download or save the file "
                     "again") from exc
    except ValueError as exc:
        raise _error(
            f"the array {key} of the .npz file is not a plain NumPy array (Fortran-ordered, "
            "Python objects or an unknown format); save it again with numpy.savez"
        ) from exc


def _check_keys(archive: zipfile.ZipFile) -> None:
    names = set(archive.namelist())
    missing = [
        f"{split}_{part}"
        for split in NPZ_SPLITS
        for part in ("images", "labels")
        if f"{split}_{part}.npy" not in names
    ]
    if missing:
        raise _error(
            f"the .npz file lacks the array(s) {', '.join(missing)}; a MedMNIST-format file "
            "holds train_images, train_labels, val_images, val_labels, test_images and "
            "test_labels"
        )


def _item_kind(key: str, header: _ArrayHeader) -> tuple[ImageKind, bool]:
    """(kind, colour) of one images array, from its shape; refuses other shapes and dtypes."""
    if header.dtype.newbyteorder("=") not in _PIXEL_DTYPES:
        raise _error(
            f"the array {key} of the .npz file is not uint8 or uint16; MedMNIST stores uint8 "
            "images, convert the array to uint8 (0-255) or uint16"
        )
    item = header.shape[1:]
    if item and item[-1] == 1:
        item = item[:-1]
    if len(item) == 2:
        return ImageKind.IMAGE_2D, False
    if len(item) == 3 and item[-1] == 3:
        return ImageKind.IMAGE_2D, True
    if len(item) == 3:
        return ImageKind.VOLUME_3D, False
    raise _error(
        f"the array {key} of the .npz file has {len(header.shape)} axes of an unsupported "
        "shape; use [N, H, W], [N, H, W, 3] or [N, D, H, W]"
    )


def _labels(archive: zipfile.ZipFile, key: str, count: int) -> NDArray[np.int64]:
    try:
        with archive.open(f"{key}.npy") as handle:
            raw = np.lib.format.read_array(handle, allow_pickle=False)
    except (*_ARCHIVE_ERRORS, ValueError) as exc:
        raise _error(f"the array {key} of the .npz file cannot be read; save it again with "
                     "numpy.savez") from exc
    values = np.asarray(raw)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise _error(
            f"the array {key} of the .npz file holds several labels per image (multi-label); "
            "vesalius import needs one integer label per image"
        )
    if values.shape[0] != count:
        raise _error(f"the arrays {key} and its images array of the .npz file have different "
                     "lengths; give one label per image")
    integral = values.dtype.kind == "f" and bool(
        np.all(np.isfinite(values)) and np.all(values == np.rint(values))
    )
    if values.dtype.kind not in "biu" and not integral:
        raise _error(f"the array {key} of the .npz file holds labels that are not integers; "
                     "give integer class labels (0 or 1 for the binary task)")
    labels = values.astype(np.int64)
    if labels.size and int(labels.min()) < 0:
        raise _error(f"the array {key} of the .npz file holds negative labels; give integer "
                     "class labels >= 0")
    return labels


def _iter_items(archive: zipfile.ZipFile, key: str, header: _ArrayHeader,
                limit: int) -> Iterator[NDArray[np.generic]]:
    """Yield the first ``limit`` items of an images array, one at a time."""
    item_shape = header.shape[1:]
    item_bytes = int(np.prod(item_shape, dtype=np.int64)) * header.dtype.itemsize
    with archive.open(f"{key}.npy") as handle:
        _read_header(handle)
        for _ in range(limit):
            try:
                chunk = handle.read(item_bytes)
            except _ARCHIVE_ERRORS as exc:
                raise _error(f"the array {key} of the .npz file is damaged; download or save "
                             "the file again") from exc
            if len(chunk) != item_bytes:
                raise _error(f"the array {key} of the .npz file ends early (truncated file); "
                             "download or save it again")
            item = np.frombuffer(chunk, dtype=header.dtype).reshape(item_shape)
            yield item.astype(header.dtype.newbyteorder("="), copy=False)


def _as_images(
    item: NDArray[np.generic], kind: ImageKind, colour: bool
) -> tuple[tuple[Pixels, ...], int]:
    if item.ndim > (3 if colour or kind is ImageKind.VOLUME_3D else 2) and item.shape[-1] == 1:
        item = item[..., 0]
    if colour:
        grey, converted = to_greyscale(item)
        return (grey,), int(converted)
    if kind is ImageKind.VOLUME_3D:
        return tuple(np.ascontiguousarray(s) for s in item), 0  # type: ignore[misc]
    return (np.ascontiguousarray(item),), 0  # type: ignore[arg-type]


def read_npz(path: str | Path, *, max_items: int | None = None) -> ImportPlan:
    """Plan the import of a MedMNIST-format ``.npz`` file (see the module docstring).

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file.
    max_items : int, optional
        Keep only the first ``max_items`` items (images, or volumes for 3-D data) in the
        order train, val, test.

    Returns
    -------
    ImportPlan
        One patient per item, in that order; ``decode()`` streams the items from the file.

    Raises
    ------
    DataError
        For an unreadable file, a missing array, an unsupported shape or dtype, splits of
        different kinds, or labels that are not one non-negative integer per item.
    """
    source = Path(path)
    with _open_archive(source) as archive:
        _check_keys(archive)
        headers = {s: _member_header(archive, f"{s}_images") for s in NPZ_SPLITS}
        kinds = {s: _item_kind(f"{s}_images", h) for s, h in headers.items()}
        if len(set(kinds.values())) != 1:
            raise _error("the images arrays of the .npz file mix 2-D, colour and 3-D items; "
                         "give every split the same kind of image")
        labels = [_labels(archive, f"{s}_labels", headers[s].shape[0]) for s in NPZ_SPLITS]
    kind, colour = kinds[NPZ_SPLITS[0]]
    remaining = sum(h.shape[0] for h in headers.values()) if max_items is None else max_items
    take: dict[str, int] = {}
    for split in NPZ_SPLITS:
        take[split] = min(headers[split].shape[0], max(remaining, 0))
        remaining -= take[split]
    kept = np.concatenate([lab[: take[s]] for s, lab in zip(NPZ_SPLITS, labels, strict=True)])
    counts = [
        1 if kind is ImageKind.IMAGE_2D else headers[s].shape[1]
        for s in NPZ_SPLITS
        for _ in range(take[s])
    ]

    def decode() -> Iterator[PatientImages]:
        patient = 0
        with _open_archive(source) as archive:
            for split in NPZ_SPLITS:
                key = f"{split}_images"
                for item in _iter_items(archive, key, headers[split], take[split]):
                    images, converted = _as_images(item, kind, colour)
                    yield PatientImages(patient=patient, images=images,
                                        converted_from_colour=converted)
                    patient += 1

    return ImportPlan(
        source_kind="npz",
        kind=kind,
        labels=tuple(int(v) for v in kept),
        images_per_patient=tuple(counts),
        decode=decode,
    )
