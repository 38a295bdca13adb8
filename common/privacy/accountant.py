"""Privacy accounting for patient-level DP-SGD, built on Opacus's accountants.

The unit of privacy is the **patient**: every dataset handed to the trainer holds one record
per patient, so ``num_records`` below is a patient count and the (epsilon, delta) guarantee
protects the presence or absence of one patient's whole record.

The accountant's state is a plain tuple of events ``(noise_multiplier, sample_rate, steps)``
(the same triples Opacus keeps in ``accountant.history``). It is serialisable to a Flower
``ConfigRecord`` so that a node can restore it every time Flower recreates the ClientApp and
epsilon composes across rounds, runs and folds. Epsilon is always recomputed from the events
with Opacus's RDP accountant (Mironov, "Renyi Differential Privacy", CSF 2017; Mironov, Talwar
& Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019) or its PRV
accountant (Gopi, Lee & Wutschitz, "Numerical Composition of Differential Privacy", 2021).

Caveat: the guarantee assumes Poisson sampling with the recorded ``sample_rate`` (Opacus's
``DPDataLoader``); shuffled fixed-size batches do not enjoy the amplification assumed here.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import Domain
from opacus.accountants.utils import get_noise_multiplier

from common.errors import PrivacyConfigError

__all__ = [
    "AccountantName",
    "AccountantState",
    "PrivacyEvent",
    "default_delta",
    "epsilon",
    "plan_noise_multiplier",
    "planned_epsilon",
    "sample_rate",
    "steps_per_epoch",
]

logger = logging.getLogger(__name__)

AccountantName = Literal["rdp", "prv"]

KEY_NOISE_MULTIPLIER = "noise-multiplier"
KEY_SAMPLE_RATE = "sample-rate"
KEY_STEPS = "steps"

_MAX_SIGMA = 1e4
"""Largest noise multiplier the planner searches; beyond it a target is deemed unreachable."""


@dataclass(frozen=True)
class PrivacyEvent:
    """``steps`` DP-SGD steps at one noise multiplier and Poisson sample rate.

    Attributes
    ----------
    noise_multiplier : float
        Noise standard deviation divided by the clipping norm (sigma); >= 0.
    sample_rate : float
        Poisson sampling probability of each patient per step, in (0, 1].
    steps : int
        Number of steps; >= 0.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        try:
            noise, rate = float(self.noise_multiplier), float(self.sample_rate)
            steps_ok = not isinstance(self.steps, bool) and int(self.steps) == self.steps
        except (TypeError, ValueError) as exc:
            raise PrivacyConfigError(
                f"privacy event values must be numbers, got ({self.noise_multiplier!r}, "
                f"{self.sample_rate!r}, {self.steps!r})"
            ) from exc
        _check_noise(noise)
        _check_rate(rate)
        if not steps_ok or self.steps < 0:
            raise PrivacyConfigError(f"steps must be a non-negative integer, got {self.steps!r}")
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "noise_multiplier", noise)
        object.__setattr__(self, "sample_rate", rate)


