"""Synthetic, PHI-free demo hospitals for every task, with a signal a model can learn.

:func:`synthesize_task_federation` writes one folder per hospital, laid out as
:mod:`client.dicom.synth` lays out the binary demo (``site-k/dicom/<pseudonym>/ST1/SE1/IM<n>.dcm``)
with the same phantom anatomy (:func:`~client.dicom.synth_phantom.draw_anatomy`,
:func:`~client.dicom.synth_phantom.render_slice`), site profiles and CT header
(:func:`~client.dicom.synth_common.ct_image_dataset`), and a ``labels.csv`` holding the task's
column (:data:`client.data.labels.TARGET_COLUMNS`). What the images show per task:

``multiclass`` (K = 2..6, default 4)
    Class 0: no lesion. Classes 1..K-1: one liver lesion of a distinct type, drawn with the
    same size range for every type, so only appearance separates them:
    1 hyperdense round, 2 hypodense round, 3 ring-enhancing (bright rim, dark centre),
    4 hyperdense oval (axes about 2.2:1), 5 hypodense oval.
``ordinal`` (K = 2..8, default 5)
    Grade 0: no lesion; grade g >= 1: one hyperdense liver lesion whose radius lies in the
    g-th of K-1 equal bins between :data:`MIN_RADIUS_MM` and :data:`MAX_RADIUS_MM`.
``multilabel`` (K = 2..3, default 3)
    Independent findings (each with probability :data:`FINDING_RATE`): 0 a hyperdense liver
    lesion, 1 a calcified splenic nodule, 2 a hypodense liver cyst; ``findings`` lists them
    (``0;2``), empty for none.
``regression``
    ``value``: the largest cross-section area, in cm², of the study's liver lesion over its
    imaged slices (clipped to the liver, measured on a 1 mm grid, so it does not depend on the
    site's pixel spacing); 0 without a lesion. cm² rather than mm² keeps the target near 0..50,
    a scale a squared-error loss under DP-SGD's clipping handles without a transform.
``reconstruction``
    The binary demo's population (prevalence of the site profile), no ``labels.csv``.
``segmentation``
    Delegated to :func:`client.dicom.synth_seg.synthesize_segmentation_federation` (the
    project's mask-series convention read by :mod:`client.data.segmentation`).

Every lesion of the label tasks is centred on one of the study's slices (no occult lesions),
so the target is visible. ``images_per_patient=(8, 8)`` gives every study an 8-slice series
(6 mm apart) for volume and recurrent models.

Privacy: as :mod:`client.dicom.synth`: pseudonyms only, (0012,0062) Patient Identity Removed
``YES``, no dates or institution; the files pass :func:`client.dicom.phi.check_deidentified`.
UIDs are hashed from the seed in a namespace per task, so no two tasks share a UID.
"""

from __future__ import annotations

import csv
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from client.dicom.synth import SiteSummary
from client.dicom.synth_common import (
    StudyIds,
    UidMaker,
    ct_image_dataset,
    deterministic_uid,
    synthesize_sites,
)
from client.dicom.synth_phantom import SLICE_GAP_MM, Anatomy, Ellipse, draw_anatomy, render_slice
from client.dicom.synth_profiles import SiteProfile, physical_to_stored
from client.dicom.synth_seg import synthesize_segmentation_federation
from common.errors import ConfigError

__all__ = [
    "CLASS_RANGE",
    "DEFAULT_CLASSES",
    "FINDING_RATE",
    "MAX_RADIUS_MM",
    "MIN_RADIUS_MM",
    "SYNTH_TASKS",
    "Focus",
    "add_foci",
    "check_num_classes",
    "synthesize_task_federation",
    "synthesize_task_site",
]

logger = logging.getLogger(__name__)

#: Tasks :func:`synthesize_task_federation` writes (``binary`` is :mod:`client.dicom.synth`).
SYNTH_TASKS = ("multiclass", "ordinal", "multilabel", "regression", "segmentation",
               "reconstruction")
#: Default K per task that has one.
DEFAULT_CLASSES = {"multiclass": 4, "ordinal": 5, "multilabel": 3}
#: Inclusive range of K each task's phantom can draw.
CLASS_RANGE = {"multiclass": (2, 6), "ordinal": (2, 8), "multilabel": (2, 3)}
#: Lesion radius range of the ordinal grades and of the regression lesions, millimetres.
MIN_RADIUS_MM = 8.0
MAX_RADIUS_MM = 40.0
#: Probability of each multilabel finding.
FINDING_RATE = 0.4
#: Probability of a lesion in the regression population.
REGRESSION_PREVALENCE = 0.75

