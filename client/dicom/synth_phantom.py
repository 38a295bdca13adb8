"""Image model for the synthetic demo federation: an abdominal CT-like phantom.

The phantom is defined in millimetres and in physical units (Hounsfield-like values, the
output space of the modality LUT, (0028,1052) Rescale Intercept and (0028,1053) Rescale
Slope). It is rasterised on a pixel grid whose spacing, (0028,0030) Pixel Spacing, comes from
the acquiring site, so the same anatomy covers a different number of pixels per hospital.

Each patient has one random anatomy (body outline with a subcutaneous fat layer, a liver-like
organ, a spleen-like organ, the spine, the aorta, a few enhancing vessels, 0-2 small benign
calcifications that mimic small lesions, and a smooth tissue texture) that is cut at 2-4
neighbouring axial positions. A positive patient has one hyperdense (calcified or
contrast-enhancing), roughly spherical lesion in the liver; each slice shows the cross-section
of the sphere at its own position, so the lesion is larger and clearer on some slices, small
on others and may be missed by an outlying slice. Lesion size and contrast vary per patient,
and for :data:`OCCULT_FRACTION` of positive patients the lesion lies outside the imaged slab,
so even an ideal reader cannot separate every case (pooled Bayes AUC about 0.97): the task is
learnable but not trivial.

The lesion contrast is exaggerated on purpose (several hundred HU): the downstream pipeline
normalises whole images (air included) and trains a small CNN under DP-SGD for a handful of
rounds, which only learns conspicuous findings. Calibration is recorded in the tests' module
docstring.

Nothing here is derived from real patient data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import gaussian_filter

__all__ = ["Anatomy", "Lesion", "draw_anatomy", "draw_lesion", "render_slice"]

FloatImage = NDArray[np.float64]

#: Physical values (Hounsfield-like units) of the phantom's tissue classes.
AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
LIVER_HU = 60.0
SPLEEN_HU = 45.0
AORTA_HU = 170.0
VESSEL_HU = 140.0
BONE_HU = 450.0
MARROW_HU = 180.0
GRANULOMA_HU = 500.0

#: Fraction of positive patients whose lesion lies outside the imaged slab (invisible).
OCCULT_FRACTION = 0.07

#: Distance between neighbouring slices of a study, in millimetres.
SLICE_GAP_MM = 6.0


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in patient millimetres: centre, semi-axes and rotation (radians)."""

    cx: float
    cy: float
    ax: float
    ay: float
    angle: float = 0.0

    def mask(self, x: FloatImage, y: FloatImage, *, scale: float = 1.0) -> NDArray[np.bool_]:
        """Return the pixels inside the ellipse with semi-axes multiplied by ``scale``."""
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        dx, dy = x - self.cx, y - self.cy
        u = (cos * dx + sin * dy) / (self.ax * scale)
        v = (-sin * dx + cos * dy) / (self.ay * scale)
        return np.asarray(u * u + v * v <= 1.0)


@dataclass(frozen=True)
class Lesion:
    """A hyperdense sphere: centre (mm, z relative to the middle slice), radius and contrast.

    ``contrast_hu`` is the rise in physical value at the lesion centre.
    """

    cx: float
    cy: float
    cz: float
    radius_mm: float
    contrast_hu: float