@dataclass(frozen=True)
class AccountantState:
    """Immutable history of privacy events; the input to every epsilon computation.

    Attributes
    ----------
    events : tuple of PrivacyEvent
        Events in the order they happened. Order does not change RDP epsilon.
    """

    events: tuple[PrivacyEvent, ...] = ()

    @classmethod
    def from_history(cls, history: Iterable[Sequence[float]]) -> AccountantState:
        """Build a state from Opacus ``accountant.history`` triples."""
        return cls(
            tuple(PrivacyEvent(float(nm), float(q), int(s)) for nm, q, s in history)
        )

    def to_history(self) -> list[tuple[float, float, int]]:
        """Return the events as Opacus ``accountant.history`` triples (a fresh list)."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.events]

    def with_event(
        self, *, noise_multiplier: float, sample_rate: float, steps: int
    ) -> AccountantState:
        """Return a new state with one more event (zero-step events are dropped)."""
        event = PrivacyEvent(noise_multiplier, sample_rate, steps)
        if event.steps == 0:
            return self
        return AccountantState(self.events + (event,))

    @property
    def total_steps(self) -> int:
        """Total number of recorded steps."""
        return sum(e.steps for e in self.events)

    def to_record(self) -> dict[str, list[float] | list[int]]:
        """Serialise to a dict of equal-length lists, fit for a Flower ``ConfigRecord``.

        Keys are ``"noise-multiplier"``, ``"sample-rate"`` (floats) and ``"steps"``
        (integers); an empty history gives three empty lists.
        """
        return {
            KEY_NOISE_MULTIPLIER: [e.noise_multiplier for e in self.events],
            KEY_SAMPLE_RATE: [e.sample_rate for e in self.events],
            KEY_STEPS: [e.steps for e in self.events],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> AccountantState:
        """Inverse of :meth:`to_record`.

        Raises
        ------
        PrivacyConfigError
            If a key is missing, the lists differ in length, or a value is invalid.
        """
        try:
            nms = list(record[KEY_NOISE_MULTIPLIER])  # type: ignore[call-overload]
            rates = list(record[KEY_SAMPLE_RATE])  # type: ignore[call-overload]
            steps = list(record[KEY_STEPS])  # type: ignore[call-overload]
        except (KeyError, TypeError) as exc:
            raise PrivacyConfigError(
                "accountant record needs list values under "
                f"{KEY_NOISE_MULTIPLIER!r}, {KEY_SAMPLE_RATE!r} and {KEY_STEPS!r}"
            ) from exc
        if not len(nms) == len(rates) == len(steps):
            raise PrivacyConfigError(
                f"accountant record lists differ in length ({len(nms)}, {len(rates)}, "
                f"{len(steps)}); the record is corrupt"
            )
        return cls(tuple(PrivacyEvent(nm, q, s) for nm, q, s in zip(nms, rates, steps)))


def _check_noise(noise_multiplier: float) -> None:
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise PrivacyConfigError(
            f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}"
        )


def _check_rate(rate: float) -> None:
    if not math.isfinite(rate) or not 0.0 < rate <= 1.0:
        raise PrivacyConfigError(f"sample_rate must lie in (0, 1], got {rate!r}")


def _check_delta(delta: float) -> None:
    if not math.isfinite(delta) or not 0.0 < delta < 1.0:
        raise PrivacyConfigError(
            f"delta must lie in (0, 1), got {delta!r}; use default_delta(num_patients)"
        )


class _CachedPRVAccountant(PRVAccountant):
    """Opacus's PRV accountant with its discretisation domain from the cached RDP curves.

    Opacus sizes the PRV domain (``compute_safe_domain_size``, Gopi et al., remark 5.6) with
    fresh ``RDPAccountant`` evaluations at fractional orders: ~0.7 s of pure Python per call
    on this machine, ~95 % of a PRV epsilon. The same curves are already cached here for the
    RDP epsilon every round computes, so this override repeats Opacus's arithmetic (same
    orders, same deltas, same ``max(L, eps_error) + 3``) on them; a test pins the result to
    the stock accountant's.
    """

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):  # noqa: ANN001
        events = tuple(
            PrivacyEvent(prv.noise_multiplier, prv.sample_rate, int(steps))
            for prv, steps in zip(prvs, num_self_compositions)
        )
        total = sum(num_self_compositions)
        size = _rdp_epsilon(events, delta_error / 4)
        for event in events:
            one = PrivacyEvent(event.noise_multiplier, event.sample_rate, 1)
            size = max(size, _rdp_epsilon((one,), delta_error / (8 * total)))
        size = max(size, eps_error) + 3
        mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        return Domain.create_aligned(-size, size, mesh_size)


def _make_accountant(name: str) -> IAccountant:
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return _CachedPRVAccountant()
    raise PrivacyConfigError(f"accountant must be 'rdp' or 'prv', got {name!r}")


def epsilon(state: AccountantState, *, delta: float, accountant: AccountantName = "rdp") -> float:
    """Return the total epsilon spent by ``state`` at ``delta``.

    Parameters
    ----------
    state : AccountantState
        Event history.
    delta : float
        Target delta, in (0, 1).
    accountant : {"rdp", "prv"}, optional
        Opacus accounting method. RDP is the project's mechanism of record; PRV gives a
        tighter numerical estimate for comparison.

    Returns
    -------
    float
        Epsilon; 0.0 for an empty history, ``inf`` if an event has zero noise.
    """
    _check_delta(delta)
    events = [e for e in state.events if e.steps > 0]
    if not events:
        return 0.0
    if any(e.noise_multiplier == 0.0 for e in events):
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(tuple(events), delta)
    acc = _make_accountant(accountant)
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    with np.errstate(divide="ignore"):  # Opacus's PRV takes log(0) at the domain's edge
        return float(acc.get_epsilon(delta=delta))


_RDP_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP curve of one subsampled-Gaussian step over Opacus's default orders (cached).

    Opacus's ``compute_rdp(q, sigma, steps, orders)`` is ``steps`` times this curve, and its
    fractional orders are slow to evaluate (~0.25 s a curve here), so every caller that
    re-evaluates the same event (each round re-checks the budget) reuses it.
    """
    curve = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_RDP_ORDERS
    )
    curve = np.asarray(curve, dtype=np.float64)
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(events: tuple[PrivacyEvent, ...], delta: float) -> float:
    """Same arithmetic as ``RDPAccountant.get_epsilon`` (sum of per-event curves), cached."""
    rdp = sum(_rdp_per_step(e.sample_rate, e.noise_multiplier) * e.steps for e in events)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha"
        eps, _ = rdp_analysis.get_privacy_spent(orders=_RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def planned_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    prior: AccountantState | None = None,
) -> float:
    """Return the total RDP epsilon after ``prior`` plus ``steps`` new steps.

    This is what running a plan would spend in total (prior spend included).
    """
    state = (prior or AccountantState()).with_event(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
    )
    return epsilon(state, delta=delta, accountant="rdp")