_COLUMNS = {"multiclass": "label", "ordinal": "label", "multilabel": "findings",
            "regression": "value"}
_STREAM = {task: number for number, task in enumerate(SYNTH_TASKS, start=2)}

Target = int | tuple[int, ...] | float


@dataclass(frozen=True)
class Focus:
    """A finding drawn into the phantom: an ellipsoid in patient millimetres.

    ``contrast_hu`` is added inside (negative: hypodense); a ring adds it on the rim only and
    :data:`_RING_CENTRE` times it inside. ``organ`` clips the focus to the liver or spleen.
    """

    cx: float
    cy: float
    cz: float
    ax: float
    ay: float
    az: float
    angle: float
    contrast_hu: float
    ring: bool = False
    organ: str = "liver"


@dataclass(frozen=True)
class _Patient:
    ids: StudyIds
    n_images: int
    anatomy: Anatomy
    foci: tuple[Focus, ...]
    target: Target | None


_RING_INNER = 0.55  # inner radius of a ring, as a fraction of the outer
_RING_CENTRE = -0.3  # contrast of a ring's centre, as a fraction of its rim's


def _slice_z(k: int, n: int) -> float:
    return (k - 0.5 * (n - 1)) * SLICE_GAP_MM


def _organ_point(rng: np.random.Generator, organ: Ellipse, spread: float) -> tuple[float, float]:
    """A point inside ``organ`` at most ``spread`` of the way to its border."""
    r = spread * np.sqrt(rng.uniform(0, 1))
    t = rng.uniform(0, 2 * np.pi)
    u, v = r * organ.ax * np.cos(t), r * organ.ay * np.sin(t)
    cos, sin = np.cos(organ.angle), np.sin(organ.angle)
    return float(organ.cx + cos * u - sin * v), float(organ.cy + sin * u + cos * v)


def _focus(rng: np.random.Generator, anatomy: Anatomy, n: int, *, radius: float,
           contrast: float, elongation: float = 1.0, ring: bool = False,
           organ: str = "liver") -> Focus:
    """A focus centred on a random slice of the study, inside ``organ``."""
    where = anatomy.liver if organ == "liver" else anatomy.spleen
    cx, cy = _organ_point(rng, where, 0.45 if organ == "liver" else 0.3)
    cz = _slice_z(int(rng.integers(0, n)), n)
    return Focus(cx=cx, cy=cy, cz=cz, ax=radius * elongation, ay=radius / elongation,
                 az=radius, angle=float(rng.uniform(0, np.pi)), contrast_hu=contrast,
                 ring=ring, organ=organ)


def _multiclass(rng: np.random.Generator, anatomy: Anatomy, n: int, k: int,
                contrast: float) -> tuple[int, tuple[Focus, ...]]:
    label = int(rng.integers(0, k))
    if label == 0:
        return 0, ()
    radius = float(rng.uniform(15.0, 30.0))
    kind = {1: (1.0, 1.0, False), 2: (-0.55, 1.0, False), 3: (0.8, 1.0, True),
            4: (1.0, 1.5, False), 5: (-0.55, 1.5, False)}[label]
    sign, elongation, ring = kind
    return label, (_focus(rng, anatomy, n, radius=radius, contrast=sign * contrast,
                          elongation=elongation, ring=ring),)


def _ordinal(rng: np.random.Generator, anatomy: Anatomy, n: int, k: int,
             contrast: float) -> tuple[int, tuple[Focus, ...]]:
    grade = int(rng.integers(0, k))
    if grade == 0:
        return 0, ()
    edges = np.linspace(MIN_RADIUS_MM, MAX_RADIUS_MM, k)
    radius = float(rng.uniform(edges[grade - 1], edges[grade]))
    return grade, (_focus(rng, anatomy, n, radius=radius, contrast=contrast),)


