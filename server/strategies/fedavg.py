"""FedAvg that keeps a per-site record of every round, checkpoints, and pools histograms.

It extends Flower's Message-API :class:`flwr.serverapp.strategy.FedAvg` without copying its
loop: aggregation is Flower's; this class only looks at the replies on the way in.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import messages as k
from common.stats.histogram import auc_from_histograms

log = logging.getLogger(__name__)


class RunStopped(Exception):
    """Raised from inside Flower's round loop to end a run early, on purpose.

    The coordinator catches it and writes a report whose status is ``"stopped"`` and whose
    reason is this exception's message (e.g. a node refused the plan and the run config says
    ``on-refusal = "stop"``).
    """


@dataclass
class SiteReply:
    """What one site released in one round (numbers only, no patient data)."""

    site: str
    node_id: int
    metrics: dict[str, float]
    ledger_head: str = ""  # "INDEX:HASH" the node reported (an audit anchor), if any


@dataclass
class RoundLog:
    """Everything the coordinator learned in one round."""

    round: int
    train: list[SiteReply] = field(default_factory=list)
    evaluate: list[SiteReply] = field(default_factory=list)
    errors: list[dict[str, object]] = field(default_factory=list)
    refusals: list[dict[str, object]] = field(default_factory=list)
    train_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_metrics: dict[str, float] = field(default_factory=dict)
    #: ``"aggregated"``, or ``"failed"`` when fewer than min-nodes training results arrived
    #: (the global model is then unchanged); ``failure`` says why.
    status: str = "aggregated"
    failure: str = ""


#: What an error row says of a node that stopped answering (the SuperLink's own error reply:
#: no heartbeat), whatever Flower's wording.
DROPPED_REASON = "the node stopped answering (no heartbeat; it may have crashed or lost its link)"
TIMEOUT_REASON = "no reply within the round timeout"


def _site(msg: Message) -> str:
    info = msg.content.get(k.NODE_INFO)
    if isinstance(info, ConfigRecord) and k.SITE in info:
        return str(info[k.SITE])
    return f"node-{msg.metadata.src_node_id}"


def _trained(msg: Message) -> bool:
    """A training result that counts towards min-nodes: it carries weights and metrics (the
    held-out site of leave-one-site-out, which trains nothing, does not count)."""
    metrics = msg.content.get(k.METRICS)
    if not isinstance(metrics, MetricRecord) or not isinstance(msg.content.get(k.ARRAYS),
                                                              ArrayRecord):
        return False
    return float(cast(float, metrics.get(k.UNIT_WEIGHT, 1))) > 0


_SITE_PREFIX = re.compile(r"^\[([\w .\-]{1,64})\] ")


def site_of_error(msg: Message) -> str:
    """The site that sent an error reply: nodes prefix their reasons with ``[site-name]``.

    An error reply carries no records, so the prefix is the only place the site is named;
    without one the node is named by its Flower node id.
    """
    match = _SITE_PREFIX.match(msg.error.reason or "")
    return match.group(1) if match else f"node-{msg.metadata.src_node_id}"


def _ledger_head(msg: Message) -> str:
    info = msg.content.get(k.NODE_INFO)
    if isinstance(info, ConfigRecord) and k.LEDGER_HEAD in info:
        return str(info[k.LEDGER_HEAD])
    return ""


def _scalars(record: MetricRecord) -> dict[str, float]:
    return {key: float(v) for key, v in record.items() if not isinstance(v, list)}


def pool_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Aggregate evaluate/train metrics: NaN-aware weighted means; histograms summed.

    Per-node quantities (epsilon, delta, ...) are not averaged: they are reported per site.
    When every reply carries score histograms, ``auc-pooled`` is the AUC of the pooled scores.
    Metrics that only some replies carry are left out.
    """
    metrics = [cast(MetricRecord, r[k.METRICS]) for r in records]
    weights = np.array([float(cast(float, m[weight_key])) for m in metrics])
    out = MetricRecord({weight_key: int(weights.sum())})
    # Only keys every reply carries: a node may decline to release some (e.g. histograms).
    common_keys = set(metrics[0].keys()).intersection(*(m.keys() for m in metrics[1:]))
    keys = [key for key in metrics[0].keys() if key in common_keys and key != weight_key]
    for key in keys:
        if key in k.PER_NODE_METRICS:
            continue
        if key in k.HISTOGRAM_METRICS:
            total = np.sum([np.asarray(m[key], dtype=np.int64) for m in metrics], axis=0)
            out[key] = [int(v) for v in total]
            continue
        values = np.array([float(cast(float, m[key])) for m in metrics])
        ok = ~np.isnan(values)
        out[key] = float(np.average(values[ok], weights=weights[ok])) if ok.any() else math.nan
    if k.HIST_POSITIVE in out and k.HIST_NEGATIVE in out:
        out[k.AUC_POOLED] = auc_from_histograms(out[k.HIST_POSITIVE], out[k.HIST_NEGATIVE])
    return out


