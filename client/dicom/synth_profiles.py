"""Hospital acquisition profiles for the synthetic demo data, and the inverse modality LUT.

Each :class:`SiteProfile` describes how one (fictitious) hospital's scanner differs from the
others: intensity calibration, noise, lesion conspicuity, prevalence, (0028,0030) Pixel
Spacing, (0028,0101) Bits Stored, (0028,0103) Pixel Representation, (0028,1052) Rescale
Intercept and (0028,1053) Rescale Slope.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import ConfigError

__all__ = ["SiteProfile", "default_profiles", "physical_to_stored"]

@dataclass(frozen=True)
class SiteProfile:
    """Acquisition and population characteristics of one synthetic hospital.

    Attributes
    ----------
    name : str
        Folder name of the site, e.g. ``"site-1"``.
    intensity_scale, intensity_offset : float
        Scanner calibration: physical value = ``scale * phantom + offset``.
    noise_sd : float
        Standard deviation of white acquisition noise, in physical units.
    lesion_contrast : float
        Mean hyperdensity of a lesion over liver, in physical units (varies per patient).
    prevalence : float
        Probability that a patient of this site has a lesion (label 1).
    rescale_slope, rescale_intercept : float
        (0028,1053) Rescale Slope and (0028,1052) Rescale Intercept: physical =
        ``slope * stored + intercept``.
    bits_stored : int
        (0028,0101) Bits Stored; (0028,0100) Bits Allocated is always 16.
    pixel_representation : int
        (0028,0103) Pixel Representation: 0 unsigned, 1 two's complement.
    manufacturer : str
        (0008,0070) Manufacturer (fictitious vendor).
    model_name : str
        (0008,1090) Manufacturer's Model Name (fictitious).
    field_of_view_mm : float
        Reconstruction field of view; (0028,0030) Pixel Spacing = FOV / matrix size.
    """

    name: str
    intensity_scale: float
    intensity_offset: float
    noise_sd: float
    lesion_contrast: float
    prevalence: float
    rescale_slope: float
    rescale_intercept: float
    bits_stored: int
    manufacturer: str
    pixel_representation: int = 0
    model_name: str = "Phantom CT"
    field_of_view_mm: float = 400.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.prevalence <= 1.0:
            raise ConfigError(f"prevalence must be in [0, 1], got {self.prevalence}")
        if self.rescale_slope <= 0:
            raise ConfigError(f"rescale_slope must be positive, got {self.rescale_slope}")
        if not 8 <= self.bits_stored <= 16:
            raise ConfigError(f"bits_stored must be in [8, 16], got {self.bits_stored}")
        if self.pixel_representation not in (0, 1):
            raise ConfigError(
                f"pixel_representation must be 0 or 1, got {self.pixel_representation}"
            )
        if self.noise_sd < 0 or self.lesion_contrast < 0 or self.intensity_scale <= 0:
            raise ConfigError("noise_sd and lesion_contrast must be >= 0 and intensity_scale > 0")
        if self.field_of_view_mm <= 0:
            raise ConfigError(f"field_of_view_mm must be positive, got {self.field_of_view_mm}")

    @property
    def stored_range(self) -> tuple[int, int]:
        """Smallest and largest stored value allowed by Bits Stored and Pixel Representation."""
        if self.pixel_representation == 1:
            return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        return 0, 2**self.bits_stored - 1

    @property
    def physical_range(self) -> tuple[float, float]:
        """Physical values representable after the modality LUT."""
        lo, hi = self.stored_range
        return (
            self.rescale_slope * lo + self.rescale_intercept,
            self.rescale_slope * hi + self.rescale_intercept,
        )

    def pixel_spacing_mm(self, image_size: int) -> float:
        """(0028,0030) Pixel Spacing, in millimetres, for a square matrix of ``image_size``."""
        return self.field_of_view_mm / image_size


_BASE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="site-1",
        intensity_scale=1.0,
        intensity_offset=0.0,
        noise_sd=15.0,
        lesion_contrast=750.0,
        prevalence=0.30,
        rescale_slope=1.0,
        rescale_intercept=-1024.0,
        bits_stored=12,
        pixel_representation=0,
        manufacturer="Aurora Medical Systems",
        model_name="AuroraScan 64",
        field_of_view_mm=360.0,
    ),
    SiteProfile(
        name="site-2",
        intensity_scale=1.08,
        intensity_offset=15.0,
        noise_sd=22.0,
        lesion_contrast=680.0,
        prevalence=0.45,
        rescale_slope=0.5,
        rescale_intercept=-1024.0,
        bits_stored=16,
        pixel_representation=0,
        manufacturer="Borealis Imaging",
        model_name="Helix 128",
        field_of_view_mm=400.0,
    ),
    SiteProfile(
        name="site-3",
        intensity_scale=0.93,
        intensity_offset=-10.0,
        noise_sd=30.0,
        lesion_contrast=720.0,
        prevalence=0.55,
        rescale_slope=1.0,
        rescale_intercept=0.0,
        bits_stored=16,
        pixel_representation=1,
        manufacturer="Cygnus Diagnostics",
        model_name="Vela CT",
        field_of_view_mm=440.0,
    ),
)


def default_profiles(n_sites: int) -> list[SiteProfile]:
    """Return ``n_sites`` hospital profiles with distinct acquisition characteristics.

    The first three are fixed (prevalence 0.30 / 0.45 / 0.55, three rescale conventions,
    increasing noise and field of view). Further sites reuse those conventions with shifted
    calibration, noise and prevalence, so every profile differs from every other. Sites 4-21
    (cycles 1-6) shift by their cycle number; from site 22 on, the shift is a bounded,
    never-repeating fraction of the sixth cycle's (:data:`_LAST_LINEAR_CYCLE`; the golden-ratio
    sequence), so a federation of a thousand sites keeps plausible scanners: a field of view
    of at most 500 mm, noise SD at most 42, an intensity scale at most 1.28.

    Parameters
    ----------
    n_sites : int
        Number of hospitals, at least 1.

    Returns
    -------
    list of SiteProfile
        Profiles named ``site-1`` ... ``site-<n_sites>``.
    """
    if n_sites < 1:
        raise ConfigError(f"n_sites must be at least 1, got {n_sites}")
    profiles: list[SiteProfile] = []
    for index in range(n_sites):
        base = _BASE_PROFILES[index % len(_BASE_PROFILES)]
        cycle = index // len(_BASE_PROFILES)
        if cycle == 0:
            profiles.append(base)
            continue
        shift = float(cycle) if cycle <= _LAST_LINEAR_CYCLE else _bounded_shift(cycle)
        profiles.append(
            SiteProfile(
                name=f"site-{index + 1}",
                intensity_scale=base.intensity_scale * (1.0 + 0.03 * shift),
                intensity_offset=base.intensity_offset + 5.0 * shift,
                noise_sd=base.noise_sd + 2.0 * shift,
                lesion_contrast=base.lesion_contrast + 2.0 * shift,
                prevalence=min(0.7, base.prevalence + 0.05 * shift),
                rescale_slope=base.rescale_slope,
                rescale_intercept=base.rescale_intercept,
                bits_stored=base.bits_stored,
                pixel_representation=base.pixel_representation,
                manufacturer=base.manufacturer,
                model_name=f"{base.model_name} rev {cycle + 1}",
                field_of_view_mm=base.field_of_view_mm + 10.0 * shift,
            )
        )
    return profiles


#: The last cycle of sites whose shift grows with the cycle (sites up to 21).
_LAST_LINEAR_CYCLE = 6
_GOLDEN = (5**0.5 - 1) / 2


def _bounded_shift(cycle: int) -> float:
    """A shift in ``[1, 6)`` for cycles past :data:`_LAST_LINEAR_CYCLE`, distinct per cycle
    (fractional parts of multiples of the golden ratio never repeat) and never an integer."""
    return 1.0 + 5.0 * ((cycle * _GOLDEN) % 1.0)


def physical_to_stored(physical: NDArray[np.float64], profile: SiteProfile) -> NDArray[np.int64]:
    """Invert the modality LUT: stored = round((physical - intercept) / slope), clipped.

    Parameters
    ----------
    physical : numpy.ndarray
        Physical values (e.g. Hounsfield units).
    profile : SiteProfile
        Supplies (0028,1052) Rescale Intercept, (0028,1053) Rescale Slope, (0028,0101) Bits
        Stored and (0028,0103) Pixel Representation.

    Returns
    -------
    numpy.ndarray
        Integer stored values within the range the site's Bits Stored can hold.
    """
    stored = np.rint((physical - profile.rescale_intercept) / profile.rescale_slope)
    lo, hi = profile.stored_range
    return np.clip(stored, lo, hi).astype(np.int64)