def _multilabel(rng: np.random.Generator, anatomy: Anatomy, n: int, k: int,
                contrast: float) -> tuple[tuple[int, ...], tuple[Focus, ...]]:
    present = [f for f in range(k) if rng.uniform() < FINDING_RATE]
    foci = []
    for finding in present:
        if finding == 0:
            foci.append(_focus(rng, anatomy, n, radius=float(rng.uniform(15.0, 30.0)),
                               contrast=contrast))
        elif finding == 1:
            foci.append(_focus(rng, anatomy, n, radius=float(rng.uniform(7.0, 11.0)),
                               contrast=900.0, organ="spleen"))
        else:
            foci.append(_focus(rng, anatomy, n, radius=float(rng.uniform(12.0, 22.0)),
                               contrast=-0.55 * contrast))
    return tuple(present), tuple(foci)


def _regression(rng: np.random.Generator, anatomy: Anatomy, n: int,
                contrast: float) -> tuple[float, tuple[Focus, ...]]:
    if rng.uniform() >= REGRESSION_PREVALENCE:
        return 0.0, ()
    focus = _focus(rng, anatomy, n, radius=float(rng.uniform(MIN_RADIUS_MM, MAX_RADIUS_MM)),
                   contrast=contrast)
    return round(_largest_area_cm2(focus, anatomy, n), 2), (focus,)


def _reconstruction(rng: np.random.Generator, anatomy: Anatomy, n: int, contrast: float,
                    prevalence: float) -> tuple[None, tuple[Focus, ...]]:
    if rng.uniform() >= prevalence:
        return None, ()
    return None, (_focus(rng, anatomy, n, radius=float(rng.uniform(15.0, 35.0)),
                         contrast=contrast),)


def _inside(focus: Focus, x: NDArray[np.float64], y: NDArray[np.float64],
            z_mm: float) -> NDArray[np.float64]:
    """Normalised ellipse radius of the focus's cross-section at ``z_mm`` (``inf`` if none)."""
    dz = (z_mm - focus.cz) / focus.az
    if abs(dz) >= 1.0:
        return np.full(x.shape, np.inf)
    scale = float(np.sqrt(1.0 - dz * dz))
    cos, sin = np.cos(focus.angle), np.sin(focus.angle)
    u = (cos * (x - focus.cx) + sin * (y - focus.cy)) / (focus.ax * scale)
    v = (-sin * (x - focus.cx) + cos * (y - focus.cy)) / (focus.ay * scale)
    return np.asarray(np.sqrt(u * u + v * v))


def _organ_mask(focus: Focus, anatomy: Anatomy, x: NDArray[np.float64], y: NDArray[np.float64],
                z_mm: float) -> NDArray[np.bool_]:
    taper = 1.0 - anatomy.z_taper * abs(z_mm) / SLICE_GAP_MM
    organ = anatomy.liver if focus.organ == "liver" else anatomy.spleen
    return organ.mask(x, y, scale=taper)


def _largest_area_cm2(focus: Focus, anatomy: Anatomy, n: int) -> float:
    """Largest cross-section of ``focus`` within its organ over the study's slices, in cm²."""
    reach = max(focus.ax, focus.ay) + 1.0
    grid = np.arange(-reach, reach + 1.0, 1.0)
    x, y = np.meshgrid(grid + focus.cx, grid + focus.cy)
    best = 0
    for k in range(n):
        z_mm = _slice_z(k, n)
        inside = (_inside(focus, x, y, z_mm) < 1.0) & _organ_mask(focus, anatomy, x, y, z_mm)
        best = max(best, int(inside.sum()))
    return best / 100.0


def add_foci(img: NDArray[np.float64], foci: tuple[Focus, ...], anatomy: Anatomy, *,
              z_mm: float, spacing_mm: float) -> NDArray[np.float64]:
    """Return ``img`` (physical values of one slice at ``z_mm``) with each focus added.

    The contrast follows a logistic edge of about half a pixel ((0028,0030) Pixel Spacing
    ``spacing_mm``) and is clipped to the focus's organ, tapered as the phantom's.
    """
    if not foci:
        return img
    size = img.shape[0]
    coords = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * spacing_mm
    x, y = np.meshgrid(coords, coords)
    edge = max(1.0, 0.5 * spacing_mm)
    out = img.copy()
    for focus in foci:
        rho = _inside(focus, x, y, z_mm)
        if not np.isfinite(rho).any():
            continue
        size_mm = float(np.sqrt(focus.ax * focus.ay))
        outer = 1.0 / (1.0 + np.exp(np.clip((rho - 1.0) * size_mm / edge, -50, 50)))
        organ = _organ_mask(focus, anatomy, x, y, z_mm)
        if focus.ring:
            inner = 1.0 / (1.0 + np.exp(np.clip((rho / _RING_INNER - 1.0) * size_mm
                                                * _RING_INNER / edge, -50, 50)))
            shape = (outer - inner) + _RING_CENTRE * inner
        else:
            shape = outer
        out += focus.contrast_hu * shape * organ
    return out


