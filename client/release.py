"""Release rules for statistics a node sends in reply to a query.

Every statistic a query releases is declared before any patient value is read, as a
:class:`Statistic` with its **L2 sensitivity per patient** (the largest change adding or
removing one patient can make to the whole vector). The node then follows one of two rules,
chosen by its own configuration (never by the coordinator):

Noised release (``stats-noise-multiplier`` = m > 0)
    Each statistic ``i`` of the release gets Gaussian noise of standard deviation
    ``m x sensitivity_i``, drawn from OS entropy (:class:`numpy.random.SeedSequence` with no
    seed: never a coordinator seed). ``k`` statistics each noised with multiplier ``m``
    compose exactly (Gaussian DP, Dong, Roth & Su 2022) to one Gaussian mechanism with
    multiplier ``m / sqrt(k)``; that is the mechanism charged to the node's ledger
    (``Mechanism(kind="gaussian", noise_multiplier=m / sqrt(k), steps=1)``, release
    ``"query:<name>"``, delta = the node's default for its patient count). The budget is
    checked *before* the data is read (:meth:`ReleaseGuard.authorize`, which raises
    :class:`~common.errors.BudgetExceededError`) and charged after the statistics are computed
    and before they leave (:meth:`ReleaseGuard.release`). Noised counts are rounded and clipped
    at 0 (post-processing, which costs no privacy); no small-count suppression applies.

Exact release (m = 0)
    1. *Minimum cohort.* The whole query is refused (:class:`~common.errors.DataError`, nothing
       released) when the node's held-out patients number fewer than
       ``min-release-count``.
    2. *Small cells.* In every statistic declared ``small_cells=True`` (contingency counts:
       confusion cells, calibration-bin counts, discordant pairs, coverage counts, coarse
       histograms), a cell whose count is in ``1 .. min-release-count - 1`` is released as 0.
       Statistics declared ``linked_to=<count statistic>`` (e.g. the per-bin score sums of a
       calibration bin) are zeroed in the same cells. The reply says how many cells were
       suppressed; pooled estimates are then computed on the suppressed counts (the report
       shows the flag).
    3. Fine score histograms (AUC/DeLong) are exempt from rule 2, which would erase them (on
       ~10,000 bins nearly every occupied cell holds one patient); they are released only
       where the hospital consents (``release-histograms``), as in the evaluate handler.
    An exact release carries no DP guarantee. It is written to the privacy ledger at level
    ``"exact"`` (a Gaussian mechanism with no noise, epsilon infinite), so that the record
    holds every release, and is never composed into the patient-level cap (it would make
    every budget infinite); ``vesalius audit show`` lists these entries per dataset.

Per-patient values never leave: every statistic is a sum over patients, or a vector whose
length the coordinator fixed (bins, features); the handler checks the shapes.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.config import NodeConfig
from common.errors import ConfigError, DataError
from common.privacy import default_delta

__all__ = ["Released", "ReleaseGuard", "Statistic", "file_fingerprint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Statistic:
    """One released statistic, declared before the data is read.

    Parameters
    ----------
    key : str
        Wire key (from :mod:`common.messages`) under which it is released.
    sensitivity : float
        L2 sensitivity of the whole statistic to adding or removing one patient.
    shape : tuple of int
        Shape of the value (``()`` for a scalar); fixed by the query parameters, never by
        the patient count.
    small_cells : bool
        Integer counts subject to small-cell suppression in an exact release.
    linked_to : str or None
        Key of a ``small_cells`` statistic of the same shape whose suppressed cells this
        statistic must also zero (sums that belong to a count cell).
    integer : bool
        Counts: noised values are rounded and clipped at 0.
    """

    key: str
    sensitivity: float
    shape: tuple[int, ...] = ()
    small_cells: bool = False
    linked_to: str | None = None
    integer: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sensitivity) and self.sensitivity > 0):
            raise ConfigError(f"statistic {self.key!r} needs a finite sensitivity > 0")


@dataclass(frozen=True)
class Released:
    """What leaves the node: values by wire key and how they were protected."""

    values: dict[str, float | int | list[float] | list[int]]
    noised: bool
    suppressed_cells: int = 0
    epsilon_after: float | None = None


def file_fingerprint(path: str | Any) -> str:
    """SHA-256 (hex) of a file's bytes: the ledger fingerprint of a tabular dataset."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 16), b""):
            h.update(chunk)
    return "tabular-" + h.hexdigest()


def _budget(node: NodeConfig) -> Any:
    # Imported here: the ledger pulls in Opacus (accounting) and the node key.
    from client.privacy_guard import NodeBudget

    return NodeBudget.for_node(node)