@functools.lru_cache(maxsize=256)
def plan_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: AccountantState | None = None,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Return the smallest noise multiplier keeping the total RDP epsilon within a target.

    Parameters
    ----------
    target_epsilon : float
        Total epsilon allowed after the prior events and the new steps; > 0.
    delta : float
        Target delta, in (0, 1).
    sample_rate : float
        Poisson sample rate of the new steps, in (0, 1].
    steps : int
        Number of new steps; >= 1.
    prior : AccountantState, optional
        Events already spent (earlier rounds, runs or folds).
    epsilon_tolerance : float, optional
        The returned sigma spends between ``target_epsilon - epsilon_tolerance`` and
        ``target_epsilon`` (RDP), up to the search's resolution.

    Returns
    -------
    float
        Noise multiplier (sigma).

    Raises
    ------
    PrivacyConfigError
        If ``target_epsilon <= 0``, an argument is out of range, or the prior spend already
        reaches the target so that no finite noise keeps the total within it.
    """
    if not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise PrivacyConfigError(
            f"target_epsilon must be a finite number > 0, got {target_epsilon!r}"
        )
    _check_delta(delta)
    _check_rate(sample_rate)
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise PrivacyConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if epsilon_tolerance <= 0:
        raise PrivacyConfigError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance!r}")
    prior = prior or AccountantState()
    if not prior.events:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # loose bounds while searching
                return float(
                    get_noise_multiplier(
                        target_epsilon=target_epsilon,
                        target_delta=delta,
                        sample_rate=sample_rate,
                        steps=int(steps),
                        accountant="rdp",
                        epsilon_tolerance=epsilon_tolerance,
                    )
                )
        except ValueError as exc:
            raise PrivacyConfigError(
                f"target_epsilon={target_epsilon} is unreachable at delta={delta}, "
                f"sample_rate={sample_rate}, steps={steps}: raise the target or lower steps"
            ) from exc
    return _bisect_sigma(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=int(steps),
        prior=prior,
        epsilon_tolerance=epsilon_tolerance,
    )


def _bisect_sigma(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: AccountantState,
    epsilon_tolerance: float,
) -> float:
    """Bisection on sigma of the composed RDP epsilon (monotone decreasing in sigma)."""
    spent = epsilon(prior, delta=delta)
    if spent >= target_epsilon:
        raise PrivacyConfigError(
            f"the prior spend (epsilon={spent:.4g}) already reaches target_epsilon="
            f"{target_epsilon}; no further training fits this budget"
        )

    def total(sigma: float) -> float:
        new = PrivacyEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
        return _rdp_epsilon((*prior.events, new), delta)

    # Geometric bracket around sigma = 1 (small sigmas are the slow ones to evaluate).
    low, high = 0.5, 1.0
    if total(high) > target_epsilon:
        while total(high) > target_epsilon:
            low, high = high, 2.0 * high
            if high > _MAX_SIGMA:
                raise PrivacyConfigError(
                    f"target_epsilon={target_epsilon} is unreachable: prior spend {spent:.4g} "
                    f"plus {steps} steps needs sigma > {_MAX_SIGMA:g}; raise the target or "
                    "lower steps"
                )
    else:
        while low > 1e-3 and total(low) <= target_epsilon:
            low, high = 0.5 * low, low
    eps_high = total(high)
    while target_epsilon - eps_high > epsilon_tolerance and high - low > 1e-9:
        mid = 0.5 * (low + high)
        eps_mid = total(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    logger.debug("planned sigma=%.6g for total epsilon %.6g", high, eps_high)
    return high


def default_delta(num_records: int) -> float:
    """Return the default delta for ``num_records`` patients: ``min(1e-5, 1 / (10 n))``.

    Delta bounds the probability that the epsilon guarantee fails; it must sit well below
    ``1 / n`` (n = number of patients, the unit of privacy), otherwise a mechanism that
    publishes one patient's record outright would satisfy the guarantee.

    Raises
    ------
    PrivacyConfigError
        If ``num_records < 1``.
    """
    if num_records < 1:
        raise PrivacyConfigError(f"num_records (patients) must be >= 1, got {num_records}")
    return min(1e-5, 1.0 / (10.0 * num_records))


def steps_per_epoch(num_records: int, batch_size: int) -> int:
    """Return DP-SGD steps per epoch, as Opacus's Poisson ``DPDataLoader`` takes them.

    Opacus converts a loader of ``ceil(n / batch_size)`` batches into as many Poisson batches.
    """
    _check_sizes(num_records, batch_size)
    return math.ceil(num_records / batch_size)


def sample_rate(num_records: int, batch_size: int) -> float:
    """Return the Poisson sample rate Opacus uses: ``1 / ceil(n / batch_size)``."""
    return 1.0 / steps_per_epoch(num_records, batch_size)


def _check_sizes(num_records: int, batch_size: int) -> None:
    if num_records < 1:
        raise PrivacyConfigError(f"num_records (patients) must be >= 1, got {num_records}")
    if batch_size < 1:
        raise PrivacyConfigError(f"batch_size must be >= 1, got {batch_size}")