def _draw(task: str, rng: np.random.Generator, profile: SiteProfile, *, k: int,
          anatomy: Anatomy, n: int) -> tuple[Target | None, tuple[Focus, ...]]:
    contrast = profile.lesion_contrast * float(rng.lognormal(0.0, 0.2))
    if task == "multiclass":
        return _multiclass(rng, anatomy, n, k, contrast)
    if task == "ordinal":
        return _ordinal(rng, anatomy, n, k, contrast)
    if task == "multilabel":
        return _multilabel(rng, anatomy, n, k, contrast)
    if task == "regression":
        return _regression(rng, anatomy, n, contrast)
    return _reconstruction(rng, anatomy, n, contrast, profile.prevalence)


def _write_patient(study_dir: Path, patient: _Patient, profile: SiteProfile,
                   rng: np.random.Generator, *, image_size: int, uid: UidMaker) -> None:
    """Render and write the patient's CT series (``study_dir/SE1/IM<n>.dcm``)."""
    series_dir = study_dir / "SE1"
    series_dir.mkdir(parents=True, exist_ok=True)
    spacing = profile.pixel_spacing_mm(image_size)
    for k in range(patient.n_images):
        z_mm = _slice_z(k, patient.n_images)
        phantom = render_slice(patient.anatomy, None, z_mm=z_mm, slice_index=k,
                               size=image_size, spacing_mm=spacing)
        phantom = add_foci(phantom, patient.foci, patient.anatomy, z_mm=z_mm,
                            spacing_mm=spacing)
        physical = profile.intensity_scale * phantom + profile.intensity_offset
        physical = physical + rng.normal(0.0, profile.noise_sd, size=physical.shape)
        dataset = ct_image_dataset(
            physical_to_stored(physical, profile), profile=profile, ids=patient.ids,
            sop_uid=uid(profile.name, patient.ids.patient_id, "image", str(k)),
            instance_number=k + 1, z_mm=z_mm, spacing_mm=spacing)
        dataset.save_as(series_dir / f"IM{k + 1}.dcm", enforce_file_format=True)


def _cell(target: Target) -> str:
    if isinstance(target, tuple):
        return ";".join(str(f) for f in target)
    if isinstance(target, float):
        return f"{target:.2f}"
    return str(target)


def _nonzero(target: Target | None, foci: tuple[Focus, ...]) -> bool:
    return bool(foci) if target is None else bool(target)