@dataclass
class ReleaseGuard:
    """Applies the node's release rules to one query (see the module docstring).

    Parameters
    ----------
    node : NodeConfig
        The node's own settings (noise multiplier, minimum count, ledger).
    query : str
        Query name (recorded as ``"query:<name>"`` in the ledger).
    statistics : sequence of Statistic
        Everything the query will release.
    num_patients : int
        Held-out patients the statistics are computed on.
    fingerprint : str
        Dataset fingerprint for the ledger.
    run_id : str
        The coordinator's run id (for the ledger; ``"unknown"`` if empty).
    fold : int or None
        Cross-validation fold, if any (for the ledger).
    noise_multiplier : float or None
        Overrides the node's ``stats-noise-multiplier`` for this release: a training release
        whose noise the plan's epsilon sets (the DC-ELM readout, :mod:`client.queries.elm`).
    """

    node: NodeConfig
    query: str
    statistics: Sequence[Statistic]
    num_patients: int
    fingerprint: str
    run_id: str = ""
    fold: int | None = None
    noise_multiplier: float | None = None
    _authorized: bool = field(default=False, init=False)

    @property
    def multiplier(self) -> float:
        """The noise multiplier of every statistic: the override, else the node's own."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        return float(self.node.stats_noise_multiplier)

    @property
    def noised(self) -> bool:
        """Whether this release is noised."""
        return self.multiplier > 0

    @property
    def mechanism_multiplier(self) -> float:
        """Noise multiplier of the single Gaussian mechanism the release composes to."""
        return self.multiplier / math.sqrt(len(self.statistics))

    def _mechanisms(self) -> list[Any]:
        from common.ledger.mechanism import Mechanism

        return [Mechanism(kind="gaussian", noise_multiplier=self.mechanism_multiplier, steps=1)]

    def _entry(self, *, exact: bool = False, suppressed: int = 0) -> Any:
        from common.ledger.entry import LedgerEntry
        from common.ledger.mechanism import Mechanism

        return LedgerEntry(
            fingerprint=self.fingerprint,
            run_id=self.run_id or "unknown",
            release=f"query:{self.query}",
            mechanism=(Mechanism(kind="gaussian", noise_multiplier=0.0, steps=1) if exact
                       else self._mechanisms()[0]),
            delta=default_delta(max(self.num_patients, 1)),
            dataset_size=int(self.num_patients),
            fold=self.fold,
            level="exact" if exact else "patient",
            params={
                "stats-noise-multiplier": self.multiplier,
                "statistics": len(self.statistics),
                "suppressed-cells": int(suppressed),
            },
        )

    def authorize(self) -> None:
        """Check the release may happen at all; call before reading any patient value.

        Raises
        ------
        BudgetExceededError
            Noised: the charge would take the node's ledger past its epsilon cap.
        DataError
            Exact: fewer held-out patients than ``min-release-count``.
        """
        keys = [s.key for s in self.statistics]
        if not keys or len(set(keys)) != len(keys):
            raise ConfigError("a release needs distinct, non-empty statistics")
        if self.noised:
            _budget(self.node).check(
                self.fingerprint, self._mechanisms(),
                delta=default_delta(max(self.num_patients, 1)),
            )
        elif self.num_patients < self.node.min_release_count:
            raise DataError(
                f"{self.num_patients} patients < min-release-count "
                f"{self.node.min_release_count}",
                safe_reason=f"refused: fewer held-out patients than this node's minimum "
                f"release count ({self.node.min_release_count})",
            )
        self._authorized = True

    def _checked(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        declared = {s.key for s in self.statistics}
        if set(values) != declared:
            raise ConfigError(
                f"query {self.query!r} computed {sorted(values)} but declared {sorted(declared)}"
            )
        out: dict[str, np.ndarray] = {}
        for s in self.statistics:
            arr = np.asarray(values[s.key], dtype=np.float64)
            if arr.shape != s.shape:
                raise ConfigError(
                    f"statistic {s.key!r} has shape {arr.shape}, declared {s.shape}"
                )
            if not np.all(np.isfinite(arr)):
                raise DataError(f"statistic {s.key!r} is not finite",
                                safe_reason="the node's statistics were not finite")
            out[s.key] = arr
        return out

    def _noise(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(np.random.SeedSequence())  # OS entropy, never a given seed
        out: dict[str, np.ndarray] = {}
        m = self.multiplier
        for s in self.statistics:
            noisy = arrays[s.key] + rng.normal(0.0, m * s.sensitivity, size=s.shape)
            out[s.key] = np.maximum(np.round(noisy), 0.0) if s.integer else noisy
        return out

    def _suppress(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        threshold = self.node.min_release_count
        masks: dict[str, np.ndarray] = {}
        for s in self.statistics:
            if s.small_cells:
                a = arrays[s.key]
                masks[s.key] = (a >= 1) & (a < threshold)
        out = dict(arrays)
        for s in self.statistics:
            mask = masks.get(s.key if s.small_cells else (s.linked_to or ""))
            if mask is not None and mask.any():
                arr = out[s.key].copy()
                arr[mask] = 0.0
                out[s.key] = arr
        return out, int(sum(int(m.sum()) for m in masks.values()))

    def release(self, values: Mapping[str, Any]) -> Released:
        """Apply noise (and charge the ledger) or suppression; return what may leave."""
        if not self._authorized:
            raise ConfigError("ReleaseGuard.release called before authorize()")
        arrays = self._checked(values)
        epsilon_after: float | None = None
        suppressed = 0
        if self.noised:
            # Charge first: if the ledger refuses, nothing is released.
            epsilon_after = float(_budget(self.node).charge(self._entry()))
            arrays = self._noise(arrays)
        else:
            arrays, suppressed = self._suppress(arrays)
            _budget(self.node).ledger.append(self._entry(exact=True, suppressed=suppressed))
            log.info(
                "exact (non-DP) release query:%s run=%s patients=%d suppressed-cells=%d "
                "(ledger level 'exact')",
                self.query, self.run_id, self.num_patients, suppressed,
            )
        out: dict[str, float | int | list[float] | list[int]] = {}
        for s in self.statistics:
            arr = arrays[s.key]
            as_int = s.integer
            if arr.ndim == 0:
                out[s.key] = int(arr) if as_int else float(arr)
            else:
                flat = arr.ravel()
                out[s.key] = [int(v) for v in flat] if as_int else [float(v) for v in flat]
        return Released(out, self.noised, suppressed, epsilon_after)
