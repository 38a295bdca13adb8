"""Federated cross-validation: k-fold and leave-one-site-out, each fold a fresh federation.

For every fold the coordinator

1. builds a fresh global model (initial weights seeded by the run seed and the fold number);
2. trains it with the project's FedAvg (:class:`~server.strategies.fedavg.VesaliusFedAvg`,
   Flower's loop) for ``num_rounds`` rounds, the plan telling every node which fold it holds
   out (``cv-mode``, ``fold``, ``num-folds``, ``holdout-site``; nodes pick their patients with
   :func:`client.data.folds.cv_splits`); per-round validation is skipped (in cross-validation
   the validation patients belong to training folds);
3. evaluates the fold's final model on every node's held-out part (split ``heldout``) with
   one ``metrics`` statistics query (:func:`server.inference.query_nodes`: the nodes' release
   rules and ledgers apply) and pools what the nodes release: per-class fine score histograms
   and confusion counts. From them: the pooled AUC with a 95% DeLong interval, accuracy /
   sensitivity / specificity with Wilson intervals (:mod:`common.stats`), and each site's own
   AUC. Where no node answers the query, the fold falls back to evaluate messages with score
   histograms (the nodes' ``release-histograms`` consent applies);
4. records each site's privacy spend (the epsilon of its last train reply) and every refusal
   or failure, and rewrites ``report.json`` atomically, so a crash loses no finished fold.

Across folds: the AUC of all held-out patients' pooled histograms (each patient is held out
exactly once) with its DeLong interval, and mean +- SD of the per-fold AUCs.

k-fold: every node holds out fold ``k`` of its own patient-level folds (stratified for class
and grade targets: :func:`client.data.folds.fold_assignment`).
Leave-one-site-out: the coordinator first learns the connected nodes' site names (one
evaluation of the initial model on their validation splits), then fold ``k`` holds out the
k-th site (sorted by name): that node is not sent train messages and evaluates on all its
patients; the other nodes train on all theirs.

Directory layout::

    out_dir/report.json, report.html      the cross-validation report
    out_dir/fold-<k>/report.json          the fold's federation (rounds, epsilon per site)
    out_dir/fold-<k>/checkpoints/         round-<r>.pt, final.pt

``report.json`` (rewritten after every fold)::

    {"kind": "cross-validation", "status": "running" | "completed" | "incomplete" | "failed"
       | "stopped", "reason": ..., "run_id": ..., "config": {... cv-folds, cv-leave-one-site-out},
     "privacy": {...},
     "inference": {
       "cv": {"metric": "auc", "mode": "kfold" | "loso", "num_folds": K, "alpha": 0.05,
              "folds": [{"fold": 0, "held_out": "fold-0" | site, "status": ..., "n": ...,
                         "auc": Estimate, "accuracy": Estimate, "sensitivity": Estimate,
                         "specificity": Estimate, "epsilon_by_site": {site: eps},
                         "issues": count}, ...],
              "pooled": {"held_out": "all folds", "n": ..., "auc": Estimate, "accuracy": ...,
                         "auc_mean": ..., "auc_sd": ..., "folds_included": [...]},
              "fold_details": [{"fold", "run_id", "holdout_site", "status", "reason",
                                "source", "source_note", "n_pos", "n_neg", "confusion",
                                "train_patients_by_site", "heldout_by_site", "errors",
                                "report"}, ...]},
       "roc": {"pooled": {"pos", "neg"}, "sites": {"fold <k>": {"pos", "neg"}}},
       "meta": {"auc": DerSimonian-Laird over held-out sites (leave-one-site-out only)}}}

Other tasks (:mod:`server.cv_tasks`): step 3 is the task's own pooled inference on the
held-out split (reconstruction: the held-out loss of an evaluate round), and ``inference.cv``
is ``{"task", "metric", "metrics": [names], "lower_is_better", "mode", "num_folds", "alpha",
"folds": [{"fold", "held_out", "status", "n", <metric>: Estimate, "epsilon_by_site",
"issues"}], "pooled": {"held_out", "n", <metric>: {value = mean over folds},
"<metric>_mean", "<metric>_sd", "folds_included"}, "by_site": {site: {<metric>: {"mean",
"sd", "n_folds", "folds", "values"}}}, "fold_details": [{..., "heldout_inference": the
task's section}]}`` with ``roc`` and ``meta`` empty.

``Estimate`` is :meth:`common.stats.estimate.Estimate.as_dict` (``value, lower, upper, se, n,
method``); undefined values are null. This is the ``inference`` schema of
:mod:`server.report_html`, which renders ``report.html``.

Statistics caveats: the DeLong interval is that of the pooled *binned* scores (ties within a
bin count 1/2). The across-fold pooled AUC treats the folds' models as one scorer (the usual
pooled cross-validation estimate): when the folds' models put scores on different scales
(e.g. after few DP rounds) it is well below the folds' own AUCs, which ``auc_mean`` and
``auc_sd`` summarise.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from common import messages as k
from common.config import RunConfig, _get, fold_run_id
from common.errors import ConfigError, VesaliusError
from common.stats.auc import auc_ci, delong_from_sums, node_placement_sums
from common.stats.bins import fine_score_edges, uniform_edges
from common.stats.estimate import Estimate
from common.stats.histogram import auc_from_histograms
from common.stats.meta import random_effects
from common.stats.metrics import classification_metrics
from server import cv_tasks
from server.inference import QueryRound, query_nodes
from server.progress import DelegatingGrid, ProgressCallback
from server.transport import with_transport
from server.report import RunReport, atomic_write, json_safe
from server.strategies.fedavg import RoundLog, RunStopped, VesaliusFedAvg
from server.strategies.secure import SecureFedAvg

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
ALPHA = 0.05
THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity")
_NOT_COVERED = {
    "binary": "held-out score histograms are released without noise",
    "reconstruction": "held-out evaluate metrics (each node's loss) are released without noise",
    **{task: "held-out statistics are released under each node's release rules (noise only "
       "where the node adds it)"
       for task in ("multiclass", "ordinal", "multilabel", "regression", "segmentation")},
}


# --- what to run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CVSpec:
    """Which cross-validation to run (run-config keys ``cv-folds``, ``cv-leave-one-site-out``).

    Parameters
    ----------
    num_folds : int
        k of a federated k-fold (>= 2), or 0 for none.
    leave_one_site_out : bool
        Leave-one-site-out instead (one fold per connected node).
    """

    num_folds: int = 0
    leave_one_site_out: bool = False

    def __post_init__(self) -> None:
        if self.leave_one_site_out and self.num_folds:
            raise ConfigError("give either cv-folds K or cv-leave-one-site-out, not both")
        if self.num_folds == 1 or self.num_folds < 0:
            raise ConfigError(f"cv-folds must be 0 (no CV) or >= 2, got {self.num_folds}")

    @property
    def enabled(self) -> bool:
        """Whether a cross-validation was asked for."""
        return self.leave_one_site_out or self.num_folds >= 2

    @property
    def mode(self) -> str:
        """The plan's ``cv-mode``: "kfold", "loso" or "none"."""
        return "loso" if self.leave_one_site_out else "kfold" if self.num_folds else "none"

    @classmethod
    def from_user_config(cls, values: Mapping[str, Any]) -> CVSpec:
        """Parse Flower's ``context.run_config`` (absent keys: no cross-validation)."""
        return cls(
            num_folds=_get(values, k.CV_FOLDS, 0, int),
            leave_one_site_out=_get(values, k.CV_LEAVE_ONE_SITE_OUT, False, bool),
        )

    def to_user_config(self) -> dict[str, int | bool]:
        """The run-config overrides that ask a ServerApp for this cross-validation."""
        return {k.CV_FOLDS: self.num_folds, k.CV_LEAVE_ONE_SITE_OUT: self.leave_one_site_out}