def synthesize_task_site(
    site_dir: str | Path,
    profile: SiteProfile,
    *,
    task: str,
    num_classes: int,
    site_index: int,
    patients: int,
    images_per_patient: tuple[int, int] = (2, 4),
    image_size: int = 64,
    seed: int = 0,
    on_patient: Callable[[], None] | None = None,
) -> SiteSummary:
    """Write one hospital's DICOM files (and ``labels.csv`` unless reconstruction).

    Parameters
    ----------
    site_dir : str or Path
        Destination folder; created if missing.
    profile : SiteProfile
        The hospital's acquisition characteristics ((0028,0030) Pixel Spacing, (0028,1052)
        Rescale Intercept, (0028,1053) Rescale Slope, noise, lesion contrast).
    task : str
        One of :data:`SYNTH_TASKS` except ``segmentation``.
    num_classes : int
        K for ``multiclass``, ``ordinal`` and ``multilabel`` (ignored otherwise).
    site_index, patients, images_per_patient, image_size, seed, on_patient
        As for :func:`client.dicom.synth.synthesize_site`. Patient ``i`` draws from
        ``numpy.random.default_rng([seed, site_index, i, stream])`` with a stream per task.

    Returns
    -------
    SiteSummary
        ``positives`` counts the studies with a non-zero target (a class or grade above 0,
        a finding, a lesion area) or, for reconstruction, with a lesion.
    """
    site_path = Path(site_dir)
    site_path.mkdir(parents=True, exist_ok=True)
    uid = functools.partial(deterministic_uid, f"vesalius-synth-{task}-v1", seed)
    rows: list[tuple[str, str, str]] = []
    images = positives = 0
    lo, hi = images_per_patient
    for index in range(patients):
        rng = np.random.default_rng([seed, site_index, index, _STREAM[task]])
        n = int(rng.integers(lo, hi + 1))
        anatomy = draw_anatomy(rng)
        target, foci = _draw(task, rng, profile, k=num_classes, anatomy=anatomy, n=n)
        pid = f"S{site_index + 1}-P{index + 1:04d}"
        ids = StudyIds(patient_id=pid, study_uid=uid(profile.name, pid, "study"),
                       series_uid=uid(profile.name, pid, "series"),
                       frame_uid=uid(profile.name, pid, "frame"), study_id="1")
        patient = _Patient(ids=ids, n_images=n, anatomy=anatomy, foci=foci, target=target)
        _write_patient(site_path / "dicom" / pid / "ST1", patient, profile, rng,
                       image_size=image_size, uid=uid)
        images += n
        positives += int(_nonzero(target, foci))
        if target is not None:
            rows.append((pid, ids.study_uid, _cell(target)))
        if on_patient is not None:
            on_patient()
    if task in _COLUMNS:
        with (site_path / "labels.csv").open("w", newline="", encoding="ascii") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(("patient_id", "study_uid", _COLUMNS[task]))
            writer.writerows(rows)
    logger.info("synthesised %s for %s: %d patients, %d images", profile.name, task, patients,
                images)
    return SiteSummary(site=profile.name, path=site_path, patients=patients, images=images,
                       positives=positives)


def check_num_classes(task: str, num_classes: int | None) -> int:
    """K for ``task``: the default when ``None``; refused outside :data:`CLASS_RANGE`."""
    if task not in CLASS_RANGE:
        return 2
    k = DEFAULT_CLASSES[task] if num_classes is None else num_classes
    lo, hi = CLASS_RANGE[task]
    if not lo <= k <= hi:
        raise ConfigError(f"the {task} phantom draws {lo} to {hi} classes, got {k}",
                          safe_reason="unsupported number of classes")
    return k


def synthesize_task_federation(
    out_dir: str | Path,
    *,
    task: str,
    num_classes: int | None = None,
    n_sites: int = 3,
    patients_per_site: int = 500,
    images_per_patient: tuple[int, int] = (2, 4),
    image_size: int = 64,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[SiteSummary]:
    """Write a synthetic federation for ``task`` under ``out_dir`` (site ``k`` in ``site-k``).

    Parameters
    ----------
    task : str
        One of :data:`SYNTH_TASKS` (``binary`` is :func:`client.dicom.synth.synthesize_federation`).
    num_classes : int | None
        K (:data:`CLASS_RANGE`); ``None`` takes :data:`DEFAULT_CLASSES`.
    out_dir, n_sites, patients_per_site, images_per_patient, image_size, seed, progress
        As for :func:`client.dicom.synth.synthesize_federation`; a non-empty site folder is
        refused before anything is written.

    Returns
    -------
    list of SiteSummary
        One per site, in order (for segmentation ``positives`` counts images with lesion).

    Raises
    ------
    ConfigError
        An unknown task, K outside :data:`CLASS_RANGE`, or the checks of
        :func:`client.dicom.synth_common.synthesize_sites`.
    """
    if task not in SYNTH_TASKS:
        raise ConfigError(f"no synthetic data for the task {task!r}; choose binary or one of "
                          f"{', '.join(SYNTH_TASKS)}", safe_reason="unknown task")
    k = check_num_classes(task, num_classes)
    if task == "segmentation":
        seg = synthesize_segmentation_federation(
            out_dir, n_sites=n_sites, patients_per_site=patients_per_site,
            images_per_patient=images_per_patient, image_size=image_size, seed=seed,
            progress=progress)
        return [SiteSummary(site=s.site, path=s.path, patients=s.patients, images=s.images,
                            positives=s.lesion_images) for s in seg]
    return synthesize_sites(
        out_dir,
        functools.partial(synthesize_task_site, task=task, num_classes=k),
        n_sites=n_sites,
        patients_per_site=patients_per_site,
        images_per_patient=images_per_patient,
        image_size=image_size,
        seed=seed,
        progress=progress,
    )
