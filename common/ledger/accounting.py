"""Epsilon of ledger mechanisms: Opacus (the node's) and dp_accounting (the auditor's).

Both functions compose every mechanism with Rényi DP (Mironov, "Rényi Differential Privacy",
CSF 2017) and convert the composed RDP curve to (epsilon, delta)-DP at one delta:

* :func:`epsilon_of` is the node's accounting of record. Subsampled-Gaussian and Gaussian
  curves come from Opacus's analysis (Mironov, Talwar & Zhang 2019), through the cached
  per-step curves of :mod:`common.privacy.accountant`, so that a ledger total equals what
  :func:`client.training.train_dp` reports for the same events. ``accountant="prv"`` gives
  Opacus's PRV estimate (Gopi, Lee & Wutschitz 2021) for reports.
* :func:`epsilon_independent` recomputes the same quantity with Google's ``dp_accounting``
  (``RdpAccountant`` with ``PoissonSampledDpEvent(GaussianDpEvent)``, ``GaussianDpEvent`` and
  ``LaplaceDpEvent``), a separate implementation of the curves and of the conversion, for
  auditors. It is evaluated on Opacus's grid of RDP orders so that a disagreement points at
  the analysis, not at the grid (on dp_accounting's own grid, which adds orders 11 and
  128-1024, it can differ by a few percent for small epsilons).

Laplace mechanisms
------------------
Opacus has no Laplace analysis, so :func:`epsilon_of` adds the exact RDP curve of the Laplace
mechanism (Mironov 2017, Proposition 6) on the same orders; ``dp_accounting`` uses that same
proposition, independently implemented. Composition in RDP then conversion is a valid upper
bound; for a single Laplace release it can exceed the pure epsilon by about
``log(1/delta) / (max order - 1)`` (conservative). For ``accountant="prv"`` the Laplace
releases are added by basic composition (epsilon_gaussian_prv + sum of Laplace epsilons, at
the same delta) and the result is capped by the RDP value: both are valid bounds.

Delta
-----
Every mechanism is composed at one ``delta``; a ledger composes a dataset at the smallest
delta any of its entries recorded (the most conservative choice).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.errors import PrivacyConfigError
from common.ledger.mechanism import Mechanism
from common.privacy.accountant import _RDP_ORDERS, _rdp_per_step

__all__ = [
    "DEFAULT_TOLERANCE",
    "epsilon_independent",
    "epsilon_of",
    "epsilons_agree",
    "laplace_rdp",
]

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.01
"""Relative tolerance of :func:`epsilons_agree` (1 %). Measured gaps between Opacus and
dp_accounting on the same orders: below 1e-7 for typical DP-SGD plans (q=0.01, sigma=1.1,
1000 steps), 0.25 % at q=0.1, sigma=0.8 (where dp_accounting drops orders whose series does
not converge), 0 for the plain Gaussian mechanism."""

_ORDERS = np.asarray(_RDP_ORDERS, dtype=np.float64)


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise PrivacyConfigError(f"delta must lie in (0, 1), got {delta!r}")


def _aggregate(mechanisms: Sequence[Mechanism]) -> dict[tuple[str, float, float, float], int]:
    """Sum the steps of identical mechanisms (RDP composes additively, so order is irrelevant)."""
    steps: dict[tuple[str, float, float, float], int] = {}
    for mech in mechanisms:
        if not isinstance(mech, Mechanism):
            raise PrivacyConfigError(f"expected Mechanism objects, got {type(mech).__name__}")
        if mech.steps == 0:
            continue
        key = (mech.kind, mech.noise_multiplier, mech.sample_rate, mech.epsilon)
        steps[key] = steps.get(key, 0) + mech.steps
    return steps


def laplace_rdp(epsilon: float, orders: npt.ArrayLike = _ORDERS) -> npt.NDArray[np.float64]:
    """RDP curve of one epsilon-DP Laplace mechanism (Mironov 2017, Proposition 6).

    For Laplace noise of scale ``b = sensitivity / epsilon`` and order ``a > 1``::

        RDP(a) = log( a/(2a-1) * exp((a-1) * eps) + (a-1)/(2a-1) * exp(-a * eps) ) / (a-1)

    Written here (in log space) because Opacus analyses Gaussian mechanisms only.
    """
    a = np.asarray(orders, dtype=np.float64)
    if np.any(a <= 1):
        raise PrivacyConfigError("Laplace RDP is evaluated at orders > 1 only")
    first = np.log(a / (2 * a - 1)) + (a - 1) * epsilon
    second = np.log((a - 1) / (2 * a - 1)) - a * epsilon
    curve: npt.NDArray[np.float64] = np.logaddexp(first, second) / (a - 1)
    return curve


def _rdp_curve(steps: dict[tuple[str, float, float, float], int]) -> npt.NDArray[np.float64]:
    total = np.zeros_like(_ORDERS)
    for (kind, sigma, rate, eps), count in steps.items():
        if kind == "laplace":
            total = total + laplace_rdp(eps) * count
        else:
            total = total + _rdp_per_step(rate, sigma) * count
    return total


def _rdp_to_epsilon(curve: npt.NDArray[np.float64], delta: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha"
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(_RDP_ORDERS), rdp=curve, delta=delta)
    return float(eps)


def epsilon_of(
    mechanisms: Sequence[Mechanism],
    *,
    delta: float,
    accountant: Literal["rdp", "prv"] = "rdp",
) -> float:
    """Return the epsilon of composing all ``mechanisms`` at ``delta`` (Opacus's analysis).

    Parameters
    ----------
    mechanisms : sequence of Mechanism
        Releases to compose; zero-step mechanisms count for nothing.
    delta : float
        Delta of the guarantee, in (0, 1).
    accountant : {"rdp", "prv"}, optional
        ``"rdp"`` (the node's accounting of record; fast, cached curves) or ``"prv"`` (Opacus's
        PRV estimate for reports; slower). See the module docstring for Laplace mechanisms.

    Returns
    -------
    float
        Epsilon; 0.0 for no steps; ``inf`` if a Gaussian mechanism has no noise; ``nan`` when
        the PRV accountant cannot evaluate the composition (logged).

    Raises
    ------
    PrivacyConfigError
        For a delta outside (0, 1), a non-Mechanism item or an unknown accountant.
    """
    _check_delta(delta)
    if accountant not in ("rdp", "prv"):
        raise PrivacyConfigError(f"accountant must be 'rdp' or 'prv', got {accountant!r}")
    steps = _aggregate(mechanisms)
    if not steps:
        return 0.0
    if any(kind != "laplace" and sigma == 0.0 for kind, sigma, _, _ in steps):
        return math.inf
    rdp_eps = _rdp_to_epsilon(_rdp_curve(steps), delta)
    if accountant == "rdp":
        return rdp_eps
    return min(rdp_eps, _prv_epsilon(steps, delta))


def _prv_epsilon(steps: dict[tuple[str, float, float, float], int], delta: float) -> float:
    history = [
        (sigma, rate, count)
        for (kind, sigma, rate, _), count in steps.items()
        if kind != "laplace"
    ]
    laplace = sum(eps * count for (kind, _, _, eps), count in steps.items() if kind == "laplace")
    if not history:
        return float(laplace)
    prv = PRVAccountant()
    prv.history = history
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gaussian = float(prv.get_epsilon(delta=delta))
    except (ValueError, RuntimeError, OverflowError, FloatingPointError) as exc:
        log.warning("PRV accountant could not evaluate this composition (%s)", exc)
        return math.nan
    return gaussian + float(laplace)


def epsilon_independent(mechanisms: Sequence[Mechanism], *, delta: float) -> float:
    """Return the RDP epsilon of ``mechanisms`` computed with Google's ``dp_accounting``.

    The same quantity as ``epsilon_of(mechanisms, delta=delta)`` from a different library:
    ``dp_accounting.rdp.RdpAccountant`` (on Opacus's orders) composing
    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``,
    ``SelfComposedDpEvent(GaussianDpEvent(sigma), steps)`` and
    ``SelfComposedDpEvent(LaplaceDpEvent(1 / epsilon), steps)`` (Laplace noise of scale
    ``1 / epsilon`` at sensitivity 1 is epsilon-DP).

    Returns
    -------
    float
        Epsilon; 0.0 for no steps, ``inf`` if a Gaussian mechanism has no noise.
    """
    from dp_accounting.rdp import RdpAccountant  # deferred: only auditors need it

    _check_delta(delta)
    steps = _aggregate(mechanisms)
    if not steps:
        return 0.0
    if any(kind != "laplace" and sigma == 0.0 for kind, sigma, _, _ in steps):
        return math.inf
    acc = RdpAccountant(orders=list(_RDP_ORDERS))
    # dp_accounting logs (through absl) every fractional order whose series does not converge
    # and drops it, which only makes its epsilon larger (conservative); keep that at DEBUG.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return _compose_independent(acc, steps, delta)
    finally:
        absl_logger.setLevel(level)


def _compose_independent(
    acc: Any, steps: dict[tuple[str, float, float, float], int], delta: float
) -> float:
    import dp_accounting

    for (kind, sigma, rate, eps), count in steps.items():
        event: dp_accounting.DpEvent
        if kind == "laplace":
            event = dp_accounting.LaplaceDpEvent(noise_multiplier=1.0 / eps)
        elif kind == "gaussian":
            event = dp_accounting.GaussianDpEvent(noise_multiplier=sigma)
        else:
            event = dp_accounting.PoissonSampledDpEvent(
                sampling_probability=rate, event=dp_accounting.GaussianDpEvent(sigma)
            )
        acc.compose(dp_accounting.SelfComposedDpEvent(event=event, count=count))
    return float(acc.get_epsilon(target_delta=delta))


def epsilons_agree(a: float, b: float, *, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """True when ``|a - b| <= tolerance * max(|a|, |b|) + 1e-9`` (two infinities agree)."""
    if math.isnan(a) or math.isnan(b):
        return False
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tolerance * max(abs(a), abs(b)) + 1e-9