@dataclass(frozen=True)
class FoldEvent:
    """Progress of a cross-validation, for a CLI or a log.

    ``stage`` is "start" (fold begins), "round" (a training round finished), "evaluated"
    (held-out results of the fold are in) or "done" (the whole cross-validation).
    """

    stage: str
    fold: int
    num_folds: int
    label: str
    round: int = 0
    num_rounds: int = 0
    fold_row: dict[str, Any] | None = None


CVProgress = Callable[[FoldEvent], None]


# --- a Grid that shows the strategy only some nodes --------------------------------------------


class NodeSubsetGrid(DelegatingGrid):
    """Delegates to ``grid`` but lists only ``node_ids`` (leave-one-site-out training)."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        super().__init__(grid)
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        """The chosen nodes that are still connected."""
        connected = set(self._inner.get_node_ids())
        return [n for n in self._node_ids if n in connected]


# --- statistics of held-out histograms ---------------------------------------------------------


def histogram_edges(num_bins: int) -> np.ndarray:
    """The bin edges nodes used for score histograms of ``num_bins`` bins.

    Nodes bin on :func:`common.stats.bins.fine_score_edges` or on equal-width bins
    (:func:`common.stats.histogram.score_histograms`); the length tells them apart.
    """
    fine = fine_score_edges()
    return fine if num_bins == fine.size - 1 else uniform_edges(num_bins)


def summarise_histograms(positive: Sequence[int] | np.ndarray, negative: Sequence[int] | np.ndarray,
                         *, alpha: float = ALPHA, threshold: float = 0.5) -> dict[str, Any]:
    """AUC with a DeLong interval and threshold metrics with Wilson intervals from histograms.

    The DeLong variance of one AUC needs only the pooled histograms: every patient in a bin
    has the same placement value, so the binned scores are rebuilt (bin left edges, which bin
    back to the same bin) and passed through :func:`common.stats.auc.node_placement_sums`.
    Accuracy, sensitivity and specificity use ``threshold`` (a patient is positive when its
    score is at least it): a bin edge (0.5 is one of every supported binning, and a
    threshold chosen on validation histograms on the same edges is one), else the first
    edge above it.

    Returns
    -------
    dict
        ``n, n_pos, n_neg``; ``auc``, ``accuracy``, ``sensitivity``, ``specificity`` as
        :meth:`common.stats.estimate.Estimate.as_dict` (``value, lower, upper, se, n,
        method``), or None when undefined (e.g. one class only); ``confusion`` counts.
    """
    pos = np.asarray(positive, dtype=np.int64)
    neg = np.asarray(negative, dtype=np.int64)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    out: dict[str, Any] = {"n": n_pos + n_neg, "n_pos": n_pos, "n_neg": n_neg, "auc": None}
    edges = histogram_edges(pos.size)
    if n_pos and n_neg:
        auc = auc_from_histograms(pos, neg)
        if n_pos >= 2 and n_neg >= 2:
            scores = np.repeat(edges[:-1], pos + neg)
            labels = np.concatenate([np.repeat([1, 0], [p, q]) for p, q in zip(pos, neg)])
            sums = node_placement_sums([scores], labels, [(pos, neg)], edges=edges)
            est = auc_ci(auc, delong_from_sums(sums).var, n=n_pos + n_neg, alpha=alpha)
        else:  # too few patients of a class for a variance: the point estimate only
            est = Estimate(auc, math.nan, math.nan, math.nan, n_pos + n_neg, "delong")
        out["auc"] = est.as_dict()
    cut = np.flatnonzero(np.isclose(edges, threshold, rtol=0, atol=1e-12))
    if not cut.size:
        cut = np.flatnonzero(edges >= threshold)[:1]
    if cut.size and n_pos + n_neg:
        t = int(cut[0])  # bins t.. hold scores >= the threshold (predicted positive)
        counts = {"tp": int(pos[t:].sum()), "fn": int(pos[:t].sum()),
                  "fp": int(neg[t:].sum()), "tn": int(neg[:t].sum())}
        by_name = classification_metrics(counts, alpha=alpha, method="wilson")
        for name in THRESHOLD_METRICS:
            out[name] = by_name[name].as_dict() if by_name[name].n else None
        out["confusion"] = counts
    return out


# --- one fold ---------------------------------------------------------------------------------


def cv_site_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A fold's site row as the cross-validation reports it: ``epsilon`` and ``epsilon_prv``
    are the cross-validation's so far (the node's ``epsilon-cv``, every fold's training at
    that node composed), not the fold's own. A patient trains in several folds: the fold's
    own ε understates what the cross-validation spent (3 folds of the demo's plan: 5.40 each,
    8.00 together). A node that did not send it (an older node) keeps its fold's figures."""
    out = {key: v for key, v in row.items() if key not in ("epsilon_cv", "epsilon_cv_prv")}
    if row.get("epsilon_cv") is not None:
        out["epsilon"] = row["epsilon_cv"]
        out["epsilon_prv"] = row.get("epsilon_cv_prv")
    return out