class VesaliusFedAvg(FedAvg):
    """FedAvg with per-site logging, per-round checkpoints and histogram pooling.

    Parameters
    ----------
    checkpoint_dir : Path or None
        Where ``round-<r>.pt`` global-model checkpoints are written.
    on_update : callable or None
        Called with the round's :class:`RoundLog` and the phase that just finished
        ("train" or "evaluate"), so that a report can be written before anything else runs.
    on_refusal : {"exclude", "stop"}
        When a node refuses a train message (its budget or policy), either leave that node
        out of every later message of the run, or stop the run after recording the round.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(
        self,
        *,
        checkpoint_dir: Path | None = None,
        on_update: Callable[[RoundLog, str], None] | None = None,
        on_refusal: str = "exclude",
        weighted_by_key: str = k.NUM_EXAMPLES,
        checkpoint_in_aggregate: bool = True,
        **kwargs: object,
    ) -> None:
        super().__init__(
            arrayrecord_key=k.ARRAYS,
            configrecord_key=k.CONFIG,
            weighted_by_key=weighted_by_key,
            train_metrics_aggr_fn=pool_metrics,
            evaluate_metrics_aggr_fn=pool_metrics,
            **kwargs,  # type: ignore[arg-type]
        )
        self.checkpoint_dir = checkpoint_dir
        self.on_update = on_update
        self.rounds: dict[int, RoundLog] = {}
        self._expected: dict[tuple[int, str], list[int]] = {}
        self.on_refusal = on_refusal
        self.excluded: dict[int, str] = {}  # node id -> the reason it gave when refusing
        # False when a DP wrapper noises the aggregate afterwards and checkpoints it itself.
        self.checkpoint_in_aggregate = checkpoint_in_aggregate
        self.latest_arrays: ArrayRecord | None = None
        #: node id -> site name, learned from the nodes' replies (names dropped nodes).
        self.sites: dict[int, str] = {}
        #: site -> when it first stopped answering (round, phase, UTC time, reason) and the
        #: round it answered again, if it did: each hospital that dropped, once.
        self.dropped: dict[str, dict[str, object]] = {}
        #: Rounds already run before this strategy started (a resumed run): Flower counts
        #: from 1, the report, the checkpoints and the nodes' ledgers continue the count.
        self.round_offset = 0
        #: Error replies a wrapper (hospital-level DP) kept from Flower, by round: recorded
        #: with the round's results.
        self._pending_errors: dict[int, list[Message]] = {}

    def _log(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round, RoundLog(round=server_round))

    @staticmethod
    def _record(
        entry: RoundLog, replies: list[Message], expected: list[int], *, train: bool,
        sites: dict[int, str] | None = None,
    ) -> list[dict[str, object]]:
        """Add the replies to ``entry``; return the error rows of nodes that did not answer.

        ``sites`` maps node ids to the site names nodes gave earlier; it is updated from these
        replies and names nodes whose error carries no name. An error the SuperLink sends on a
        node's behalf (source :data:`SUPERLINK_NODE_ID`: the node stopped sending heartbeats)
        is not a site: it is counted against the expected node that sent no reply, so one
        failure makes one row, named by site.
        """
        phase = "train" if train else "evaluate"
        sites = {} if sites is None else sites
        answered: set[int] = set()
        link_errors: list[Message] = []
        for msg in replies:
            src = msg.metadata.src_node_id
            if msg.has_error() and src == SUPERLINK_NODE_ID:
                link_errors.append(msg)
                continue
            answered.add(src)
            if msg.has_error():
                named = site_of_error(msg)
                if not named.startswith("node-"):
                    sites[src] = named
                row: dict[str, object] = {
                    "site": sites.get(src, named),
                    "node_id": src,
                    "phase": phase,
                    "reason": msg.error.reason,
                }
                if msg.error.code == k.ERROR_CODE_REFUSED:
                    entry.refusals.append(row)
                entry.errors.append(row)
                continue
            metrics = msg.content.get(k.METRICS)
            if not isinstance(metrics, MetricRecord):
                continue
            reply = SiteReply(_site(msg), src, _scalars(metrics), _ledger_head(msg))
            if not reply.site.startswith("node-"):
                sites[src] = reply.site
            (entry.train if train else entry.evaluate).append(reply)
        missing: list[dict[str, object]] = []
        for node_id in expected:
            if node_id in answered:
                continue
            # Flower drops what did not arrive within the timeout; the SuperLink answers for a
            # node whose heartbeat stopped. Either way: one row for this node.
            row = {
                "site": sites.get(node_id, f"node-{node_id}"),
                "node_id": node_id,
                "phase": phase,
                "reason": DROPPED_REASON if link_errors else TIMEOUT_REASON,
            }
            if link_errors:
                link_errors.pop()
            entry.errors.append(row)
            missing.append(row)
        return missing

    def _remember(self, server_round: int, phase: str, messages: Iterable[Message]) -> list[Message]:
        messages = [m for m in messages if m.metadata.dst_node_id not in self.excluded]
        self._expected[(server_round, phase)] = [m.metadata.dst_node_id for m in messages]
        return messages

    def _note_drops(
        self, entry: RoundLog, missing: list[dict[str, object]], phase: str
    ) -> None:
        """Record each hospital's first drop (and a later return), once per hospital."""
        for row in missing:
            site = str(row["site"])
            if site not in self.dropped or "rejoined_round" in self.dropped[site]:
                self.dropped[site] = {
                    "site": site, "round": entry.round, "phase": phase,
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "reason": str(row["reason"]),
                }
        back = {r.site for r in [*entry.train, *entry.evaluate]}
        for site, drop in self.dropped.items():
            if site in back and "rejoined_round" not in drop and entry.round > int(
                    cast(int, drop["round"])):
                drop["rejoined_round"] = entry.round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's sampling; remember whom we asked, to report who did not answer."""
        server_round += self.round_offset
        messages = super().configure_train(server_round, arrays, config, grid)
        return self._remember(server_round, "train", messages)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's sampling; remember whom we asked, to report who did not answer."""
        server_round += self.round_offset
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        return self._remember(server_round, "evaluate", messages)

    def _record_train(self, server_round: int, replies: Iterable[Message]
                      ) -> tuple[int, list[Message], RoundLog]:
        """A round's train replies in its log: the run's round number (a resumed run's count),
        the replies with any a wrapper kept back, and the round's log entry, with who did not
        answer named (and noted as dropped)."""
        server_round += self.round_offset
        replies = list(replies) + self._pending_errors.pop(server_round, [])
        entry = self._log(server_round)
        missing = self._record(entry, replies, self._expected.get((server_round, "train"), []),
                               train=True, sites=self.sites)
        self._note_drops(entry, missing, "train")
        return server_round, replies, entry

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record per-site train replies, aggregate with FedAvg, checkpoint the result."""
        server_round, replies, entry = self._record_train(server_round, replies)
        results = [m for m in replies if not m.has_error() and _trained(m)]
        if len(results) < self.min_train_nodes:
            # Flower would aggregate whatever arrived; a run promised min-nodes hospitals.
            entry.status = "failed"
            entry.failure = (
                f"only {len(results)} training result(s) arrived, fewer than min-nodes = "
                f"{self.min_train_nodes}: round {server_round} was not aggregated and the "
                "global model is unchanged"
            )
            log.warning("round %d failed: %s", server_round, entry.failure)
            if self.on_update is not None:
                self.on_update(entry, "train")
            self._handle_refusals(entry)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            entry.train_metrics = _scalars(metrics)
        if arrays is not None:
            self.latest_arrays = arrays
        if arrays is not None and self.checkpoint_in_aggregate:
            self.save_checkpoint(server_round, arrays)
        if self.on_update is not None:
            self.on_update(entry, "train")
        self._handle_refusals(entry)
        return arrays, metrics

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        """Write ``round-<r>.pt`` (the global model after round r) if checkpointing is on."""
        if self.checkpoint_dir is None:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        torch.save(arrays.to_torch_state_dict(), self.checkpoint_dir / f"round-{server_round}.pt")

    def _handle_refusals(self, entry: RoundLog) -> None:
        """Exclude refusing nodes, or stop the run, as the run config says."""
        if not entry.refusals:
            return
        for row in entry.refusals:
            self.excluded[int(cast(int, row["node_id"]))] = str(row["reason"])
        reasons = "; ".join(f"{r['site']}: {r['reason']}" for r in entry.refusals)
        if self.on_refusal == "stop":
            raise RunStopped(f"round {entry.round}: a node refused the plan ({reasons})")
        log.warning("round %d: excluded from the rest of the run: %s", entry.round, reasons)
        if not entry.train:
            raise RunStopped(
                f"round {entry.round}: no node trained and the refusing nodes are excluded "
                f"({reasons})"
            )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record per-site evaluate replies and aggregate them."""
        server_round += self.round_offset
        replies = list(replies)
        entry = self._log(server_round)
        missing = self._record(
            entry, replies, self._expected.get((server_round, "evaluate"), []), train=False,
            sites=self.sites,
        )
        self._note_drops(entry, missing, "evaluate")
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            entry.evaluate_metrics = _scalars(metrics)
        if self.on_update is not None:
            self.on_update(entry, "evaluate")
        return metrics

    def evaluate_everywhere(
        self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, *, timeout: float
    ) -> RoundLog:
        """One extra federated evaluation on EVERY connected node (e.g. the final test split).

        Unlike a round's evaluation it ignores ``fraction_evaluate``, so the result covers all
        sites and is reproducible. Replies may differ in which metrics they carry (a node may
        decline to release histograms); :func:`pool_metrics` pools what all of them share.
        """
        node_ids = [n for n in grid.get_node_ids() if n not in self.excluded]
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = [
            Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node_id)
            for node_id in node_ids
        ]
        replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
        entry = RoundLog(round=0)
        missing = self._record(entry, replies, node_ids, train=False, sites=self.sites)
        self._note_drops(entry, missing, "final evaluation")
        valid, _ = self._check_and_log_replies(replies, is_train=False, validate=False)
        valid = [m for m in valid if isinstance(m.content.get(k.METRICS), MetricRecord)]
        if valid:
            pooled = self.evaluate_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
            entry.evaluate_metrics = _scalars(pooled)
        return entry
