"""Hospital-level (client-level) DP: Flower's server-side fixed-clipping wrapper, accounted.

Opt-in through the run config (``hospital-dp-noise`` > 0, ``hospital-dp-clip``). Each round
Flower's :class:`~flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping` clips
every hospital's model update to L2 norm ``clip``, lets the inner strategy average them with
**equal weights** (the nodes' ``unit-weight``), and adds Gaussian noise of standard deviation
``noise * clip / n`` to the average: a Gaussian mechanism with multiplier ``noise`` on the sum
of clipped updates, for the add-or-remove-one-hospital relation. Each noised release is
composed into Flower's :class:`RdpAccountant` (Google's dp-accounting underneath), with no
sampling amplification. This guarantee protects a whole hospital's contribution and is
reported separately from, and in addition to, each node's patient-level DP.

Why a subclass, not Flower's own accountant argument: Flower accounts only when the inner
strategy is a plain ``FedAvg`` (ours logs, checkpoints and handles refusals), and it skips
the whole aggregation when any node replies with an error (ours must record refusals and
exclude the node). This class therefore hands error replies to the inner strategy's own
bookkeeping, noises what the others sent with the number of hospitals that actually
answered, and composes the accounting events itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from server.strategies.fedavg import VesaliusFedAvg

__all__ = ["HospitalDP", "HospitalLevelDP"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HospitalDP:
    """What the report states about hospital-level DP after a run."""

    noise_multiplier: float
    clipping_norm: float
    delta: float
    epsilon: float
    releases: int

    def to_dict(self) -> dict[str, object]:
        """JSON view for ``report.json["privacy"]["hospital_level"]``."""
        return {
            "unit": "hospital (a whole site's contribution)",
            "mechanism": "server-side fixed clipping of model updates + Gaussian noise "
            "(Flower DifferentialPrivacyServerSideFixedClipping), unweighted average",
            "accountant": "Flower RdpAccountant (dp-accounting), no sampling amplification",
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "releases": self.releases,
        }


class HospitalLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping around :class:`VesaliusFedAvg`, with accounting.

    Parameters
    ----------
    strategy : VesaliusFedAvg
        The inner strategy; it must weight by ``unit-weight`` (equal weights).
    noise_multiplier : float
        Noise standard deviation / ``clipping_norm`` on the sum of updates (> 0).
    clipping_norm : float
        L2 bound of each hospital's model update (> 0).
    num_hospitals : int
        Hospitals in the federation (the accountant's population).
    delta : float
        Delta at which hospital-level epsilon is reported.
    """

    def __init__(
        self,
        strategy: VesaliusFedAvg,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        num_hospitals: int,
        delta: float,
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_hospitals)
        self.inner = strategy
        self.delta = delta
        self.accountant = RdpAccountant(  # type: ignore[assignment]
            PrivacyConfig(
                target_delta=delta,
                population_size=num_hospitals,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        self._accounting = self.accountant
        self.accountant = None  # Flower's own (FedAvg-only) accounting path stays off
        self.releases = 0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record errors with the inner strategy; clip, average and noise the rest.

        The inner strategy's ``aggregate_train`` (called by Flower's wrapper) then handles the
        refusals recorded here: it excludes those nodes, or stops the run, as configured.
        """
        replies = list(replies)
        good = [m for m in replies if not m.has_error()]
        # Flower's wrapper skips a round with any error reply: pass only the good ones on and
        # let the inner strategy record the errors with them (once, named by site).
        self.inner._pending_errors[server_round + self.inner.round_offset] = [
            m for m in replies if m.has_error()]
        if not good:
            return self.inner.aggregate_train(server_round, [])
        # Noise calibrated to the hospitals that actually answered this round.
        self.num_sampled_clients = len(good)
        arrays, metrics = super().aggregate_train(server_round, good)
        if arrays is not None:
            population = self._accounting.config.population_size
            self._accounting.compose(
                GaussianPrivacyEvent(
                    noise_multiplier=self.noise_multiplier,
                    sample_size=min(len(good), population),
                    population_size=population,
                )
            )
            self.releases += 1
            self.inner.latest_arrays = arrays
            self.inner.save_checkpoint(server_round + self.inner.round_offset, arrays)  # the noised model only
        return arrays, metrics

    def restore(self, releases: int) -> None:
        """Compose the releases of an interrupted run (resume) before continuing it.

        Without amplification by sampling a release's cost does not depend on how many
        hospitals answered, so each is composed at the full population.
        """
        population = self._accounting.config.population_size
        for _ in range(releases):
            self._accounting.compose(GaussianPrivacyEvent(
                noise_multiplier=self.noise_multiplier, sample_size=population,
                population_size=population))
        self.releases += releases

    def spent(self) -> HospitalDP:
        """Hospital-level epsilon so far, at ``delta``."""
        eps = self._accounting.get_epsilon(self.delta) if self.releases else 0.0
        return HospitalDP(self.noise_multiplier, self.clipping_norm, self.delta, eps,
                          self.releases)
