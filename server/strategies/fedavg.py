"""FedAvg that keeps a per-site record of every round, checkpoints, and pools histograms.

It extends Flower's Message-API :class:`flwr.serverapp.strategy.FedAvg` without copying its
loop: aggregation is Flower's; this class only looks at the replies on the way in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import messages as k
from common.stats.histogram import auc_from_histograms

log = logging.getLogger(__name__)


@dataclass
class SiteReply:
    """What one site released in one round (numbers only, no patient data)."""

    site: str
    node_id: int
    metrics: dict[str, float]


@dataclass
class RoundLog:
    """Everything the coordinator learned in one round."""

    round: int
    train: list[SiteReply] = field(default_factory=list)
    evaluate: list[SiteReply] = field(default_factory=list)
    errors: list[dict[str, object]] = field(default_factory=list)
    train_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_metrics: dict[str, float] = field(default_factory=dict)


def _site(msg: Message) -> str:
    info = msg.content.get(k.NODE_INFO)
    if isinstance(info, ConfigRecord) and k.SITE in info:
        return str(info[k.SITE])
    return f"node-{msg.metadata.src_node_id}"


def _scalars(record: MetricRecord) -> dict[str, float]:
    return {key: float(v) for key, v in record.items() if not isinstance(v, list)}


def pool_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Aggregate evaluate/train metrics: NaN-aware weighted means; histograms summed.

    Per-node quantities (epsilon, delta, ...) are not averaged: they are reported per site.
    When every reply carries score histograms, ``auc-pooled`` is the AUC of the pooled scores.
    """
    metrics = [cast(MetricRecord, r[k.METRICS]) for r in records]
    weights = np.array([float(cast(float, m[weight_key])) for m in metrics])
    out = MetricRecord({weight_key: int(weights.sum())})
    keys = [key for key in metrics[0].keys() if key != weight_key]
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
        out["auc-pooled"] = auc_from_histograms(out[k.HIST_POSITIVE], out[k.HIST_NEGATIVE])
    return out


class VesaliusFedAvg(FedAvg):
    """FedAvg with per-site logging, per-round checkpoints and histogram pooling.

    Parameters
    ----------
    checkpoint_dir : Path or None
        Where ``round-<r>.pt`` global-model checkpoints are written.
    on_round : callable or None
        Called with each finished :class:`RoundLog` (progress bars, incremental reports).
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(
        self,
        *,
        checkpoint_dir: Path | None = None,
        on_round: Callable[[RoundLog], None] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(
            arrayrecord_key=k.ARRAYS,
            configrecord_key=k.CONFIG,
            weighted_by_key=k.NUM_EXAMPLES,
            train_metrics_aggr_fn=pool_metrics,
            evaluate_metrics_aggr_fn=pool_metrics,
            **kwargs,  # type: ignore[arg-type]
        )
        self.checkpoint_dir = checkpoint_dir
        self.on_round = on_round
        self.rounds: dict[int, RoundLog] = {}

    def _log(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round, RoundLog(round=server_round))

    @staticmethod
    def _record(entry: RoundLog, replies: list[Message], *, train: bool) -> None:
        for msg in replies:
            if msg.has_error():
                entry.errors.append(
                    {
                        "site": f"node-{msg.metadata.src_node_id}",
                        "node_id": msg.metadata.src_node_id,
                        "phase": "train" if train else "evaluate",
                        "reason": msg.error.reason,
                    }
                )
                continue
            metrics = msg.content.get(k.METRICS)
            if not isinstance(metrics, MetricRecord):
                continue
            reply = SiteReply(_site(msg), msg.metadata.src_node_id, _scalars(metrics))
            (entry.train if train else entry.evaluate).append(reply)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record per-site train replies, aggregate with FedAvg, checkpoint the result."""
        replies = list(replies)
        self._record(self._log(server_round), replies, train=True)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            self._log(server_round).train_metrics = _scalars(metrics)
        if arrays is not None and self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            torch.save(arrays.to_torch_state_dict(), self.checkpoint_dir / f"round-{server_round}.pt")
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record per-site evaluate replies and aggregate them."""
        replies = list(replies)
        self._record(self._log(server_round), replies, train=False)
        metrics = super().aggregate_evaluate(server_round, replies)
        entry = self._log(server_round)
        if metrics is not None:
            entry.evaluate_metrics = _scalars(metrics)
        if self.on_round is not None:
            self.on_round(entry)
        return metrics

    def evaluate_split(
        self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, *, timeout: float
    ) -> tuple[MetricRecord | None, RoundLog]:
        """Run one extra federated evaluation (e.g. the final test split) outside the rounds."""
        messages = self.configure_evaluate(0, arrays, config, grid)
        replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
        entry = RoundLog(round=0)
        self._record(entry, replies, train=False)
        valid, _ = self._check_and_log_replies(replies, is_train=False)
        metrics = pool_metrics([m.content for m in valid], k.NUM_EXAMPLES) if valid else None
        if metrics is not None:
            entry.evaluate_metrics = _scalars(metrics)
        return metrics, entry