@dataclass(frozen=True)
class Anatomy:
    """One patient's anatomy, independent of the acquiring site."""

    body: Ellipse
    fat_mm: float
    liver: Ellipse
    spleen: Ellipse
    spine: Ellipse
    aorta: Ellipse
    vessels: tuple[Ellipse, ...]
    granulomas: tuple[Ellipse, ...]
    texture_hu: float
    texture_seed: int
    z_taper: float


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw a random anatomy (all lengths in millimetres).

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness; the result depends only on its state.

    Returns
    -------
    Anatomy
        Body, organs, vessels and texture parameters of one patient.
    """
    bcx, bcy = rng.uniform(-12, 12), rng.uniform(-10, 10)
    body = Ellipse(bcx, bcy, rng.uniform(140, 170), rng.uniform(100, 125), rng.uniform(-0.08, 0.08))
    liver = Ellipse(
        bcx - rng.uniform(35, 55),
        bcy - rng.uniform(0, 20),
        rng.uniform(60, 78),
        rng.uniform(48, 62),
        rng.uniform(-0.4, 0.4),
    )
    spleen = Ellipse(
        bcx + rng.uniform(70, 90),
        bcy + rng.uniform(10, 30),
        rng.uniform(22, 32),
        rng.uniform(15, 22),
        rng.uniform(-0.8, 0.8),
    )
    spine_cy = bcy + body.ay - rng.uniform(35, 45)
    spine = Ellipse(bcx + rng.uniform(-4, 4), spine_cy, rng.uniform(14, 18), rng.uniform(13, 16))
    aorta = Ellipse(
        spine.cx + rng.uniform(4, 12),
        spine_cy - rng.uniform(28, 34),
        *[rng.uniform(8, 12)] * 2,
    )
    vessels = []
    for _ in range(int(rng.integers(1, 4))):
        r = float(rng.uniform(0, 0.7))
        t = float(rng.uniform(0, 2 * np.pi))
        vessels.append(
            Ellipse(
                liver.cx + r * liver.ax * np.cos(t),
                liver.cy + r * liver.ay * np.sin(t),
                rng.uniform(2.5, 5.0),
                rng.uniform(2.5, 5.0),
            )
        )
    granulomas = [
        Ellipse(
            liver.cx + rng.uniform(-0.7, 0.7) * liver.ax,
            liver.cy + rng.uniform(-0.7, 0.7) * liver.ay,
            *[rng.uniform(3.0, 6.0)] * 2,
        )
        for _ in range(int(rng.integers(0, 3)))
    ]
    return Anatomy(
        body=body,
        fat_mm=float(rng.uniform(8, 18)),
        liver=liver,
        spleen=spleen,
        spine=spine,
        aorta=aorta,
        vessels=tuple(vessels),
        granulomas=tuple(granulomas),
        texture_hu=float(rng.uniform(6, 12)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        z_taper=float(rng.uniform(0.01, 0.03)),
    )


def draw_lesion(
    rng: np.random.Generator, anatomy: Anatomy, *, mean_contrast_hu: float, n_slices: int
) -> Lesion:
    """Draw a liver lesion for a positive patient.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    anatomy : Anatomy
        The patient's anatomy; the lesion centre lies inside the liver.
    mean_contrast_hu : float
        Site-specific mean contrast (physical units); the patient's contrast is drawn
        log-normally around it, so conspicuity varies between patients.
    n_slices : int
        Number of slices in the study; the lesion centre is placed within their z extent,
        except for occult lesions, which lie just beyond it.

    Returns
    -------
    Lesion
        The lesion, ``cz`` relative to the middle slice.
    """
    liver = anatomy.liver
    r = 0.6 * np.sqrt(rng.uniform(0, 1))
    t = rng.uniform(0, 2 * np.pi)
    cos, sin = np.cos(liver.angle), np.sin(liver.angle)
    u, v = r * liver.ax * np.cos(t), r * liver.ay * np.sin(t)
    half_extent = 0.5 * (n_slices - 1) * SLICE_GAP_MM
    radius = float(rng.uniform(20.0, 45.0))
    if rng.uniform() < OCCULT_FRACTION:
        # The lesion lies beyond the imaged slab: the study label is positive but no slice
        # shows it, so even an ideal reader cannot tell this patient from a negative one.
        cz = (half_extent + radius + rng.uniform(1.0, 10.0)) * rng.choice([-1.0, 1.0])
    else:
        cz = rng.uniform(-half_extent, half_extent)
    contrast = mean_contrast_hu * rng.lognormal(0.0, 0.35)
    return Lesion(
        cx=float(liver.cx + cos * u - sin * v),
        cy=float(liver.cy + sin * u + cos * v),
        cz=float(cz),
        radius_mm=radius,
        contrast_hu=float(contrast),
    )


def _texture(
    anatomy: Anatomy, shape: tuple[int, int], slice_index: int, sigma_px: float
) -> FloatImage:
    """Smooth, unit-variance random field, partly shared between slices of one study."""
    rng = np.random.default_rng([anatomy.texture_seed, 0])
    shared = rng.standard_normal(shape)
    own = np.random.default_rng([anatomy.texture_seed, slice_index + 1]).standard_normal(shape)
    field = gaussian_filter(0.8 * shared + 0.6 * own, sigma=sigma_px, mode="wrap")
    sd = float(field.std())
    return np.asarray(field / sd if sd > 0 else field)


def render_slice(
    anatomy: Anatomy,
    lesion: Lesion | None,
    *,
    z_mm: float,
    slice_index: int,
    size: int,
    spacing_mm: float,
) -> FloatImage:
    """Rasterise one axial slice in physical units, before site effects and noise.

    Parameters
    ----------
    anatomy : Anatomy
        The patient's anatomy.
    lesion : Lesion or None
        The patient's lesion, or ``None`` for a negative patient.
    z_mm : float
        Position of the slice relative to the middle slice of the study, in millimetres.
    slice_index : int
        Index of the slice within the study (selects the slice-specific texture).
    size : int
        Rows and columns, (0028,0010) Rows and (0028,0011) Columns.
    spacing_mm : float
        Isotropic in-plane spacing, (0028,0030) Pixel Spacing, in millimetres.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float64 image of physical values.
    """
    coords = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * spacing_mm
    x, y = np.meshgrid(coords, coords)
    taper = 1.0 - anatomy.z_taper * abs(z_mm) / SLICE_GAP_MM
    img = np.full((size, size), AIR_HU)
    body = anatomy.body.mask(x, y)
    img[body] = FAT_HU
    inner_scale = 1.0 - anatomy.fat_mm / anatomy.body.ay
    img[anatomy.body.mask(x, y, scale=inner_scale)] = SOFT_TISSUE_HU
    liver = anatomy.liver.mask(x, y, scale=taper)
    img[liver] = LIVER_HU
    img[anatomy.spleen.mask(x, y, scale=taper)] = SPLEEN_HU
    img[anatomy.aorta.mask(x, y)] = AORTA_HU
    img[anatomy.spine.mask(x, y)] = BONE_HU
    img[anatomy.spine.mask(x, y, scale=0.7)] = MARROW_HU
    for vessel in anatomy.vessels:
        img[vessel.mask(x, y) & liver] = VESSEL_HU
    for granuloma in anatomy.granulomas:
        img[granuloma.mask(x, y) & liver] = GRANULOMA_HU
    tissue = body & (img > FAT_HU)
    texture = _texture(anatomy, (size, size), slice_index, sigma_px=max(1.0, 4.0 / spacing_mm))
    img[tissue] += anatomy.texture_hu * texture[tissue]
    if lesion is not None:
        dz = z_mm - lesion.cz
        if abs(dz) < lesion.radius_mm:
            r_slice = float(np.sqrt(lesion.radius_mm**2 - dz**2))
            dist = np.hypot(x - lesion.cx, y - lesion.cy)
            edge = max(1.0, 0.5 * spacing_mm)
            profile = 1.0 / (1.0 + np.exp((dist - r_slice) / edge))
            img += lesion.contrast_hu * profile * liver
    # Mild partial-volume blur so edges are not perfectly sharp.
    return np.asarray(gaussian_filter(img, sigma=0.6, mode="nearest"))
