"""FedAvg under secure aggregation: the coordinator sees only the survivors' sum.

:class:`SecureFedAvg` extends :class:`~server.strategies.fedavg.VesaliusFedAvg` and keeps
Flower's ``start()`` loop: ``configure_train`` runs the key advertisement and share exchange
of a :class:`~server.strategies.secagg_session.SecAggSession` through the grid and asks the
nodes that shared for a masked reply; ``aggregate_train`` runs the unmasking round trip and
decodes the sum of the survivors' ``n_i * (w_i - w)``, example counts and ``n_i * loss_i``
into the FedAvg model. Dropouts at any stage are tolerated down to the session's threshold
(``secagg-min-survivors``); below it the round is abandoned (the model is kept) and
:attr:`SecureFedAvg.log_rows` says why. When the evaluation asks for score histograms, the
same machinery sums them (``eval-<r>`` sessions), so per-site histograms never leave a node.

Hospital-level DP (``hospital-dp-noise`` > 0) moves inside: each node clips its update to L2
norm ``C`` (unweighted), the coordinator adds Gaussian noise of standard deviation ``z * C``
to the unmasked **sum** and divides by the number of hospitals summed (the survivors), and
each release is composed into Flower's RDP accountant as in
:mod:`server.strategies.hospital_dp`. Flower's DP wrapper cannot be used around this class:
it needs the individual updates, which the coordinator never sees.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from common import messages as k
from common.secagg.layout import Layout
from common.stats.histogram import DEFAULT_BINS, auc_from_histograms
from server.strategies.fedavg import DROPPED_REASON, RoundLog, VesaliusFedAvg
from server.strategies.hospital_dp import HospitalDP
from server.strategies.secagg_session import (
    SecAggSession,
    SecureSum,
    masked_vectors,
    secure_sum,
    with_session,
)

__all__ = ["SecureFedAvg", "SecureHospitalDP"]

log = logging.getLogger(__name__)

TRAIN_INTS = (k.NUM_EXAMPLES, k.UNIT_WEIGHT)
EVAL_INTS = (k.HIST_POSITIVE, k.HIST_NEGATIVE)


@dataclass(frozen=True)
class SecureHospitalDP(HospitalDP):
    """Hospital-level DP applied inside secure aggregation."""

    def to_dict(self) -> dict[str, object]:
        """JSON view for ``report.json["privacy"]["hospital_level"]``."""
        out = super().to_dict()
        out["mechanism"] = ("each node clips its update (L2) before masking; Gaussian noise "
                            "std noise x clip on the securely aggregated sum, divided by the "
                            "survivors; unweighted average")
        return out


class SecureFedAvg(VesaliusFedAvg):
    """FedAvg over secure aggregation (see the module docstring).

    Parameters
    ----------
    min_survivors : int
        ``secagg-min-survivors`` (0 = default, :mod:`common.secagg.params`).
    timeout : float
        Seconds each setup and unmasking round trip waits for replies.
    dp_noise, dp_clip, dp_delta : float
        Hospital-level DP: noise multiplier (0 = off), L2 clip of an update, delta.
    num_hospitals : int
        Hospitals in the federation (the DP accountant's population).
    **kwargs
        Passed to :class:`VesaliusFedAvg` (its weighting is by example count).
    """

    def __init__(self, *, min_survivors: int = 0, timeout: float = 600.0,
                 dp_noise: float = 0.0, dp_clip: float = 0.0, dp_delta: float = 1e-3,
                 num_hospitals: int = 1, neighbours: int = 0, **kwargs: Any) -> None:
        kwargs.pop("weighted_by_key", None)
        super().__init__(weighted_by_key=k.NUM_EXAMPLES, **kwargs)
        self.min_survivors = min_survivors
        self.neighbours = neighbours
        self.timeout = timeout
        self.dp_noise, self.dp_clip, self.dp_delta = dp_noise, dp_clip, dp_delta
        self.log_rows: list[dict[str, Any]] = []  # one per session: report.json
        self._sessions: dict[tuple[int, str], tuple[SecAggSession, Layout]] = {}
        self._sent: dict[int, ArrayRecord] = {}
        self._rng = np.random.default_rng()  # DP noise: never seeded from the plan
        self.releases = 0
        self._warned_pair = False
        self._accounting = RdpAccountant(PrivacyConfig(
            target_delta=dp_delta, population_size=max(num_hospitals, 1),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )) if dp_noise > 0 else None

    # --- sessions ---------------------------------------------------------------------------
    def _open(self, server_round: int, phase: str, messages: list[Message], grid: Grid,
              layout_of: Any) -> list[Message]:
        nodes = [int(m.metadata.dst_node_id) for m in messages]
        if len(nodes) == 2 and not self._warned_pair:
            self._warned_pair = True
            log.warning("secure aggregation over 2 hospitals: each can compute the other's "
                        "contribution from the released sum")
        session = SecAggSession(grid, nodes, f"{phase}-{server_round}",
                                min_survivors=self.min_survivors, timeout=self.timeout,
                                neighbours=self.neighbours)
        session.sites.update(self._known_sites())
        session.sites.update(self.sites)
        row = session.record
        row.update(round=server_round, phase=phase)
        self.log_rows.append(row)
        ok = session.setup()
        self._session_drops(server_round, phase, row, 0)
        if not ok:
            self._sessions.pop((server_round, phase), None)
            self._expected[(server_round, phase)] = []
            return []
        layout: Layout = layout_of(len(session.u2))
        self._sessions[(server_round, phase)] = (session, layout)
        self._expected[(server_round, phase)] = list(session.u2)
        return with_session(messages, session, layout)

    def _session_drops(self, server_round: int, phase: str, record: dict[str, Any],
                       since: int, answered: Iterable[Message] = ()) -> None:
        """Hospitals a secure-aggregation stage lost (from the ``since``-th on): one error row
        each in the round's log, and the report's ``dropped``, named by site.

        A hospital that answered the stage with an error (a refusal under its release rules)
        did not drop out: its own reason becomes its row, from the replies (``answered``).
        """
        rows = record.get("dropped", [])[since:]
        if not rows:
            return
        entry = self._log(server_round)
        known = {(e.get("node_id"), e.get("phase")) for e in entry.errors}
        known |= {(m.metadata.src_node_id, phase) for m in answered if m.has_error()}
        missing = []
        for drop in rows:
            if (int(drop["node_id"]), phase) in known:  # already a row (no masked input)
                continue
            row = {"site": self.sites.get(int(drop["node_id"]), str(drop["site"])),
                   "node_id": int(drop["node_id"]), "phase": phase,
                   "reason": f"{DROPPED_REASON} (secure aggregation, {drop['stage']} stage)"}
            entry.errors.append(row)
            missing.append(row)
        self._note_drops(entry, missing, phase)

    def _known_sites(self) -> dict[int, str]:
        """Site names the nodes gave in earlier rounds (to name a node that drops early)."""
        names: dict[int, str] = {}
        for entry in self.rounds.values():
            for reply in [*entry.train, *entry.evaluate]:
                if not reply.site.startswith("node-"):
                    names[reply.node_id] = reply.site
        return names

    def _close(self, server_round: int, phase: str, replies: list[Message]
               ) -> tuple[Layout, np.ndarray] | None:
        opened = self._sessions.pop((server_round, phase), None)
        if opened is None:
            return None
        session, layout = opened
        before = len(session.record["dropped"])
        total = session.finish(masked_vectors(replies, layout))
        self._session_drops(server_round, phase, session.record, before, replies)
        return None if total is None else (layout, total)

    # --- train ------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample as FedAvg does, run the setup stages, ask the survivors to mask."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        server_round += self.round_offset  # a resumed run numbers its rounds on
        self._sent[server_round] = arrays
        length = sum(int(np.prod(a.shape)) for a in arrays.values())
        return self._open(server_round, "train", messages, grid, lambda n: Layout.plan(
            num_nodes=n, model_length=length, dp_clip=self.dp_clip if self.dp_noise > 0 else 0.0,
            weighted_keys=[k.TRAIN_LOSS], int_keys=TRAIN_INTS, int_lengths=[1, 1]))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the survivors' sum and turn it into the FedAvg (or noised) model."""
        server_round, replies, entry = self._record_train(server_round, replies)
        opened = self._close(server_round, "train", replies)
        sent = self._sent.pop(server_round, None)
        arrays = metrics = None
        row = next((r for r in reversed(self.log_rows)
                    if r.get("round") == server_round and r.get("phase") == "train"), {})
        if opened is not None and sent is not None and row.get("survivors", 0) < self.min_train_nodes:
            opened = None
            row.update(status="abandoned", reason=(
                f"only {row.get('survivors', 0)} hospital(s) summed, fewer than min-nodes = "
                f"{self.min_train_nodes}"))
        if opened is not None and sent is not None:
            arrays, metrics = self._decode_train(server_round, sent, *opened)
        else:  # abandoned: the model stays as it was, and the round says why
            entry.status = "failed"
            entry.failure = (f"{row.get('reason', 'secure aggregation did not complete')}: round "
                             f"{server_round} was not aggregated and the global model is unchanged")
            log.warning("round %d failed: %s", server_round, entry.failure)
        if metrics is not None:
            entry.train_metrics = {key: float(v) for key, v in metrics.items()
                                   if not isinstance(v, list)}
        if arrays is not None:
            self.latest_arrays = arrays
            self.save_checkpoint(server_round, arrays)
        if self.on_update is not None:
            self.on_update(entry, "train")
        self._handle_refusals(entry)
        return arrays, metrics

    def _decode_train(self, server_round: int, sent: ArrayRecord, layout: Layout,
                      total: np.ndarray) -> tuple[ArrayRecord | None, MetricRecord | None]:
        model, floats, ints, _ = layout.split(total)
        examples, hospitals = int(ints[k.NUM_EXAMPLES][0]), int(ints[k.UNIT_WEIGHT][0])
        metrics = MetricRecord({k.NUM_EXAMPLES: examples, k.TRAIN_LOSS: (
            float(floats[0] / examples) if examples else math.nan)})
        if self.dp_noise > 0:
            if hospitals <= 0:
                return None, metrics
            noised = model + self._rng.normal(0.0, self.noise_std(), size=model.shape)
            update = noised / hospitals
            self._account(hospitals)
        else:
            if examples <= 0:
                return None, metrics
            update = model / examples
        out, at = {}, 0
        for key, array in sent.items():
            base = array.numpy()
            size = int(np.prod(base.shape))
            value = base.astype(np.float64) + update[at: at + size].reshape(base.shape)
            at += size
            if not np.issubdtype(base.dtype, np.floating):
                value = np.rint(value)
            out[key] = Array(np.asarray(value, dtype=base.dtype))
        return ArrayRecord(out), metrics

    def noise_std(self) -> float:
        """Standard deviation of the Gaussian noise on the sum of clipped updates: ``z * C``."""
        return self.dp_noise * self.dp_clip

    def _account(self, hospitals: int) -> None:
        assert self._accounting is not None
        population = self._accounting.config.population_size
        self._accounting.compose(GaussianPrivacyEvent(
            noise_multiplier=self.dp_noise, sample_size=min(hospitals, population),
            population_size=population))
        self.releases += 1

    def restore(self, releases: int) -> None:
        """Compose the hospital-level DP releases of an interrupted run (resume).

        Without amplification by sampling a release's cost does not depend on how many
        hospitals were summed, so each is composed at the full population.
        """
        if self._accounting is None:
            return
        population = self._accounting.config.population_size
        for _ in range(releases):
            self._accounting.compose(GaussianPrivacyEvent(
                noise_multiplier=self.dp_noise, sample_size=population,
                population_size=population))
        self.releases += releases

    def spent(self) -> SecureHospitalDP:
        """Hospital-level epsilon so far (``report.json["privacy"]["hospital_level"]``)."""
        eps = (self._accounting.get_epsilon(self.dp_delta)
               if self._accounting is not None and self.releases else 0.0)
        return SecureHospitalDP(self.dp_noise, self.dp_clip, self.dp_delta, eps, self.releases)

    # --- evaluate: the pooled score histograms ----------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """FedAvg's sampling; score histograms, when asked for, are summed securely."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        if not bool(config.get(k.WITH_HISTOGRAMS, False)) or not messages:
            return messages
        return self._open(server_round + self.round_offset, "evaluate", messages, grid, lambda n: Layout.plan(
            num_nodes=n, model_length=0, dp_clip=0.0, int_keys=EVAL_INTS,
            int_lengths=[DEFAULT_BINS, DEFAULT_BINS]))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Pool the clear metrics as FedAvg does, then add the securely summed histograms."""
        replies = list(replies)
        opened = self._close(server_round + self.round_offset, "evaluate", replies)
        on_update, self.on_update = self.on_update, None  # tell listeners once, when complete
        try:
            metrics = super().aggregate_evaluate(server_round, replies)
        finally:
            self.on_update = on_update
        entry = self._log(server_round + self.round_offset)
        if opened is not None and metrics is not None:
            layout, total = opened
            _, _, ints, contributed = layout.split(total)
            if contributed == sum(1 for m in replies if not m.has_error()) and contributed:
                pos, neg = ints[k.HIST_POSITIVE], ints[k.HIST_NEGATIVE]
                metrics[k.HIST_POSITIVE] = [int(v) for v in pos]
                metrics[k.HIST_NEGATIVE] = [int(v) for v in neg]
                metrics[k.AUC_POOLED] = auc_from_histograms(metrics[k.HIST_POSITIVE],
                                                            metrics[k.HIST_NEGATIVE])
                entry.evaluate_metrics[k.AUC_POOLED] = float(metrics[k.AUC_POOLED])
        if self.on_update is not None:
            self.on_update(entry, "evaluate")
        return metrics

    def evaluate_everywhere(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, *,
                            timeout: float) -> RoundLog:
        """The final evaluation on every node, its score histograms summed securely.

        When the secure session is abandoned before any node evaluated, the evaluation is
        asked again without histograms (the pooled AUC is then missing, never per-site
        histograms in the clear).
        """
        if not bool(config.get(k.WITH_HISTOGRAMS, False)):
            return super().evaluate_everywhere(grid, arrays, config, timeout=timeout)
        secure = _SecureEvaluationGrid(grid, self.min_survivors, self.neighbours)
        entry = super().evaluate_everywhere(secure, arrays, config, timeout=timeout)  # type: ignore[arg-type]
        result = secure.result
        if result is not None:
            self.log_rows.append({**result.record, "round": "final", "phase": "evaluate"})
            answered = sum(1 for m in result.replies if not m.has_error())
            if result.sums is not None and answered and result.contributors == answered:
                entry.evaluate_metrics[k.AUC_POOLED] = float(auc_from_histograms(
                    [int(v) for v in result.sums[k.HIST_POSITIVE]],
                    [int(v) for v in result.sums[k.HIST_NEGATIVE]]))
        return entry


class _SecureEvaluationGrid:
    """A grid whose ``send_and_receive`` sums the evaluation histograms securely."""

    def __init__(self, grid: Grid, min_survivors: int, neighbours: int = 0) -> None:
        self.grid = grid
        self.min_survivors = min_survivors
        self.neighbours = neighbours
        self.result: SecureSum | None = None

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        wait = 600.0 if timeout is None else timeout
        self.result = secure_sum(self.grid, messages, int_keys=EVAL_INTS,
                                 int_lengths=[DEFAULT_BINS, DEFAULT_BINS],
                                 min_survivors=self.min_survivors, timeout=wait,
                                 neighbours=self.neighbours)
        if self.result.replies:
            return self.result.replies
        plain = []  # abandoned before anyone evaluated: ask again, without histograms
        for msg in messages:
            content = RecordDict({key: value for key, value in msg.content.items()
                                  if key != k.CONFIG})
            content[k.CONFIG] = ConfigRecord({**dict(msg.content[k.CONFIG]),
                                              k.WITH_HISTOGRAMS: False})
            plain.append(Message(content=content, message_type=msg.metadata.message_type,
                                 dst_node_id=msg.metadata.dst_node_id))
        return self.grid.send_and_receive(messages=plain, timeout=timeout)