def epsilon_by_site(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Site -> its ε for the cross-validation so far, after a fold (:func:`cv_site_row`)."""
    return {row["site"]: cv_site_row(row)["epsilon"] for row in rows}


@dataclass
class FoldOutcome:
    """What one fold produced (numbers released by the nodes only)."""

    fold: int
    label: str
    run_id: str
    directory: Path
    holdout_site: str = ""
    status: str = "running"
    reason: str = ""
    rounds: list[RoundLog] = field(default_factory=list)
    heldout: RoundLog | None = None
    histograms: tuple[np.ndarray, np.ndarray] | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    sites: list[dict[str, Any]] = field(default_factory=list)
    query_failures: list[dict[str, Any]] = field(default_factory=list)
    task: str = "binary"
    section: dict[str, Any] | None = None
    secure_heldout: bool = False  # held-out statistics summed under secure aggregation
    notes: list[str] = field(default_factory=list)  # a paradigm's notes on how it trained
    operating_point: dict[str, Any] | None = None  # choose_fold_threshold's (binary task)

    def errors(self, names: Mapping[int, str]) -> list[dict[str, Any]]:
        """Refusals and failures of the fold, named by site where the coordinator knows it."""
        entries: list[tuple[int | None, dict[str, object]]] = [
            (r.round, e) for r in self.rounds for e in r.errors]
        if self.heldout is not None:
            entries += [(None, {**e, "phase": "heldout"}) for e in self.heldout.errors]
        entries += [(None, {**e, "phase": f"heldout query {e.get('query', '')}".strip()})
                    for e in self.query_failures]
        out = []
        for round_, e in entries:
            node_id = e.get("node_id")
            site = names.get(node_id, str(e["site"])) if isinstance(node_id, int) else e["site"]
            out.append({"site": site, "phase": e["phase"], "reason": e["reason"],
                        "round": round_})
        return out

    def row(self) -> dict[str, Any]:
        """The fold's row of ``inference.cv.folds`` (one line of the CV table)."""
        if self.task != "binary":
            return cv_tasks.fold_row(self, self.task)
        s = self.summary
        return {
            "fold": self.fold,
            "held_out": self.label,
            "status": self.status,
            "n": s.get("n", 0),
            "auc": s.get("auc"),
            **{name: s.get(name) for name in THRESHOLD_METRICS},
            "epsilon_by_site": epsilon_by_site(self.sites),
            "issues": len(self.errors({})) + (1 if self.reason else 0),
        }

    def details(self, names: Mapping[int, str]) -> dict[str, Any]:
        """The fold's entry of ``inference.cv.fold_details``: reasons, per-site results."""
        if self.task != "binary":
            return cv_tasks.fold_details(self, self.task, names)
        extra = self.summary.get("extra") or {}
        hidden = extra.get("auc_sites") if isinstance(extra.get("auc_sites"), str) else None
        per_site: list[dict[str, Any]] = [] if hidden else list(extra.get("auc_sites") or [])
        if self.heldout is not None:
            per_site = [{"site": r.site, "n": int(r.metrics.get(k.NUM_EXAMPLES, 0)),
                         "auc": {"value": _finite(r.metrics.get(k.AUC)), "lower": None,
                                 "upper": None, "method": "node-reported"}}
                        for r in self.heldout.evaluate]
        return {
            "fold": self.fold,
            "run_id": self.run_id,
            "holdout_site": self.holdout_site or None,
            "status": self.status,
            "reason": self.reason,
            "source": self.summary.get("source"),
            "source_note": self.summary.get("source_note"),
            "noised": extra.get("noised"),
            "suppressed_cells": extra.get("suppressed_cells"),
            "n_pos": self.summary.get("n_pos", 0),
            "n_neg": self.summary.get("n_neg", 0),
            "confusion": self.summary.get("confusion"),
            "operating_point": self.operating_point,
            "train_patients_by_site": {row["site"]: row["num_examples"] for row in self.sites},
            "heldout_by_site": hidden or sorted(per_site, key=lambda r: str(r["site"])),
            "errors": self.errors(names),
            "report": str(self.directory / REPORT_JSON),
            "notes": list(self.notes),
        }


def _finite(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def fold_initial_arrays(config: RunConfig, fold: int) -> ArrayRecord:
    """A fresh global model for ``fold``: seeded by the run seed and the fold number.

    The run's own :func:`server.app.initial_arrays` (the task's outputs, the plan's sample
    dimensionality, ``init-from``) with the seed ``seed * 1009 + 7919 * (fold + 1)``. The
    global torch RNG is restored afterwards, so folds do not depend on each other's history.
    """
    return fold_initial_model(config, fold)[0]


def fold_initial_model(config: RunConfig, fold: int) -> tuple[ArrayRecord, dict[str, Any] | None]:
    """:func:`fold_initial_arrays` and, with ``init-from``, what was loaded (the checkpoint's
    SHA-256 and tensors: :func:`server.app.initial_model`'s record), else None."""
    from server.app import initial_model  # server.app imports this module

    plan = config.plan
    seeded = replace(config, plan=replace(plan, seed=plan.seed * 1009 + 7919 * (fold + 1)))
    with torch.random.fork_rng(devices=[]):
        model, loaded = initial_model(seeded)
    return ArrayRecord(model.state_dict()), loaded


def _histograms(replies_metrics: list[MetricRecord]) -> tuple[np.ndarray, np.ndarray] | None:
    hists = [(m[k.HIST_POSITIVE], m[k.HIST_NEGATIVE]) for m in replies_metrics
             if k.HIST_POSITIVE in m and k.HIST_NEGATIVE in m]
    if not hists or len(hists) != len(replies_metrics):
        return None  # some node declined to release histograms: no pooled AUC for the fold
    sizes = {int(np.size(p)) for p, _ in hists} | {int(np.size(q)) for _, q in hists}
    if len(sizes) != 1:
        return None
    pos = np.sum([np.asarray(p, dtype=np.int64) for p, _ in hists], axis=0)
    neg = np.sum([np.asarray(q, dtype=np.int64) for _, q in hists], axis=0)
    return pos, neg


def evaluate_heldout(
    grid: Grid, arrays: ArrayRecord, plan_record: Mapping[str, Any],
    *, timeout: float,
) -> tuple[RoundLog, tuple[np.ndarray, np.ndarray] | None]:
    """Evaluate ``arrays`` on the held-out part of every node of ``grid``; pool histograms.

    Returns the per-site log (metrics and errors) and the pooled ``(positive, negative)``
    histograms, or None when not every answering node released them.
    """
    config = ConfigRecord({**plan_record, k.SPLIT: k.SPLIT_HELDOUT, k.WITH_HISTOGRAMS: True})
    captured: list[MetricRecord] = []
    node_ids = list(grid.get_node_ids())
    content = RecordDict({k.ARRAYS: arrays, k.CONFIG: config})
    messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in node_ids]
    replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
    entry = RoundLog(round=0)
    VesaliusFedAvg._record(entry, replies, node_ids, train=False)
    for msg in replies:
        if not msg.has_error() and isinstance(msg.content.get(k.METRICS), MetricRecord):
            captured.append(msg.content[k.METRICS])  # type: ignore[arg-type]
    return entry, _histograms(captured)


_QUERY_REQUIRED = (k.NUM_EXAMPLES, k.TP, k.FP, k.TN, k.FN, k.HIST_POSITIVE, k.HIST_NEGATIVE)


def query_heldout(
    grid: Grid, arrays: ArrayRecord, config: RunConfig, *, threshold: float = 0.5,
) -> tuple[QueryRound | None, str]:
    """One ``metrics`` statistics query on the held-out parts (:func:`server.inference.query_nodes`).

    Statistics queries go through each node's release rules and ledger (small-count
    suppression of the confusion cells, optional noise). The fine score histograms are kept
    whole so that folds can be pooled (:func:`server.inference.pooled_metrics` returns them
    compressed). Returns the round when at least one node released its histograms, else None
    (the caller falls back to :func:`evaluate_heldout`), and a note on the nodes that failed.
    """
    base = {**config.plan.to_record(), k.SPLIT: k.SPLIT_HELDOUT, k.THRESHOLD: float(threshold),
            k.WITH_HISTOGRAMS: True}
    res = query_nodes(grid, list(grid.get_node_ids()), "metrics", base,
                      timeout=config.round_timeout, records={k.ARRAYS: arrays},
                      required=_QUERY_REQUIRED)
    note = "; ".join(sorted({f"{f.get('site')}: {f.get('reason')}" for f in res.failures}))
    if not res.values:
        return None, note or "no node answered the statistics query"
    return res, note


def choose_fold_threshold(grid: Grid, arrays: ArrayRecord, config: RunConfig) -> dict[str, Any]:
    """The fold's decision threshold on its model's raw scores, chosen on the validation
    patients of the fold's training hospitals (their validation part of the training folds)
    from the pooled score histograms of one ``metrics`` statistics query, by Youden's J or
    the run's target sensitivity (:func:`common.stats.operating_point.choose_operating_point`),
    as a run chooses its test threshold (:mod:`server.final_model`). DP-SGD leaves the raw
    scores uncalibrated: at 0.5 a fold read sensitivity 0.000 beside an AUC of 0.924 (demo
    data). The held-out patients feed no choice. Falls back to 0.5, with a note, when no
    validation histograms come back or a class is absent from them.
    """
    from common.stats.operating_point import choose_operating_point

    target = float(config.target_sensitivity)
    method = "target-sensitivity" if target > 0 else "youden"
    fallback = {"method": "default 0.5 (see note)", "threshold": 0.5, "chosen_on": None,
                "target_sensitivity": target or None}
    base = {**config.plan.to_record(), k.SPLIT: k.SPLIT_VAL, k.THRESHOLD: 0.5,
            k.WITH_HISTOGRAMS: True}
    res = query_nodes(grid, list(grid.get_node_ids()), "metrics", base,
                      timeout=config.round_timeout, records={k.ARRAYS: arrays},
                      required=_QUERY_REQUIRED)
    if not res.values:
        note = "; ".join(sorted({f"{f.get('site')}: {f.get('reason')}" for f in res.failures}))
        return {**fallback, "note": "no validation score histograms came back"
                + (f" ({note})" if note else "")}
    pooled = res.pooled((k.HIST_POSITIVE, k.HIST_NEGATIVE))
    pos = np.maximum(np.rint(pooled[k.HIST_POSITIVE]), 0).astype(np.int64)
    neg = np.maximum(np.rint(pooled[k.HIST_NEGATIVE]), 0).astype(np.int64)
    try:
        point = choose_operating_point(pos, neg, histogram_edges(pos.size), method=method,
                                       target_sensitivity=target or None)
    except VesaliusError as exc:
        return {**fallback, "note": f"threshold not chosen on validation: {exc}"}
    return {"method": method, "threshold": point.threshold, "chosen_on": "validation",
            "target_sensitivity": target or None,
            "validation": {"n": int(pos.sum() + neg.sum()), "sensitivity": point.sensitivity,
                           "specificity": point.specificity, "youden_j": point.youden_j},
            "note": None}


def _evaluate_fold(grid: Grid, arrays: ArrayRecord, config: RunConfig, outcome: FoldOutcome,
                   *, threshold: float = 0.5) -> None:
    """Held-out statistics of a fold: the statistics query, else evaluate replies.

    The fold's AUC and its DeLong interval follow from the pooled fine score histograms
    (:func:`summarise_histograms`; for one model the DeLong variance needs no second round);
    threshold metrics at ``threshold`` (:func:`choose_fold_threshold`) from the pooled
    confusion counts when no node suppressed a cell, else from the histograms (the threshold
    is a bin edge); per-site AUCs from each site's own histograms.
    """
    from server.inference_secure import HIDDEN, current, is_secure

    res, note = query_heldout(grid, arrays, config, threshold=threshold)
    if res is None and current() is not None:
        # No fallback to evaluate replies: they would carry each hospital's histograms.
        outcome.status = "incomplete"
        outcome.reason = ("no pooled held-out statistics: the securely summed statistics "
                          f"query failed ({note})")
        return
    if res is not None:
        ids = list(res.values)
        pooled = res.pooled(_QUERY_REQUIRED)
        pos = np.rint(pooled[k.HIST_POSITIVE]).astype(np.int64)
        neg = np.rint(pooled[k.HIST_NEGATIVE]).astype(np.int64)
        outcome.histograms = (pos, neg)
        summary = summarise_histograms(pos, neg, threshold=threshold)
        suppressed = sum(int(res.values[i].get(k.SUPPRESSED_CELLS, 0)) for i in ids)
        noised = any(bool(res.values[i].get(k.NOISED, 0)) for i in ids)
        notes = [f"failed: {note}"] if note else []
        if suppressed == 0:
            counts = {name: int(round(float(pooled[key])))
                      for name, key in (("tp", k.TP), ("fp", k.FP), ("tn", k.TN), ("fn", k.FN))}
            metrics = classification_metrics(counts, alpha=ALPHA, method="wilson")
            summary.update({m: metrics[m].as_dict() if metrics[m].n else None
                            for m in THRESHOLD_METRICS})
            summary["confusion"] = counts
        else:
            notes.append(f"{suppressed} confusion cell(s) suppressed by node release rules: "
                         "threshold metrics from the released score histograms")
        sites: list[dict[str, Any]] | str = HIDDEN if is_secure(res) else []
        for nid in [] if is_secure(res) else ids:
            site = summarise_histograms(res.values[nid][k.HIST_POSITIVE],
                                        res.values[nid][k.HIST_NEGATIVE])
            sites.append({"site": res.sites[nid], "n": site["n"],  # type: ignore[union-attr]
                          "auc": site["auc"]})
        outcome.summary = {
            "source": "statistics query 'metrics' (server.inference.query_nodes)",
            "source_note": "; ".join(notes) or None,
            **summary,
            "extra": {"auc_sites": sites, "noised": noised, "suppressed_cells": suppressed},
        }
        outcome.query_failures = list(res.failures)
        outcome.status = "completed" if summary.get("auc") else "incomplete"
        if outcome.status == "incomplete":
            outcome.reason = "held-out AUC undefined (one class absent from the pooled patients)"
        return
    outcome.heldout, outcome.histograms = evaluate_heldout(
        grid, arrays, config.plan.to_record(), timeout=config.round_timeout)
    if outcome.histograms is None:
        outcome.status = "incomplete"
        outcome.reason = ("no pooled held-out AUC: not every node released score histograms "
                          "of its held-out patients (see errors)")
        return
    outcome.summary = {"source": "evaluate replies with score histograms",
                       "source_note": f"statistics query not used: {note}",
                       **summarise_histograms(*outcome.histograms, threshold=threshold)}
    outcome.status = "completed"


def secure_enabled(grid: Grid, config: RunConfig) -> bool:
    """Whether the run's secure aggregation is on: :func:`server.app.run_federation`'s rule
    (``secure-aggregation`` "on", or "auto" with at least 3 hospitals, counting the connected
    nodes and ``min-nodes``)."""
    from common.secagg.params import enabled, scale_warning

    hospitals = max(len(list(grid.get_node_ids())), config.min_nodes)
    secure = enabled(config.secure_aggregation, hospitals)
    if secure and (slow := scale_warning(hospitals, config.secagg_neighbours)):
        log.warning(slow)
    return secure


def _stopped_by_refusal(rounds: Sequence[RoundLog]) -> bool:
    # Refusals are recognised by the nodes' error code (RoundLog.refusals), not by wording:
    # real nodes prefix their reasons with the site name.
    return any(e.get("phase") == "train" for r in rounds for e in r.refusals)


def run_fold(
    grid: Grid, config: RunConfig, outcome: FoldOutcome, *, train_nodes: Sequence[int] | None,
    heldout_nodes: Sequence[int] | None, progress: CVProgress | None, num_folds: int,
    secure: bool = False,
) -> FoldOutcome:
    """Train a fresh model for one fold, then evaluate it on the held-out parts.

    ``config`` is the fold's own run config (plan with the fold's CV fields, ``out_dir`` the
    fold's folder). ``train_nodes``/``heldout_nodes`` restrict which nodes train / evaluate
    (None: all connected nodes). ``secure``: the run's secure aggregation is on; the fold
    trains with :class:`~server.strategies.secure.SecureFedAvg` (the coordinator sees only
    the sum of the updates) and its held-out statistics are summed securely where they are
    sums over several hospitals (:mod:`server.inference_secure`; not in leave-one-site-out,
    whose held-out part is one hospital by design). Never raises for node failures: they
    are recorded.

    A paradigm's ``fold`` hook composes the same steps: :func:`train_rounds` (one or more
    stages), :func:`evaluate_fold` on the final model, all inside :func:`fold_guard`.
    """
    report = RunReport(config=config)
    initial = fold_initial_arrays(config, outcome.fold)  # a config error stops the whole CV
    with fold_guard(outcome, [report], Path(config.out_dir)):
        arrays = train_rounds(grid, config, outcome, report, initial=initial,
                              train_nodes=train_nodes, progress=progress, num_folds=num_folds,
                              secure=secure)
        if arrays is not None:
            evaluate_fold(grid, arrays, config, outcome, heldout_nodes=heldout_nodes,
                          secure=secure)
    return outcome


def train_rounds(
    grid: Grid, config: RunConfig, outcome: FoldOutcome, report: RunReport, *,
    initial: ArrayRecord, train_nodes: Sequence[int] | None, progress: CVProgress | None,
    num_folds: int, secure: bool = False,
) -> ArrayRecord | None:
    """``config.plan.num_rounds`` FedAvg rounds of the plan from ``initial`` on the fold's
    training nodes, without per-round validation (CV validation patients train).

    Each round goes into ``report`` (written to ``config.out_dir`` after every phase; a
    ``progress`` "round" event per round when given), ``outcome.rounds`` and
    ``outcome.sites`` follow it. Returns the final global model (also
    ``<out_dir>/checkpoints/final.pt``), or None when no node trained in any round (the
    outcome then says "failed"). Raises :class:`RunStopped` when every node refused.
    """
    out_dir = Path(config.out_dir)
    plan_record = config.plan.to_record()
    train_grid = grid if train_nodes is None else NodeSubsetGrid(grid, train_nodes)
    needed = len(train_nodes) if train_nodes is not None else config.min_nodes
    min_nodes = max(1, min(config.min_nodes, needed))

    def updated(entry: RoundLog, phase: str) -> None:
        if entry not in report.rounds:
            report.rounds.append(entry)
        report.write(out_dir)
        if phase == "evaluate" and progress is not None:
            progress(FoldEvent("round", outcome.fold, num_folds, outcome.label,
                               entry.round, config.plan.num_rounds))

    strategy_class: type[VesaliusFedAvg] = VesaliusFedAvg
    secure_kwargs: dict[str, Any] = {}
    if secure:
        strategy_class = SecureFedAvg
        secure_kwargs = {"min_survivors": config.secagg_min_survivors,
                         "neighbours": config.secagg_neighbours,
                         "timeout": config.round_timeout}
    strategy = strategy_class(
        **secure_kwargs,
        checkpoint_dir=out_dir / "checkpoints", on_update=updated,
        on_refusal=config.on_refusal,
        fraction_train=config.fraction_train,
        fraction_evaluate=0.0,  # no per-round validation: CV validation patients train
        min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes,
    )
    result = strategy.start(
        grid=train_grid, initial_arrays=initial,
        num_rounds=config.plan.num_rounds, timeout=config.round_timeout,
        train_config=ConfigRecord(dict(plan_record)),
    )
    outcome.rounds = list(report.rounds)
    outcome.sites = report.sites()
    if not any(entry.train for entry in report.rounds):
        outcome.status, outcome.reason = "failed", "no node trained in any round"
        return None
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(result.arrays.to_torch_state_dict(), out_dir / "checkpoints" / "final.pt")
    return result.arrays


def evaluate_fold(
    grid: Grid, arrays: ArrayRecord, config: RunConfig, outcome: FoldOutcome, *,
    heldout_nodes: Sequence[int] | None, secure: bool = False,
) -> None:
    """Evaluate the fold's final model ``arrays`` on the held-out parts (``heldout_nodes``,
    None: every connected node) with the task's pooled statistics; fills ``outcome``."""
    from server.inference_secure import secure_queries

    eval_grid = grid if heldout_nodes is None else NodeSubsetGrid(grid, heldout_nodes)
    summed = secure and heldout_nodes is None
    outcome.secure_heldout = summed
    with secure_queries(summed, min_survivors=config.secagg_min_survivors,
                        neighbours=config.secagg_neighbours):
        if config.plan.task == "binary":
            # the threshold on the training hospitals' validation patients (leave-one-site-out:
            # not the held-out hospital's)
            val_grid = grid if heldout_nodes is None else NodeSubsetGrid(
                grid, [n for n in grid.get_node_ids() if n not in set(heldout_nodes)])
            outcome.operating_point = choose_fold_threshold(val_grid, arrays, config)
            _evaluate_fold(eval_grid, arrays, config, outcome,
                           threshold=outcome.operating_point["threshold"])
        else:
            cv_tasks.evaluate_task_fold(eval_grid, arrays, config, outcome)


@contextmanager
def fold_guard(outcome: FoldOutcome, reports: Sequence[RunReport], out_dir: Path, *,
               sites: Callable[[], list[dict[str, Any]]] | None = None) -> Iterator[None]:
    """Run a fold's steps; a node failure or refusal is recorded, never raised.

    On :class:`RunStopped` (every node refused, or on-refusal=stop) the fold is "stopped",
    on any other exception "failed"; then ``outcome.rounds`` are the rounds of all
    ``reports`` (its stages, in order) and ``outcome.sites`` those of ``sites()`` (a fold
    whose stages each spend ε: every stage's spend, composed), else the last report's. The
    last report
    takes the outcome's status and is written to ``out_dir``. ``reports`` may grow while
    the steps run (a stage's report is added when it starts).
    """
    try:
        yield
    except RunStopped as exc:  # every node refused (or on-refusal=stop): said, not a crash
        log.warning("fold %s stopped: %s", outcome.fold, exc)
        outcome.status, outcome.reason = "stopped", str(exc)
        _record_stages(outcome, reports, sites)
    except Exception as exc:  # a fold may fail (e.g. no node connected): record, go on
        log.exception("fold %s failed", outcome.fold)
        outcome.status, outcome.reason = "failed", f"{type(exc).__name__}: {exc}"
        _record_stages(outcome, reports, sites)
    last = reports[-1]
    last.status, last.reason = outcome.status, outcome.reason
    last.write(out_dir)


def _record_stages(outcome: FoldOutcome, reports: Sequence[RunReport],
                   sites: Callable[[], list[dict[str, Any]]] | None) -> None:
    outcome.rounds = [entry for report in reports for entry in report.rounds]
    outcome.sites = sites() if sites is not None else reports[-1].sites()


# --- the whole cross-validation ----------------------------------------------------------------


@dataclass
class CVResult:
    """The outcome of a cross-validation; :meth:`to_dict` is ``report.json``."""

    config: RunConfig
    mode: str
    num_folds: int
    out_dir: Path
    folds: list[FoldOutcome] = field(default_factory=list)
    site_names: dict[int, str] = field(default_factory=dict)
    status: str = "running"
    reason: str = ""
    html: Path | None = None
    secure: bool = False  # the run's secure aggregation (fold training, held-out sums)

    @property
    def report_path(self) -> Path:
        """``out_dir/report.json``."""
        return self.out_dir / REPORT_JSON

    def pooled(self) -> dict[str, Any]:
        """Across folds: AUC of all held-out patients' pooled histograms, mean +- SD of folds."""
        with_hist = [f for f in self.folds if f.histograms is not None]
        aucs = [f.summary["auc"]["value"] for f in with_hist if f.summary.get("auc")]
        out: dict[str, Any] = {"held_out": "all folds", "n": 0, "auc": None}
        sizes = {f.histograms[0].size for f in with_hist if f.histograms is not None}
        if with_hist and len(sizes) == 1:
            pos = np.sum([f.histograms[0] for f in with_hist if f.histograms is not None], axis=0)
            neg = np.sum([f.histograms[1] for f in with_hist if f.histograms is not None], axis=0)
            summary = summarise_histograms(pos, neg)
            out.update({key: summary.get(key) for key in ("n", "auc")})
            out["n_pos"], out["n_neg"] = summary["n_pos"], summary["n_neg"]
            # each fold at its own threshold (choose_fold_threshold): their confusion counts
            # added, not the pooled scores cut at one threshold
            confusions = [f.summary.get("confusion") for f in with_hist]
            if all(isinstance(c, Mapping) for c in confusions):
                counts = {c: sum(int(x[c]) for x in confusions) for c in ("tp", "fp", "tn", "fn")}
                metrics = classification_metrics(counts, alpha=ALPHA, method="wilson")
                out.update({m: metrics[m].as_dict() if metrics[m].n else None
                            for m in THRESHOLD_METRICS})
                out["confusion"] = counts
        out["auc_mean"] = float(np.mean(aucs)) if aucs else None
        out["auc_sd"] = float(np.std(aucs, ddof=1)) if len(aucs) >= 2 else None
        out["folds_included"] = [f.fold for f in with_hist]
        out["note"] = ("auc: all held-out patients' scores pooled over folds, each scored by "
                       "its own fold's model, so score-scale differences between the folds' "
                       "models lower it; auc_mean / auc_sd summarise the folds' own AUCs")
        return out

    def roc(self) -> dict[str, Any]:
        """Held-out ROC histograms for the HTML report: pooled over folds, and per fold."""
        with_hist = [f for f in self.folds if f.histograms is not None]
        if not with_hist or len({f.histograms[0].size for f in with_hist if f.histograms}) != 1:
            return {}
        pos = np.sum([f.histograms[0] for f in with_hist if f.histograms is not None], axis=0)
        neg = np.sum([f.histograms[1] for f in with_hist if f.histograms is not None], axis=0)
        return {
            "pooled": {"pos": pos.tolist(), "neg": neg.tolist()},
            "sites": {f"fold {f.fold} ({f.label})" if f.holdout_site else f"fold {f.fold}":
                      {"pos": f.histograms[0].tolist(), "neg": f.histograms[1].tolist()}
                      for f in with_hist if f.histograms is not None},
        }

    def meta(self) -> dict[str, Any]:
        """Leave-one-site-out: DerSimonian-Laird pooling of the sites' held-out AUCs.

        Each fold's AUC is one site's, with its DeLong variance; k-fold folds are not
        separate populations, so they get no meta-analysis.
        """
        if self.mode != "loso":
            return {}
        rows = [(f.label, f.summary["auc"]) for f in self.folds if f.summary.get("auc")]
        rows = [(name, a) for name, a in rows if a.get("se") is not None and a["se"] > 0]
        if len(rows) < 2:
            return {}
        try:
            res = random_effects([a["value"] for _, a in rows], [a["se"] ** 2 for _, a in rows],
                                 alpha=ALPHA, site_names=[name for name, _ in rows])
        except VesaliusError as exc:
            log.info("AUC meta-analysis skipped: %s", exc)
            return {}
        return {"auc": res.as_dict()}

    def sites(self) -> list[dict[str, Any]]:
        """Each hospital's latest train release over the folds, its ε (RDP, PRV) that of the
        whole cross-validation so far (see :func:`cv_site_row`)."""
        latest: dict[str, dict[str, Any]] = {}
        for outcome in self.folds:  # in fold order: a later fold's row supersedes
            for row in outcome.sites:
                latest[str(row.get("site"))] = row
        return [cv_site_row(latest[name]) for name in sorted(latest)]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see the module docstring of :mod:`server.cv`)."""
        plan = self.config.plan
        return {
            "kind": "cross-validation",
            "run_id": self.config.plan.run_id or None,
            "status": self.status,
            "reason": self.reason,
            "config": {**self.config.to_dict(), k.CV_FOLDS: self.num_folds if self.mode == "kfold" else 0,
                       k.CV_LEAVE_ONE_SITE_OUT: self.mode == "loso"},
            "sites": self.sites(),
            "privacy": {
                "unit": "patient",
                "mechanism": "DP-SGD (Opacus), Poisson sampling of patients" if plan.private
                else "none (non-private baseline)",
                "max_grad_norm": plan.max_grad_norm if plan.private else None,
                "accountant": "rdp",
                "target_epsilon": plan.target_epsilon if plan.private else None,
                "scope": "per hospital, for the whole cross-validation: nodes plan and account "
                "every fold against their cap; epsilon (and a fold's epsilon_by_site) is each "
                "node's epsilon for the cross-validation so far, every fold's training composed "
                "by the node, after the last fold (after that fold)",
                "not_covered": _NOT_COVERED.get(plan.task, _NOT_COVERED["binary"]),
            },
            "inference": self._inference(),
            "paradigm": self._paradigm(),
            "secure_aggregation": self._secure_record(),
            "html": str(self.html) if self.html is not None else None,
        }

    def _paradigm(self) -> dict[str, Any] | None:
        """The report's paradigm section (:mod:`server.report_paradigm`) for a paradigm other
        than supervised: its options and the folds' notes (each once, in order)."""
        from common.paradigms import DEFAULT_PARADIGM, get_paradigm, read_options

        plan = self.config.plan
        if plan.paradigm == DEFAULT_PARADIGM:
            return None
        paradigm = get_paradigm(plan.paradigm)
        notes = list(dict.fromkeys(n for f in self.folds for n in f.notes))
        return {"name": paradigm.name, "summary": paradigm.summary,
                "options": read_options(paradigm, plan.paradigm_options),
                "notes": notes, "tables": [], "plots": []}

    def _secure_record(self) -> dict[str, Any]:
        """What secure aggregation covered in this cross-validation."""
        if not self.secure:
            return {"enabled": False, "mode": self.config.secure_aggregation}
        summed = [f.fold for f in self.folds if f.secure_heldout]
        return {
            "enabled": True, "mode": self.config.secure_aggregation,
            "covers": ["fold training (model updates, example counts, train loss)",
                       "held-out statistics query sums (counts, histograms, float sums)"
                       if summed else "no held-out statistics"],
            "heldout_summed_folds": summed,
            "note": ("per-hospital held-out values are hidden by secure aggregation"
                     if self.mode == "kfold" else
                     "leave-one-site-out: each fold's held-out statistics are one hospital's by "
                     "design, so they are not summed securely (the site is named in the fold)"),
        }

    def _inference(self) -> dict[str, Any]:
        """``report.json``'s ``inference``: the binary ROC/AUC pooling, or a task's metrics."""
        task = self.config.plan.task
        if task != "binary":
            return {"roc": {}, "meta": {},
                    "cv": cv_tasks.cv_section(self.folds, task, mode=self.mode,
                                              num_folds=self.num_folds, alpha=ALPHA,
                                              names=self.site_names)}
        return {
            "roc": self.roc(),
            "meta": self.meta(),
            "cv": {
                "metric": "auc",
                "mode": self.mode,
                "num_folds": self.num_folds,
                "alpha": ALPHA,
                "auc_method": "AUC of the pooled per-class score histograms of the "
                "held-out patients; 95% CI by DeLong on the binned scores",
                "metric_ci_method": "wilson (each fold's threshold, chosen on its validation "
                "patients)",
                "folds": [f.row() for f in self.folds],
                "pooled": self.pooled(),
                "fold_details": [f.details(self.site_names) for f in self.folds],
            },
        }

    def write(self) -> Path:
        """Write ``report.json`` atomically; return its path."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.report_path, json.dumps(json_safe(self.to_dict()), indent=2,
                                                   allow_nan=False))
        return self.report_path


def discover_sites(grid: Grid, config: RunConfig) -> dict[int, str]:
    """Site name of every connected node (leave-one-site-out needs them to name folds).

    Each node evaluates the initial model on its validation split once and replies with its
    site name (and the usual aggregate metrics of an untrained model; nothing per patient).
    Nodes that fail are left out (logged).
    """
    _wait_for_nodes(grid, config.min_nodes, config.round_timeout)
    node_ids = list(grid.get_node_ids())
    content = RecordDict({k.ARRAYS: fold_initial_arrays(config, -1),
                          k.CONFIG: ConfigRecord({**config.plan.to_record(), k.SPLIT: k.SPLIT_VAL})})
    messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in node_ids]
    names: dict[int, str] = {}
    for msg in grid.send_and_receive(messages=messages, timeout=config.round_timeout):
        info = msg.content.get(k.NODE_INFO) if not msg.has_error() else None
        if isinstance(info, ConfigRecord) and k.SITE in info:
            names[msg.metadata.src_node_id] = str(info[k.SITE])
        else:
            log.warning("node %s did not tell its site name", msg.metadata.src_node_id)
    return names


def _wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < min_nodes and time.monotonic() < deadline:
        time.sleep(0.2)


def run_cross_validation(
    grid: Grid, config: RunConfig, *, num_folds: int | None, leave_one_site_out: bool,
    out_dir: Path | None = None, progress: CVProgress | None = None,
) -> CVResult:
    """Run a federated k-fold or leave-one-site-out cross-validation; write its reports.

    Parameters
    ----------
    grid : Grid
        Flower's Grid of the ServerApp.
    config : RunConfig
        The run configuration; its plan's CV fields are set per fold. ``plan.seed`` is the
        cross-validation's seed (fold assignment at the nodes; initial weights per fold).
    num_folds : int or None
        k of a k-fold (>= 2); ignored (may be None) for leave-one-site-out.
    leave_one_site_out : bool
        One fold per connected node instead.
    out_dir : Path, optional
        Where reports go (default ``config.out_dir``).
    progress : callable, optional
        Receives :class:`FoldEvent` s.

    Returns
    -------
    CVResult
        Also written to ``out_dir/report.json`` after every fold, and ``report.html`` at the
        end when :mod:`server.report_html` is available.
    """
    spec = CVSpec(num_folds=0 if leave_one_site_out else int(num_folds or 0),
                  leave_one_site_out=leave_one_site_out)
    if not spec.enabled:
        raise ConfigError("run_cross_validation needs num_folds >= 2 or leave_one_site_out")
    root = Path(out_dir if out_dir is not None else config.out_dir)
    result = CVResult(config=config, mode=spec.mode, num_folds=spec.num_folds, out_dir=root)
    try:
        _run_folds(grid, config, spec, result, progress)
        done = [f for f in result.folds if f.status == "completed"]
        if result.status == "running":
            result.status = "completed" if len(done) == len(result.folds) and done else (
                "incomplete" if done else "failed")
            if result.status != "completed":
                result.reason = (f"{len(done)} of {len(result.folds)} folds completed "
                                 "(see each fold's reason and errors)")
    except BaseException as exc:
        result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"
        result.write()
        raise
    result.write()
    from server.report_html import write_report_html

    result.html = write_report_html(json_safe(result.to_dict()), result.out_dir / REPORT_HTML)
    result.write()
    if progress is not None:
        progress(FoldEvent("done", len(result.folds), result.num_folds, result.status))
    return result


def _run_folds(grid: Grid, config: RunConfig, spec: CVSpec, result: CVResult,
               progress: CVProgress | None) -> None:
    base_id = config.plan.run_id or f"cv-{config.plan.seed}"
    holdouts: list[tuple[str, int | None]]
    if spec.leave_one_site_out:
        result.site_names = discover_sites(grid, config)
        named = sorted(result.site_names.items(), key=lambda item: (item[1], item[0]))
        holdouts = [(name, node_id) for node_id, name in named]
        if len(holdouts) < 2:
            raise ConfigError(f"leave-one-site-out needs at least two sites; found {len(holdouts)}")
        duplicates = {n for n, _ in holdouts if [m for m, _ in holdouts].count(n) > 1}
        if duplicates:
            raise ConfigError(f"site names must differ for leave-one-site-out: {sorted(duplicates)}")
        result.num_folds = len(holdouts)
    else:
        holdouts = [("", None)] * spec.num_folds
    total = len(holdouts)
    secure = secure_enabled(grid, config)
    result.secure = secure
    for fold, (site, node_id) in enumerate(holdouts):
        plan = replace(config.plan, cv_mode=spec.mode, fold=fold, num_folds=total,
                       holdout_site=site, run_id=fold_run_id(base_id, fold))
        fold_dir = result.out_dir / f"fold-{fold}"
        fold_config = replace(config, plan=plan, out_dir=str(fold_dir))
        label = site if site else f"fold-{fold}"
        outcome = FoldOutcome(fold=fold, label=label, run_id=plan.run_id, directory=fold_dir,
                              holdout_site=site, task=plan.task)
        result.folds.append(outcome)
        if progress is not None:
            progress(FoldEvent("start", fold, total, label, 0, plan.num_rounds))
        train_nodes = heldout_nodes = None
        if node_id is not None:
            others = [n for n in result.site_names if n != node_id]
            train_nodes, heldout_nodes = others, [node_id]
        fold_runner(config)(grid, fold_config, outcome, train_nodes=train_nodes,
                            heldout_nodes=heldout_nodes, progress=progress, num_folds=total,
                            secure=secure)
        _learn_names(result.site_names, outcome)
        result.write()
        if progress is not None:
            progress(FoldEvent("evaluated", fold, total, label, plan.num_rounds, plan.num_rounds,
                               fold_row=outcome.row()))
        if config.on_refusal == "stop" and _stopped_by_refusal(outcome.rounds):
            result.status = "stopped"
            result.reason = (f"a node refused the plan in fold {fold} and on-refusal=stop: "
                             "later folds were not run")
            return


def fold_runner(config: RunConfig) -> Callable[..., FoldOutcome]:
    """What trains and evaluates one fold: the run's paradigm's ``fold`` hook
    (:class:`common.paradigms.Paradigm`), else :func:`run_fold`."""
    from common.paradigms import get_paradigm, load_path

    hook = get_paradigm(config.plan.paradigm).fold
    return load_path(hook) if hook else run_fold


def _learn_names(names: dict[int, str], outcome: FoldOutcome) -> None:
    entries = list(outcome.rounds) + ([outcome.heldout] if outcome.heldout else [])
    for entry in entries:
        for reply in entry.train + entry.evaluate:
            names.setdefault(reply.node_id, reply.site)


# --- Flower entry points -----------------------------------------------------------------------


def build_cv_server_app(
    config: RunConfig | None = None, spec: CVSpec | None = None, *,
    progress: CVProgress | None = None, on_finish: Callable[[CVResult], None] | None = None,
    on_progress: ProgressCallback | None = None,
) -> ServerApp:
    """A ServerApp that runs a cross-validation (config and spec default to the run config).

    ``on_progress`` receives a :class:`~server.progress.ProgressEvent` whenever a node answers.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else RunConfig.from_user_config(context.run_config)
        cv = spec if spec is not None else CVSpec.from_user_config(context.run_config)
        result = run_cross_validation(with_transport(grid, on_progress), cfg, num_folds=cv.num_folds,
                                      leave_one_site_out=cv.leave_one_site_out,
                                      out_dir=Path(cfg.out_dir), progress=progress)
        if on_finish is not None:
            on_finish(result)

    return server_app


def simulate_cross_validation(
    config: RunConfig, nodes: Sequence[Any], spec: CVSpec, *,
    progress: CVProgress | None = None, num_cpus: int | None = None, verbose: bool = False,
    on_progress: ProgressCallback | None = None, engine: str | None = None,
) -> CVResult:
    """Simulate the hospitals ``nodes`` (NodeConfig each) and cross-validate.

    Same runtime settings as :func:`server.simulation.run_simulation` (``engine`` included),
    with the cross-validation ServerApp.
    """
    from server.simulation import simulate_apps

    results: list[CVResult] = []
    server_app = build_cv_server_app(config, spec, progress=progress, on_finish=results.append,
                                     on_progress=on_progress)
    simulate_apps(server_app, config, list(nodes), num_cpus=num_cpus, verbose=verbose,
                  engine=engine)
    if not results:
        raise RuntimeError("the simulated cross-validation ended without a result; see the log "
                           f"(a partial report may be in {config.out_dir})")
    return results[0]
