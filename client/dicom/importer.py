"""``vesalius import``: public image collections as node data directories.

:func:`import_dataset` turns

* a MedMNIST-format ``.npz`` file (:mod:`client.dicom.import_npz`: 2-D greyscale or colour
  images, or 3-D volumes), or
* a folder of PNG/JPEG images with a labels CSV (:mod:`client.dicom.import_images`)

into a node data directory::

    OUT/dicom/IMP-000001/ST1/SE1/IM1.dcm   # one study per patient, one series
    OUT/labels.csv                         # patient_id,study_uid,label

or, with ``sites=N``, into ``N`` simulated hospitals ``OUT/site-1`` ... ``OUT/site-N`` (each a
node data directory), split by patient, IID or label-skewed with Dirichlet proportions
(:func:`client.data.medmnist.split_sites`), so that ``vesalius federation run --data-root
OUT`` trains on them. The files are Secondary Capture images (:mod:`client.dicom.import_dicom`)
that ``vesalius node check`` accepts in full.

3-D volumes: each volume is one patient whose study holds one series of slices with their
Image Plane attributes, which the node assembles into one volume per study for 3-D models
(``--samples volume-3d``; :mod:`client.data.task_data`), or reads slice by slice as 2-D images.

The output folder must be new or empty. ``force`` replaces an earlier import only: a folder
holding :data:`MARKER` (written by every import, listing what it wrote); nothing else is ever
deleted. Everything is written into a hidden staging folder inside ``OUT`` first and moved in
place at the end, so a failed import leaves ``OUT`` as it was.

Privacy: no source file name, source patient id or date is written; pseudonyms
(``IMP-000001``, in source order) and UIDs derived from a digest of each patient's pixels and
label. Importing the same collection again therefore writes the same UIDs and the node sees
the same dataset fingerprint: its ledger goes on counting the same privacy budget rather than
starting a fresh one (a different subset, e.g. another ``--max-images``, is a different
dataset, as with any change to a node's data). Identifiers burned into the pixels (text on an
image) are not detected.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.data.labels import LABELS_FILENAME
from client.data.medmnist import split_sites
from client.dicom.import_dicom import VolumeGeometry, new_study_ids, pseudonym, write_study
from client.dicom.import_images import read_image_folder
from client.dicom.import_npz import read_npz
from client.dicom.import_source import ImageKind, ImportPlan
from client.dicom.import_summary import ImportSummary, SiteImport, summary_notes
from client.dicom.synth import LABELS_HEADER
from common.errors import ConfigError, DataError

__all__ = [
    "MARKER",
    "SPLIT_MODES",
    "ImportOptions",
    "ImportSummary",
    "SiteImport",
    "import_dataset",
    "import_plan",
    "plan_source",
]

logger = logging.getLogger(__name__)

#: Hidden file (ignored by the node's scan) recording what an import wrote in its folder.
MARKER = ".vesalius-import.json"
SPLIT_MODES: tuple[str, ...] = ("iid", "dirichlet")
_ENTRY = re.compile(r"^(dicom|labels\.csv|site-[1-9][0-9]*)$")

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class ImportOptions:
    """How to write an import.

    Attributes
    ----------
    sites : int or None
        ``None``: ``OUT`` is one node data directory. ``N``: write ``OUT/site-1..N``.
    split : str
        ``"iid"`` or ``"dirichlet"`` (label skew); needs ``sites``.
    alpha : float
        Dirichlet concentration (> 0); small values give strong label skew.
    seed : int
        Seed of the split of patients among sites.
    max_images : int or None
        Import only the first images of the source (volumes for 3-D data; CSV rows).
    pixel_spacing_mm : float
        (0028,0030) Pixel Spacing written (nominal; the sources do not record it).
    slice_thickness_mm : float or None
        (0018,0050) Slice Thickness of volume slices; default ``pixel_spacing_mm``.
    force : bool
        Replace an earlier import in a non-empty ``OUT`` (see the module docstring).
    """

    sites: int | None = None
    split: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    max_images: int | None = None
    pixel_spacing_mm: float = 1.0
    slice_thickness_mm: float | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.sites is not None and self.sites < 1:
            raise ConfigError("--sites must be at least 1")
        if self.split not in SPLIT_MODES:
            raise ConfigError("--split must be iid or dirichlet")
        if self.sites is None and self.split != "iid":
            raise ConfigError("--split dirichlet splits patients among hospitals; give --sites")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError("--alpha must be a positive number")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError("--max-images must be at least 1")
        for name, value in (("--pixel-spacing", self.pixel_spacing_mm),
                            ("--slice-thickness", self.slice_thickness_mm)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number of millimetres")


def plan_source(source: str | Path, *, labels_csv: str | Path | None = None,
                max_images: int | None = None) -> ImportPlan:
    """Read the source's labels and sizes: a ``.npz`` file or an image folder.

    Raises
    ------
    ConfigError
        The source is neither, or ``labels_csv`` is given with a ``.npz`` file.
    DataError
        From the reader (:func:`~client.dicom.import_npz.read_npz`,
        :func:`~client.dicom.import_images.read_image_folder`).
    """
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".npz":
        if labels_csv is not None:
            raise ConfigError("--labels is for an image folder; a .npz file holds its labels")
        return read_npz(path, max_items=max_images)
    if path.is_dir():
        return read_image_folder(path, labels_csv, max_images=max_images)
    raise ConfigError("the source is neither a .npz file nor a folder; give a MedMNIST-format "
                      ".npz file or a folder of PNG/JPEG images with its labels CSV")


def _previous_entries(out: Path) -> list[str]:
    """The entries an earlier import wrote in ``out`` (from its :data:`MARKER`)."""
    try:
        doc = json.loads((out / MARKER).read_text(encoding="utf-8"))
        entries = [str(e) for e in doc["entries"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError("the --out folder is not empty and holds no earlier vesalius import; "
                          "--force replaces only an earlier import, so give a new or empty "
                          "folder") from exc
    return [e for e in entries if _ENTRY.match(e)]


def _check_out(out: Path, force: bool) -> list[str]:
    """Refuse an unusable ``out``; return the earlier import's entries to replace."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--out names a file; give a new or empty folder")
    if not out.exists() or not any(out.iterdir()):
        return []
    if not force:
        raise ConfigError("the --out folder is not empty; give a new or empty folder, or pass "
                          "--force to replace an earlier import in it")
    return _previous_entries(out)


def _assign_sites(plan: ImportPlan, options: ImportOptions) -> list[int]:
    """Site index (0-based) of each patient."""
    if options.sites is None:
        return [0] * plan.patients
    if plan.patients < options.sites:
        raise ConfigError(f"--sites {options.sites} needs at least {options.sites} patients; "
                          "lower --sites or import more images")
    min_per_site = 2 if plan.patients >= 2 * options.sites else 1
    try:
        parts = split_sites(np.asarray(plan.labels, dtype=np.int64), options.sites,
                            mode="dirichlet" if options.split == "dirichlet" else "iid",
                            alpha=options.alpha, seed=options.seed, min_per_site=min_per_site)
    except ValueError as exc:
        raise ConfigError("no Dirichlet split gave every hospital patients; raise --alpha or "
                          "lower --sites") from exc
    site_of = [0] * plan.patients
    for site, members in enumerate(parts):
        for patient in members:
            site_of[int(patient)] = site
    return site_of


def _write_labels(folder: Path, rows: list[tuple[str, str, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LABELS_FILENAME).open("w", newline="", encoding="ascii") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(LABELS_HEADER)
        writer.writerows(sorted(rows))


def _replace(out: Path, stage: Path, old: list[str], new: list[str],
             summary: dict[str, Any]) -> None:
    """Swap the staged entries into ``out`` (removing the earlier import's) and mark it."""
    for entry in old:
        target = out / entry
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    for entry in new:
        os.replace(stage / entry, out / entry)
    marker = stage / MARKER
    marker.write_text(json.dumps({"tool": "vesalius import", "entries": new, **summary},
                                 indent=2) + "\n", encoding="utf-8")
    os.replace(marker, out / MARKER)


def _content_key(images: Sequence[np.ndarray], label: int) -> str:
    """A digest of one patient's pixels and label (what the derived UIDs depend on)."""
    digest = hashlib.sha256(str(label).encode())
    for image in images:
        digest.update(str(image.shape).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def _write_patients(
    plan: ImportPlan, folders: list[Path], site_of: list[int], options: ImportOptions,
    progress: ProgressCallback | None,
) -> tuple[list[list[tuple[str, str, int]]], list[int], int]:
    """Decode and write every patient; return the label rows and file count per site and the
    number of colour images converted."""
    volume = None
    if plan.kind is ImageKind.VOLUME_3D:
        volume = VolumeGeometry(options.slice_thickness_mm or options.pixel_spacing_mm)
    rows: list[list[tuple[str, str, int]]] = [[] for _ in folders]
    files = [0] * len(folders)
    converted = done = 0
    for item in plan.decode():
        site = site_of[item.patient]
        ids = new_study_ids(pseudonym(item.patient), _content_key(item.images,
                                                                   plan.labels[item.patient]))
        study_dir = folders[site] / "dicom" / ids.patient_id / "ST1"
        files[site] += write_study(study_dir, ids, item.images,
                                   pixel_spacing_mm=options.pixel_spacing_mm, volume=volume)
        rows[site].append((ids.patient_id, ids.study_uid, plan.labels[item.patient]))
        converted += item.converted_from_colour
        done += len(item.images)
        if progress is not None:
            progress(done, plan.total_images)
    return rows, files, converted


def import_plan(plan: ImportPlan, out: str | Path, options: ImportOptions, *,
                progress: ProgressCallback | None = None) -> ImportSummary:
    """Write a planned source into ``out`` (see the module docstring).

    Parameters
    ----------
    plan : ImportPlan
        From :func:`plan_source` (or a reader).
    out : str or Path
        The output folder: new, empty, or (with ``options.force``) an earlier import.
    options : ImportOptions
        Sites, split, spacing, ``force``.
    progress : callable, optional
        ``progress(done, total)`` in DICOM files, after each patient.

    Returns
    -------
    ImportSummary
        Files, patients and label counts per node data directory, and notes.

    Raises
    ------
    ConfigError
        An unusable ``out`` or sites option.
    DataError
        An image that cannot be decoded; ``out`` is then left as it was.
    """
    root = Path(out).expanduser().resolve()
    old = _check_out(root, options.force)
    site_of = _assign_sites(plan, options)
    n_sites = options.sites or 1
    names = [f"site-{k + 1}" for k in range(n_sites)] if options.sites else [None]
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".vesalius-import-", dir=root))
    except OSError as exc:
        raise ConfigError("the --out folder cannot be created; give a folder you may write "
                          "to, not under a file") from exc
    folders = [stage / name if name else stage for name in names]
    try:
        rows, files, converted = _write_patients(plan, folders, site_of, options, progress)
        for folder, site_rows in zip(folders, rows, strict=True):
            _write_labels(folder, site_rows)
        new = list(names) if options.sites else ["dicom", LABELS_FILENAME]
        _replace(root, stage, old, [str(n) for n in new],
                 {"source": plan.source_kind, "kind": plan.kind.value, "patients": plan.patients,
                  "files": sum(files)})
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            try:
                root.rmdir()
            except OSError:
                pass
        if isinstance(exc, OSError):
            raise ConfigError("the output could not be written (no permission, disk full or "
                              "a file in the way); free space or choose another --out") from exc
        raise
    shutil.rmtree(stage, ignore_errors=True)
    sites = tuple(
        SiteImport(site=name, folder=root / name if name else root, patients=len(site_rows),
                   files=count, label_counts=dict(sorted(Counter(r[2] for r in site_rows).items())))
        for name, site_rows, count in zip(names, rows, files, strict=True)
    )
    logger.info("imported %d patients, %d files into %d node folder(s)",
                plan.patients, sum(files), len(sites))
    return ImportSummary(source_kind=plan.source_kind, kind=plan.kind, out=root, sites=sites,
                         colour_converted=converted,
                         notes=summary_notes(plan, options.pixel_spacing_mm, converted))


def import_dataset(source: str | Path, out: str | Path, *, labels_csv: str | Path | None = None,
                   options: ImportOptions | None = None,
                   progress: ProgressCallback | None = None) -> ImportSummary:
    """Import a ``.npz`` file or an image folder into node data directories under ``out``.

    Parameters
    ----------
    source : str or Path
        A MedMNIST-format ``.npz`` file, or a folder of PNG/JPEG images.
    out : str or Path
        The output folder (see :func:`import_plan`).
    labels_csv : str or Path, optional
        The image folder's labels CSV; default ``source/labels.csv``.
    options : ImportOptions, optional
        Defaults: one node data directory, nominal 1 mm pixel spacing.
    progress : callable, optional
        ``progress(done, total)`` in DICOM files.

    Returns
    -------
    ImportSummary
        What was written.

    Raises
    ------
    ConfigError, DataError
        One sentence naming what to fix (a CSV line number, an option), never a value or a
        path.
    """
    opts = options or ImportOptions()
    plan = plan_source(source, labels_csv=labels_csv, max_images=opts.max_images)
    if plan.patients == 0:
        raise DataError("the source holds no image; give a source with at least one image",
                        safe_reason="the source holds no image")
    return import_plan(plan, out, opts, progress=progress)
