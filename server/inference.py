"""Coordinator side of pooled statistical inference: query nodes, add their sums, estimate.

Every function takes a Flower :class:`~flwr.serverapp.Grid`, so the same code runs in a
simulation and in a deployment. A query round sends one QUERY message per node
(:func:`query_nodes`); a node that errors, refuses or does not answer within the timeout
becomes an entry of the result's ``failures`` list, never an exception. Replies are pooled by
addition (:func:`common.stats.pooling.sum_stats`): nodes release sums only, so secure
aggregation can replace the addition without changing any estimator. The estimators are those
of :mod:`common.stats`.

* :func:`pooled_metrics`: threshold metrics with CIs, pooled AUC with a DeLong CI (two-pass
  placement protocol), per-site AUCs with DerSimonian-Laird meta-analysis, calibration
  (bins, Brier, ECE), log-likelihood, ROC histograms per site and pooled.
* :func:`paired_comparison`: paired DeLong and McNemar tests of two models.
* :func:`federated_logistic`: Newton-Raphson logistic regression, one query round per step;
  :func:`calibration_regression`: the same for a model's calibration intercept and slope.
* :func:`conformal_prediction`, :func:`predictive_entropy_summary`: split conformal coverage
  and MC-dropout / ensemble predictive entropy.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import messages as k
from common.config import TrainPlan
from common.errors import VesaliusError
from common.stats.glm import LogisticFit
from common.stats.pooling import sum_stats

__all__ = [
    "QueryRound",
    "calibration_regression",
    "conformal_prediction",
    "federated_logistic",
    "inference_section",
    "paired_comparison",
    "pooled_metrics",
    "predictive_entropy_summary",
    "query_nodes",
    "score_calibration",
    "secure_note",
]

log = logging.getLogger(__name__)

Record = ArrayRecord | ConfigRecord | MetricRecord

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass
class QueryRound:
    """Replies to one query round.

    Attributes
    ----------
    values : dict
        Node id -> released values (numbers, or numpy arrays for lists).
    sites : dict
        Node id -> site name the node reported.
    heads : dict
        Node id -> the node's ledger head ``INDEX:HASH`` after its reply (an audit anchor).
    failures : list of dict
        ``{"node_id", "site", "query", "reason"}`` per node that did not answer usably.
    secure : dict or None
        Set when the round was summed under secure aggregation
        (:mod:`server.inference_secure`): ``values`` then holds one pseudo-entry, the pooled
        sums, and ``secure["members"]`` the nodes summed.
    """

    values: dict[int, dict[str, Any]] = field(default_factory=dict)
    sites: dict[int, str] = field(default_factory=dict)
    heads: dict[int, str] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    secure: dict[str, Any] | None = None

    def nodes(self, ids: Sequence[int] | None = None) -> list[int]:
        """The real node ids behind ``ids`` (default: every answering node).

        A secure round's pseudo-entry stands for the nodes it summed.
        """
        out: list[int] = []
        for i in list(self.values) if ids is None else list(ids):
            if self.secure and int(i) < 0:
                out += [int(n) for n in self.secure.get("members", [])]
            else:
                out.append(int(i))
        return out

    def site_names(self) -> list[str]:
        """Names of the sites whose values the round holds (a secure round: all it summed)."""
        return [self.sites.get(i, f"node-{i}") for i in self.nodes()]

    def pooled(self, keys: Sequence[str], nodes: Sequence[int] | None = None) -> dict[str, Any]:
        """Sum ``keys`` over the answering nodes (or the given subset)."""
        ids = list(self.values) if nodes is None else list(nodes)
        return sum_stats([{key: self.values[i][key] for key in keys} for i in ids])


def _values(metrics: MetricRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        out[key] = np.asarray(value, dtype=np.float64) if isinstance(value, list) else value
    return out


def query_nodes(
    grid: Grid,
    node_ids: Sequence[int],
    name: str,
    config: Mapping[str, Any],
    *,
    timeout: float,
    records: Mapping[str, Record] | None = None,
    required: Sequence[str] = (),
) -> QueryRound:
    """Send query ``name`` to every node in ``node_ids``; collect usable replies.

    Parameters
    ----------
    grid
        Flower grid of the running ServerApp.
    node_ids
        Nodes to ask.
    name
        Registered query name (:mod:`client.queries`).
    config
        Config entries (plan, split, query parameters); ``query`` is added.
    timeout
        Seconds to wait for replies.
    records
        Further records of the message (model arrays, pooled histograms).
    required
        Keys a reply must carry to count as an answer.
    """
    from server.inference_secure import current, secure_round, spec_of
    from server.strategies.fedavg import site_of_error

    setting = current()
    if setting is not None and spec_of(name) is not None:
        return secure_round(grid, node_ids, name, config, timeout=timeout, records=records,
                            required=required, setting=setting)
    result = QueryRound()
    if setting is not None:
        log.info("query %s is not covered by secure aggregation: asked in the clear", name)
        result.secure = {"covered": False}
    messages = []
    for node_id in node_ids:
        # One RecordDict per message: records must not be shared between messages.
        content = RecordDict({k.CONFIG: ConfigRecord({**dict(config), k.QUERY: name})})
        for key, record in (records or {}).items():
            content[key] = record
        messages.append(
            Message(content=content, message_type=MessageType.QUERY, dst_node_id=int(node_id))
        )
    try:
        replies = list(grid.send_and_receive(messages, timeout=timeout))
    except Exception as exc:  # noqa: BLE001 - a transport failure fails the round, not the run
        log.warning("query %s: send_and_receive failed: %s", name, exc)
        replies = []
    for msg in replies:
        node_id = int(msg.metadata.src_node_id)
        info = msg.content.get(k.NODE_INFO) if not msg.has_error() else None
        site = str(info.get(k.SITE, f"node-{node_id}")) if isinstance(info, ConfigRecord) else (
            f"node-{node_id}"
        )
        if isinstance(info, ConfigRecord) and k.LEDGER_HEAD in info:
            result.heads[node_id] = str(info[k.LEDGER_HEAD])
        if msg.has_error():  # an error carries no records: named by its reason's site prefix
            result.failures.append({"node_id": node_id, "site": site_of_error(msg),
                                    "query": name, "reason": msg.error.reason})
            continue
        metrics = msg.content.get(k.METRICS)
        values = _values(metrics) if isinstance(metrics, MetricRecord) else {}
        missing = [key for key in required if key not in values]
        if missing:
            result.failures.append({"node_id": node_id, "site": site, "query": name,
                                    "reason": f"reply lacks {', '.join(missing)}"})
            continue
        result.values[node_id] = values
        result.sites[node_id] = site
    answered = {int(m.metadata.src_node_id) for m in replies}
    for node_id in node_ids:
        if int(node_id) not in answered:
            result.failures.append({"node_id": int(node_id), "site": f"node-{node_id}",
                                    "query": name, "reason": "no reply within the timeout"})
    return result


class _Dropped(Exception):
    """A participant failed mid-fit: the fit restarts without it."""


_GLM_REQUIRED = (k.GRAD, k.HESSIAN, k.LOGLIK, k.NUM_EXAMPLES)


def federated_logistic(
    grid: Grid,
    node_ids: Sequence[int],
    columns: Sequence[str],
    *,
    timeout: float,
    plan: TrainPlan | None = None,
    alpha: float = 0.05,
    tol: float = 1e-10,
    max_iter: int = 50,
) -> dict[str, Any]:
    """Fit a logistic regression on the nodes' clinical tables by Newton-Raphson.

    Each Newton step is one ``logistic`` query round at the current coefficients; the nodes'
    gradients, information matrices, log-likelihoods and counts are summed and
    :func:`common.stats.glm.fit_logistic` takes the step. The result equals
    ``statsmodels.api.Logit`` on the pooled rows to the tolerance. A node that fails in any
    round is listed in ``failures`` and the fit restarts without it (so that every step sums
    the same nodes).

    Parameters
    ----------
    grid
        Flower grid.
    node_ids
        Nodes to include.
    columns
        Covariate names from the nodes' allow-list (:mod:`client.data.tabular`); the
        intercept is added first.
    timeout
        Seconds per query round.
    plan
        Run plan sent along (run id for the nodes' ledgers); default ``TrainPlan()``.
    alpha
        1 - confidence level of the Wald intervals.
    tol, max_iter
        Newton convergence tolerance (largest step) and iteration cap.

    Returns
    -------
    dict
        ``status`` ("completed" | "failed"), ``reason``, ``columns``, ``sites`` (names of the
        nodes in the fit), ``failures``, ``query_rounds``, ``noised`` (any node noised) and
        ``fit`` (:meth:`common.stats.glm.LogisticFit.as_dict`, coefficient names
        ``intercept`` then ``columns``).
    """
    cols = [str(c) for c in columns]
    base = {**(plan or TrainPlan()).to_record(), k.COLUMNS: cols}
    out = _newton_fit(grid, node_ids, "logistic", base, names=["intercept", *cols],
                      timeout=timeout, alpha=alpha, tol=tol, max_iter=max_iter)
    return {"columns": cols, **out}


def calibration_regression(
    grid: Grid,
    node_ids: Sequence[int],
    arrays: ArrayRecord,
    plan: TrainPlan,
    *,
    split: str,
    timeout: float,
    alpha: float = 0.05,
    tol: float = 1e-10,
    max_iter: int = 50,
) -> dict[str, Any]:
    """Calibration intercept and slope of a model: ``logit P(y=1) = a + b logit(score)``.

    Newton-Raphson as :func:`federated_logistic`, on the ``calibration-glm`` query (the nodes
    score their held-out patients with ``arrays``). A well calibrated model has ``a = 0`` and
    ``b = 1``; ``b < 1`` means over-confident predictions.
    """
    base = {**plan.to_record(), k.SPLIT: split}
    return _newton_fit(grid, node_ids, "calibration-glm", base, names=["intercept", "slope"],
                       records={k.ARRAYS: arrays}, timeout=timeout, alpha=alpha, tol=tol,
                       max_iter=max_iter)


def score_calibration(
    grid: Grid,
    node_ids: Sequence[int],
    arrays: ArrayRecord,
    plan: TrainPlan,
    *,
    method: str = "platt",
    split: str = k.SPLIT_VAL,
    timeout: float,
    tol: float = 1e-10,
    max_iter: int = 50,
) -> dict[str, Any]:
    """Fit a recalibration map of the model's scores on the nodes' ``split`` (validation).

    Platt scaling ``expit(a + b logit(score))`` or temperature scaling ``expit(logit(score) /
    T)`` (:mod:`common.stats.calibration` says why Platt is the default), by Newton-Raphson on
    the pooled log-likelihood: every step is one ``calibration-glm`` query round, whose
    gradient and information sums at ``(a, b)`` serve both fits (temperature uses the ``b``
    coordinate, :func:`common.stats.calibration.fit_temperature`). The result equals
    maximum likelihood on the pooled validation scores (``scipy.optimize.minimize``).

    Returns
    -------
    dict
        As :func:`calibration_regression`, plus ``method`` and ``calibration``
        (:meth:`common.stats.calibration.ScoreCalibration.as_dict`: the identity, with the
        reason in ``reason``, when the fit failed or its slope is not positive, which would
        reverse the ranking). ``status`` is "completed", "failed" or "none" (not asked).
    """
    from common.stats.calibration import ScoreCalibration, fit_calibration, fit_temperature

    if method == "none":
        return {"status": "none", "reason": "", "method": "none", "failures": [],
                "calibration": ScoreCalibration().as_dict(), "query_rounds": 0}
    base = {**plan.to_record(), k.SPLIT: split}
    start = {"beta0": [0.0, 1.0]} if method == "platt" else {}
    fitter = fit_temperature if method == "temperature" else fit_calibration

    def fit(stats_fn: Callable[..., Any], **kwargs: Any) -> LogisticFit:
        # Start at the identity map; the null (intercept-only) fit is not needed here.
        extra = {"intercept_index": None} if method == "platt" else {}
        return fitter(stats_fn, **start, **extra, **kwargs)

    out = _newton_fit(grid, node_ids, "calibration-glm", base, names=["intercept", "slope"],
                      records={k.ARRAYS: arrays}, timeout=timeout, alpha=0.05, tol=tol,
                      max_iter=max_iter, fit=fit)
    out["method"] = method
    identity = ScoreCalibration().as_dict()
    if out["status"] != "completed":
        out["calibration"] = identity
        return out
    coef = {row["name"]: row["coef"] for row in out["fit"]["coefficients"]}
    slope, intercept = coef.get("slope"), coef.get("intercept", 0.0)
    if slope is None or intercept is None or not slope > 0:
        out.update(status="failed", calibration=identity,
                   reason="the fitted calibration slope is not positive: the map would "
                   "reverse the ranking of the patients; scores are left uncalibrated")
        return out
    out["calibration"] = ScoreCalibration(method, float(intercept), float(slope)).as_dict()
    return out


def _fixed_point_error(res: QueryRound) -> float:
    """The absolute rounding of each cell of a securely summed round (0 in the clear): every
    node's value is released in fixed point, to half a unit of its last place."""
    from server.inference_secure import FIXED_BITS, is_secure

    if not is_secure(res):
        return 0.0
    members = len((res.secure or {}).get("members") or []) or 1
    return members * 2.0 ** -(FIXED_BITS + 1)


def _newton_fit(
    grid: Grid,
    node_ids: Sequence[int],
    query: str,
    base: Mapping[str, Any],
    *,
    names: list[str],
    timeout: float,
    alpha: float,
    tol: float,
    max_iter: int,
    records: Mapping[str, Record] | None = None,
    fit: Callable[..., LogisticFit] | None = None,
) -> dict[str, Any]:
    """Newton-Raphson on summed GLM statistics, one ``query`` round per step.

    ``names`` are the coefficients the nodes' query takes (``beta``). ``fit`` replaces
    :func:`common.stats.glm.fit_logistic` (called as ``fit(stats_fn, alpha=, tol=,
    max_iter=)``) for fits on part of them, e.g.
    :func:`common.stats.calibration.fit_temperature`.
    """
    from common.stats.glm import fit_logistic

    p = len(names)
    participants = [int(n) for n in node_ids]
    failures: list[dict[str, Any]] = []
    rounds = 0
    sites: dict[int, str] = {}
    noised = False

    def stats_fn(beta: np.ndarray) -> dict[str, Any]:
        nonlocal rounds, noised
        rounds += 1
        cfg = {**base, k.BETA: [float(b) for b in beta]}
        res = query_nodes(grid, participants, query, cfg, timeout=timeout, records=records,
                          required=_GLM_REQUIRED)
        sites.update(res.sites)
        if res.failures:
            failures.extend(res.failures)
            gone = [int(f["node_id"]) for f in res.failures if int(f["node_id"]) in participants]
            if not gone:  # a secure sum that failed as a whole (its reason is in failures)
                raise VesaliusError(str(res.failures[-1]["reason"]))
            for node in gone:
                participants.remove(node)
            raise _Dropped
        noised = noised or any(bool(v.get(k.NOISED, 0)) for v in res.values.values())
        pooled = res.pooled(_GLM_REQUIRED)
        return {"grad": pooled[k.GRAD], "hessian": np.asarray(pooled[k.HESSIAN]).reshape(p, p),
                "loglik": pooled[k.LOGLIK], "n": int(round(pooled[k.NUM_EXAMPLES])),
                "sum_error": _fixed_point_error(res)}

    out: dict[str, Any] = {"failures": failures}
    while True:
        if not participants:
            out.update(status="failed", reason=f"no node answered the {query} query",
                       sites=[], query_rounds=rounds, noised=noised)
            return out
        try:
            if fit is None:
                result = fit_logistic(stats_fn, p, names=names, alpha=alpha, tol=tol,
                                      max_iter=max_iter)
            else:
                result = fit(stats_fn, alpha=alpha, tol=tol, max_iter=max_iter)
        except _Dropped:
            continue
        except VesaliusError as exc:
            out.update(status="failed", reason=str(exc),
                       sites=[sites[i] for i in participants if i in sites],
                       query_rounds=rounds, noised=noised)
            return out
        out.update(status="completed", reason="",
                   sites=[sites.get(i, f"node-{i}") for i in participants],
                   query_rounds=rounds, noised=noised, fit=result.as_dict())
        return out


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


_METRICS_REQUIRED = (k.NUM_EXAMPLES, k.TP, k.FP, k.TN, k.FN, k.CAL_COUNT, k.CAL_SCORE_SUM,
                     k.CAL_LABEL_SUM, k.BRIER_SUM, k.LOGLIK)
_PLACEMENT_KEYS = (k.NUM_POSITIVE, k.NUM_NEGATIVE, k.V10_SUM, k.V10_CROSS, k.V01_SUM,
                   k.V01_CROSS)


def _flags(res: QueryRound) -> tuple[bool, int]:
    noised = any(bool(v.get(k.NOISED, 0)) for v in res.values.values())
    suppressed = int(sum(int(v.get(k.SUPPRESSED_CELLS, 0)) for v in res.values.values()))
    return noised, suppressed


def _placement_sums(pooled: Mapping[str, Any], models: int) -> dict[str, Any]:
    """Wire-keyed pooled placement sums -> the names of :mod:`common.stats.auc`."""
    return {
        "n_pos": int(round(float(pooled[k.NUM_POSITIVE]))),
        "n_neg": int(round(float(pooled[k.NUM_NEGATIVE]))),
        "v10_sum": np.asarray(pooled[k.V10_SUM]).reshape(models),
        "v10_cross": np.asarray(pooled[k.V10_CROSS]).reshape(models, models),
        "v01_sum": np.asarray(pooled[k.V01_SUM]).reshape(models),
        "v01_cross": np.asarray(pooled[k.V01_CROSS]).reshape(models, models),
    }


def _placement_estimate(
    res: QueryRound, models: int, estimator: Callable[..., _T]
) -> tuple[_T, bool]:
    """Run a DeLong ``estimator`` on a placements round's pooled sums.

    Returns the estimate and whether any node noised its placement sums (then the sums'
    internal consistency is not checked). :class:`VesaliusError` from the estimator passes.
    """
    placement_noised, _ = _flags(res)
    sums = _placement_sums(res.pooled(_PLACEMENT_KEYS), models)
    return estimator(sums, consistency_tol=None if placement_noised else 1e-9), placement_noised


def _metrics_config(
    plan: TrainPlan, *, split: str, threshold: float, calibration_bins: int,
    calibration: Sequence[float] | None = None, with_histograms: bool = True,
) -> dict[str, Any]:
    """Config of a ``metrics`` (and ``placements``) round.

    ``calibration`` = ``[intercept, slope]``: the nodes score with the calibrated
    probabilities ``expit(intercept + slope logit(score))`` (:mod:`client.queries.metrics`).
    """
    out: dict[str, Any] = {**plan.to_record(), k.SPLIT: split, k.THRESHOLD: float(threshold),
                           k.CALIBRATION_BINS: int(calibration_bins),
                           k.WITH_HISTOGRAMS: bool(with_histograms)}
    if calibration is not None:
        out[k.BETA] = [float(c) for c in calibration]
    return out


def _metrics_round(
    grid: Grid, node_ids: Sequence[int], base: Mapping[str, Any], arrays: ArrayRecord,
    *, timeout: float
) -> QueryRound:
    """One ``metrics`` query round of the model ``arrays``."""
    return query_nodes(grid, node_ids, "metrics", base, timeout=timeout,
                       records={k.ARRAYS: arrays}, required=_METRICS_REQUIRED)


def _histogram_auc(value: float, n: int) -> dict[str, Any]:
    """The pooled histogram AUC without a confidence interval."""
    return {"value": value, "lower": None, "upper": None, "se": None, "n": n,
            "method": "histogram"}


def _histograms(
    res: QueryRound, pos_key: str = k.HIST_POSITIVE, neg_key: str = k.HIST_NEGATIVE
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {nid: (np.asarray(v[pos_key]), np.asarray(v[neg_key]))
            for nid, v in res.values.items() if pos_key in v and neg_key in v}


def _confusion_from_histograms(
    hists: Mapping[int, tuple[np.ndarray, np.ndarray]], ids: Sequence[int], threshold: float
) -> dict[str, int] | None:
    """Confusion counts at ``threshold`` from every node's fine histograms, when possible."""
    from common.stats.bins import fine_score_edges

    if not ids or any(i not in hists for i in ids):
        return None
    edges = fine_score_edges()
    cut = np.flatnonzero(np.isclose(edges, threshold, rtol=0.0, atol=1e-12))
    if not cut.size or hists[ids[0]][0].size != edges.size - 1 or int(cut[0]) >= edges.size - 1:
        # No edge at the threshold, or the threshold is the top edge (the last bin is closed on
        # the right, so scores equal to it sit below the cut): count from the cells instead.
        return None
    t = int(cut[0])  # bins t.. hold scores >= threshold (predicted positive)
    pos = np.sum([hists[i][0] for i in ids], axis=0)
    neg = np.sum([hists[i][1] for i in ids], axis=0)
    return {"tp": int(round(float(pos[t:].sum()))), "fn": int(round(float(pos[:t].sum()))),
            "fp": int(round(float(neg[t:].sum()))), "tn": int(round(float(neg[:t].sum())))}


def _pooled_record(hists: Sequence[tuple[np.ndarray, np.ndarray]]) -> MetricRecord:
    """The pooled histograms of one or two models, sent back for pass 2."""
    keys = [(k.HIST_POSITIVE, k.HIST_NEGATIVE), (k.HIST_POSITIVE_B, k.HIST_NEGATIVE_B)]
    values: dict[str, int | float | list[int] | list[float]] = {}
    for (pk, nk), (pos, neg) in zip(keys, hists, strict=False):
        values[pk] = [int(round(float(x))) for x in pos]
        values[nk] = [int(round(float(x))) for x in neg]
    return MetricRecord(values)


def _site_delong(
    values: Mapping[str, Any], pos: np.ndarray, neg: np.ndarray
) -> tuple[float, float]:
    """A site's AUC and DeLong variance from its histograms and its own placement sums."""
    from common.stats.auc import delong_from_sums
    from common.stats.histogram import auc_from_histograms

    auc = auc_from_histograms(pos, neg)
    n_pos, n_neg = int(round(float(pos.sum()))), int(round(float(neg.sum())))
    sums = {"n_pos": n_pos, "n_neg": n_neg, "v10_sum": np.array([auc * n_pos]),
            "v10_cross": np.asarray(values[k.SITE_V10_CROSS]).reshape(1, 1),
            "v01_sum": np.array([auc * n_neg]),
            "v01_cross": np.asarray(values[k.SITE_V01_CROSS]).reshape(1, 1)}
    res = delong_from_sums(sums)
    return res.auc, res.var


def _calibration(cal: Mapping[str, Any], bins: int) -> dict[str, Any]:
    """Reliability diagram, ECE and Brier score of pooled calibration sums."""
    from common.stats.bins import uniform_edges
    from common.stats.calibration import (
        brier_from_sums,
        expected_calibration_error,
        reliability_diagram,
    )

    try:
        return {"bins": reliability_diagram(cal, edges=uniform_edges(bins)),
                "ece": _finite(expected_calibration_error(cal)),
                "brier": _finite(brier_from_sums(cal))}
    except VesaliusError as exc:
        return {"bins": None, "ece": None, "brier": None, "note": str(exc)}


def _calibration_sums_from_histograms(
    pos: np.ndarray, neg: np.ndarray, bins: int, sq_error_sum: float
) -> dict[str, Any]:
    """Calibration-bin sums counted from pooled fine score histograms.

    Used where small calibration cells were suppressed at some node (released as 0) but every
    node released its (unsuppressed, consented) fine histograms: counts and label sums per
    calibration bin are then exact, score sums take each fine bin's centre (off by at most
    half a fine bin, 1e-4, per patient). Every fine bin lies inside one calibration bin when
    ``bins`` divides 5000 (the fine grid's uniform part). The Brier sum is released whole.
    """
    from common.stats.bins import bin_centres, bin_index, fine_score_edges, uniform_edges

    centres = bin_centres(fine_score_edges())
    coarse = bin_index(centres, uniform_edges(bins))
    both = pos + neg
    return {"count": np.bincount(coarse, weights=both, minlength=bins).round(),
            "score_sum": np.bincount(coarse, weights=both * centres, minlength=bins),
            "label_sum": np.bincount(coarse, weights=pos, minlength=bins),
            "sq_error_sum": float(sq_error_sum)}


_HIDDEN = "hidden by secure aggregation"


def secure_note(res: QueryRound) -> dict[str, Any]:
    """What a round's secure aggregation covered, for the report."""
    info = res.secure or {}
    if not info.get("covered"):
        return {"covered": False, "note": "this query is not covered by secure aggregation: "
                "its per-hospital sums were received in the clear"}
    session = info.get("session") or {}
    return {"covered": True, "sites_summed": len(info.get("members", [])),
            "shares_needed": session.get("threshold"), "status": session.get("status"),
            "dropped": [d.get("site") for d in session.get("dropped", [])],
            "partial": list(info.get("partial", [])),
            "note": "the coordinator saw only the sums over the hospitals: per-site values "
                    "and the between-site meta-analysis are hidden"}


def _report_schema(raw: dict[str, Any]) -> dict[str, Any]:
    """Reshape to the ``inference`` schema of :mod:`server.report_html`."""
    from common.stats.histogram import compress_histograms

    out = dict(raw)
    if "metrics" not in out:  # failed before any metric
        return out
    cal = out.pop("calibration")
    auc = out.pop("auc")
    metrics = dict(out["metrics"])
    if auc is not None:
        metrics["auc"] = auc
    metrics["brier"], metrics["ece"] = cal["brier"], cal["ece"]
    out["metrics"] = metrics
    flat = dict(cal["bins"] or {})
    flat.update({key: v for key, v in cal.items() if key != "bins"})
    out["calibration"] = flat
    meta = {"auc": out.pop("meta_auc"), "sensitivity": out.pop("meta_sensitivity")}
    out["meta"] = {key: v for key, v in meta.items() if v is not None}

    def small(h: Mapping[str, Any]) -> dict[str, list[int]]:
        p_, n_ = compress_histograms(h["pos"], h["neg"])
        return {"pos": p_.astype(int).tolist(), "neg": n_.astype(int).tolist()}

    roc = out.get("roc") or {}
    out["roc"] = ({"pooled": small(roc["pooled"]),
                   "sites": {name: small(h) for name, h in roc["sites"].items()}}
                  if roc else {})
    return out


def _report_shaped(fn: Callable[_P, dict[str, Any]]) -> Callable[_P, dict[str, Any]]:
    """Pass ``fn``'s raw result through :func:`_report_schema`."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> dict[str, Any]:
        return _report_schema(fn(*args, **kwargs))

    return wrapper


@_report_shaped
def pooled_metrics(
    grid: Grid,
    node_ids: Sequence[int],
    arrays: ArrayRecord,
    plan: TrainPlan,
    *,
    split: str,
    timeout: float,
    alpha: float = 0.05,
    threshold: float = 0.5,
    calibration_bins: int = 10,
    ci_method: str = "wilson",
    calibration: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Pooled inference on one model over the nodes' held-out patients (two query rounds).

    Round 1 (``metrics``): confusion counts, calibration sums, Brier and log-likelihood sums,
    and per-class score histograms from the nodes that consent to release them. Round 2
    (``placements``, only to the nodes whose histograms were pooled): DeLong placement sums
    against the pooled histograms, and against each node's own (per-site variance).

    Parameters
    ----------
    grid, node_ids
        Flower grid and the nodes to ask.
    arrays
        The model's weights.
    plan
        Run plan (model, image size, CV fields) the nodes build the model and split from.
    split
        ``"val"``, ``"test"`` or ``"heldout"`` (cross-validation fold).
    timeout
        Seconds per query round.
    alpha
        1 - confidence level of every interval.
    threshold
        Score threshold of the threshold metrics.
    calibration_bins
        Equal-width calibration bins.
    ci_method
        ``"wilson"`` or ``"beta"`` (Clopper-Pearson) for the proportions.
    calibration
        ``[intercept, slope]`` of a recalibration map
        (:class:`common.stats.calibration.ScoreCalibration`): every statistic, the threshold
        included, is then on the calibrated probabilities. ``None``: the model's own scores.

    Returns
    -------
    dict
        The ``inference`` section of :mod:`server.report_html` for one model: ``metrics``
        (accuracy, sensitivity, recall, specificity, precision, f1 and, when histograms were
        released, ``auc`` with its DeLong CI, as ``Estimate.as_dict()``; ``brier``, ``ece``),
        ``roc`` (pooled and per-site histograms, empty bins dropped), ``calibration``
        (reliability diagram, ``brier``, ``ece``), ``meta`` (``auc`` and ``sensitivity``
        DerSimonian-Laird, where at least two sites qualify); and besides: ``status``,
        ``reason``, ``split``, ``threshold``, ``alpha``, ``n``, ``sites``, ``failures`` (nodes
        that did not answer usably, with the reason), ``noised``, ``suppressed_cells``,
        ``confusion``, ``loglik``, ``mean_loglik``, ``auc_sites`` (per-site AUC and DeLong CI)
        and ``auc_note``.
    """
    # The body builds the raw result (``auc``, ``meta_auc`` and ``meta_sensitivity`` at the top
    # level, ``calibration`` as {"bins", "brier", "ece"}, full histograms); the decorator
    # reshapes it to the report schema.
    from common.stats.auc import auc_ci, delong_from_sums
    from common.stats.histogram import auc_from_histograms
    from common.stats.meta import logit_auc_effects, logit_proportion_effects, random_effects
    from common.stats.metrics import classification_metrics

    base = _metrics_config(plan, split=split, threshold=threshold,
                           calibration_bins=calibration_bins, calibration=calibration)
    first = _metrics_round(grid, node_ids, base, arrays, timeout=timeout)
    out: dict[str, Any] = {"split": split, "threshold": float(threshold), "alpha": alpha,
                           "failures": list(first.failures),
                           # node id -> ledger head after its last release here (audit anchor)
                           "ledger_heads": dict(first.heads)}
    if not first.values:
        out.update(status="failed", reason="no node answered the metrics query")
        return out
    ids = list(first.values)
    names = first.site_names()
    secure = first.secure is not None and bool(first.secure.get("covered"))
    noised, suppressed = _flags(first)
    pooled = first.pooled(_METRICS_REQUIRED)
    confusion = {name: int(round(float(pooled[key]))) for name, key in
                 (("tp", k.TP), ("fp", k.FP), ("tn", k.TN), ("fn", k.FN))}
    metrics_note = ""
    if suppressed and not noised:
        # Small cells were released as 0: estimates on those counts would not equal the
        # pooled-data computation. Where every node released its (unsuppressed, consented)
        # fine histograms and the threshold is a bin edge, count from the histograms instead.
        from_hists = _confusion_from_histograms(_histograms(first), ids, threshold)
        if from_hists is not None:
            confusion = from_hists
            metrics_note = ("small cells were suppressed at some node: threshold metrics are "
                            "counted from the released score histograms instead")
        else:
            metrics_note = (f"{suppressed} small cell(s) were suppressed (released as 0): "
                            "threshold metrics and calibration are computed on suppressed "
                            "counts and differ from the pooled-data values")
    counts = np.maximum(np.rint(pooled[k.CAL_COUNT]), 0.0)
    cal = {"count": counts, "score_sum": pooled[k.CAL_SCORE_SUM],
           "label_sum": pooled[k.CAL_LABEL_SUM], "sq_error_sum": pooled[k.BRIER_SUM]}
    if noised:
        # Post-processing of noised sums (no privacy cost): back into their feasible ranges.
        cal["score_sum"] = np.clip(cal["score_sum"], 0.0, counts)
        cal["label_sum"] = np.clip(cal["label_sum"], 0.0, counts)
        cal["sq_error_sum"] = float(np.clip(cal["sq_error_sum"], 0.0, counts.sum()))
    n = int(round(float(pooled[k.NUM_EXAMPLES])))
    out.update(
        status="completed", reason="", n=n, sites=names, noised=noised,
        suppressed_cells=suppressed, confusion=confusion, metrics_note=metrics_note,
        metrics={name: est.as_dict() for name, est in
                 classification_metrics(confusion, alpha=alpha, method=ci_method).items()},
        calibration=_calibration(cal, calibration_bins),
        loglik=float(pooled[k.LOGLIK]), mean_loglik=float(pooled[k.LOGLIK]) / max(n, 1),
        auc=None, auc_note="", auc_sites=[], meta_auc=None, meta_sensitivity=None, roc={},
    )
    if first.secure is not None:
        out["secure_aggregation"] = secure_note(first)
    if secure:
        # Only the sums over the hospitals were learned: no per-site row, no meta-analysis.
        out["per_site"] = _HIDDEN
    # Per-site sensitivity meta-analysis (logit scale) from the sites' confusion counts.
    tps = [int(round(float(first.values[i][k.TP]))) for i in ids]
    pos_counts = [tps[j] + int(round(float(first.values[i][k.FN]))) for j, i in enumerate(ids)]
    if len(ids) >= 2 and all(c > 0 for c in pos_counts):
        try:
            sens_est, sens_var = logit_proportion_effects(tps, pos_counts)
            out["meta_sensitivity"] = random_effects(sens_est, sens_var, alpha=alpha,
                                                     site_names=names, scale="logit").as_dict()
        except VesaliusError as exc:
            log.info("sensitivity meta-analysis skipped: %s", exc)
    hists = _histograms(first)
    if not hists:
        out["auc_note"] = "no node released score histograms (release-histograms is off)"
        if secure and (first.secure or {}).get("partial"):
            out["auc_note"] = ("not every hospital released score histograms, and which did "
                               "is hidden by secure aggregation: no pooled AUC")
        return out
    pos = np.sum([h[0] for h in hists.values()], axis=0)
    neg = np.sum([h[1] for h in hists.values()], axis=0)
    if suppressed and not noised and len(hists) == len(ids):
        out["calibration"] = _calibration(
            _calibration_sums_from_histograms(pos, neg, calibration_bins, cal["sq_error_sum"]),
            calibration_bins)
        out["calibration"]["note"] = (
            "small calibration cells were suppressed at some node: the reliability diagram "
            "and ECE are counted from the released score histograms (scores at their fine "
            "bins' centres)")
    out["roc"] = {
        "pooled": {"pos": pos.astype(int).tolist(), "neg": neg.astype(int).tolist()},
        "sites": {} if secure else {
            first.sites[i]: {"pos": h[0].astype(int).tolist(), "neg": h[1].astype(int).tolist()}
            for i, h in hists.items()},
    }
    if pos.sum() == 0 or neg.sum() == 0:
        out["auc_note"] = "AUC undefined: one class is absent from the pooled patients"
        return out
    hist_ids = list(hists)
    if len(hist_ids) < len(ids):
        out["auc_note"] = (f"AUC pools the {len(hist_ids)} of {len(ids)} sites that release "
                           "score histograms")
    second = query_nodes(grid, first.nodes(hist_ids), "placements", base, timeout=timeout,
                         records={k.ARRAYS: arrays, k.POOLED: _pooled_record([(pos, neg)])},
                         required=_PLACEMENT_KEYS)
    out["failures"].extend(second.failures)
    out["ledger_heads"].update(second.heads)
    auc_value = auc_from_histograms(pos, neg)
    n_scored = int(pos.sum() + neg.sum())
    if second.failures:
        out["auc"] = _histogram_auc(auc_value, n_scored)
        out["auc_note"] = ("DeLong CI unavailable: not every node whose histograms were "
                           "pooled returned its placement sums")
    else:
        try:
            res, placement_noised = _placement_estimate(second, 1, delong_from_sums)
        except VesaliusError as exc:
            out["auc"] = _histogram_auc(auc_value, n_scored)
            out["auc_note"] = f"DeLong CI unavailable: {exc}"
        else:
            # Noised placement sums give a noisy mean too: keep the (noised, but valid)
            # histogram AUC as the point estimate and take only the variance from them.
            point = auc_value if placement_noised else res.auc
            out["auc"] = auc_ci(point, res.var, n=n_scored, alpha=alpha).as_dict()
    site_rows: list[dict[str, Any]] = []
    est: list[float] = []
    var: list[float] = []
    sizes: list[int] = []
    site_names: list[str] = []
    for nid in [] if secure else hist_ids:
        values = second.values.get(nid, {})
        p_, n_ = hists[nid]
        row: dict[str, Any] = {"site": first.sites[nid], "n_pos": int(p_.sum()),
                               "n_neg": int(n_.sum()),
                               "auc": _finite(auc_from_histograms(p_, n_)), "var": None}
        if k.SITE_V10_CROSS in values and p_.sum() >= 2 and n_.sum() >= 2:
            try:
                a, v = _site_delong(values, p_, n_)
            except VesaliusError as exc:
                row["note"] = str(exc)
            else:
                row.update(auc_ci(a, v, n=int(p_.sum() + n_.sum()), alpha=alpha).as_dict())
                row["auc"], row["var"] = a, v
                if v > 0:
                    est.append(a)
                    var.append(v)
                    sizes.append(int(p_.sum() + n_.sum()))
                    site_names.append(first.sites[nid])
        site_rows.append(row)
    out["auc_sites"] = site_rows
    if len(est) >= 2:
        try:
            logit_est, logit_var = logit_auc_effects(est, var, sizes)
            out["meta_auc"] = random_effects(logit_est, logit_var, alpha=alpha,
                                             site_names=site_names, scale="logit").as_dict()
        except VesaliusError as exc:
            log.info("AUC meta-analysis skipped: %s", exc)
    return out


def inference_section(
    metrics: Mapping[str, Any],
    *,
    paired: Mapping[str, Any] | None = None,
    calibration_fit: Mapping[str, Any] | None = None,
    glm: Mapping[str, Any] | None = None,
    conformal: Mapping[str, Any] | None = None,
    uncertainty: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble ``report.json``'s ``inference`` section from the results of this module.

    ``metrics`` is :func:`pooled_metrics`' result; ``paired`` :func:`paired_comparison`'s
    (shown as ``tests``); ``calibration_fit`` :func:`calibration_regression`'s (intercept and
    slope go into ``calibration``); ``glm`` :func:`federated_logistic`'s; ``conformal`` and
    ``uncertainty`` those of :func:`conformal_prediction` and
    :func:`predictive_entropy_summary`.
    """
    out = dict(metrics)
    if paired is not None:
        out["tests"] = {"paired_delong": paired.get("delong"), "mcnemar": paired.get("mcnemar")}
    fit = (calibration_fit or {}).get("fit")
    if fit:
        cal = dict(out.get("calibration") or {})
        for row in fit["coefficients"]:
            cal[row["name"]] = {"value": row["coef"], "lower": row["ci_lower"],
                                "upper": row["ci_upper"], "se": row["se"], "method": "wald"}
        out["calibration"] = cal
    if glm is not None:
        out["glm"] = glm.get("fit") or {"status": glm.get("status"), "reason": glm.get("reason")}
    if conformal is not None:
        out["conformal"] = dict(conformal)
    if uncertainty is not None:
        out["uncertainty"] = dict(uncertainty)
    return out


def paired_comparison(
    grid: Grid,
    node_ids: Sequence[int],
    arrays_a: ArrayRecord,
    arrays_b: ArrayRecord,
    plan: TrainPlan,
    *,
    split: str,
    timeout: float,
    threshold: float = 0.5,
    calibration_bins: int = 10,
) -> dict[str, Any]:
    """Compare two models on the same held-out patients: paired DeLong and McNemar.

    Rounds: ``metrics`` for each model (histograms), ``placements`` with both models against
    both pooled histograms (cross-products give the covariance), and ``mcnemar``.

    Returns
    -------
    dict
        ``delong`` (auc_a, auc_b, diff, se, z, p, or ``None`` with ``delong_note``),
        ``mcnemar`` (``exact`` and ``chi2`` with statistic, p-value, b, c), ``sites`` and
        ``failures``.
    """
    from common.stats.auc import paired_delong_from_sums
    from common.stats.hypothesis import mcnemar_test

    base = _metrics_config(plan, split=split, threshold=threshold,
                           calibration_bins=calibration_bins)
    out: dict[str, Any] = {"split": split, "threshold": float(threshold), "failures": [],
                           "delong": None, "delong_note": "", "mcnemar": None}
    firsts = [_metrics_round(grid, node_ids, base, arr, timeout=timeout)
              for arr in (arrays_a, arrays_b)]
    for res in firsts:
        out["failures"].extend(res.failures)
    ha, hb = _histograms(firsts[0]), _histograms(firsts[1])
    both = [i for i in ha if i in hb]
    if both:
        pooled = [tuple(np.sum([h[i][j] for i in both], axis=0) for j in (0, 1))
                  for h in (ha, hb)]
        ask = [n for n in firsts[0].nodes(both) if n in firsts[1].nodes(both)]
        second = query_nodes(
            grid, ask, "placements", base, timeout=timeout,
            records={k.ARRAYS: arrays_a, k.ARRAYS_B: arrays_b,
                     k.POOLED: _pooled_record(pooled)},  # type: ignore[arg-type]
            required=_PLACEMENT_KEYS,
        )
        out["failures"].extend(second.failures)
        if second.failures or not second.values:
            out["delong_note"] = "paired DeLong unavailable: a node did not return placements"
        else:
            try:
                r, _ = _placement_estimate(second, 2, paired_delong_from_sums)
            except VesaliusError as exc:
                out["delong_note"] = str(exc)
            else:
                out["delong"] = {"auc_a": r.auc_a, "auc_b": r.auc_b, "diff": r.diff,
                                 "se": r.se, "z": _finite(r.z), "p": r.p}
    else:
        out["delong_note"] = "no node released score histograms for both models"
    keys = (k.BOTH_CORRECT, k.ONLY_A_CORRECT, k.ONLY_B_CORRECT, k.BOTH_WRONG)
    mc = query_nodes(grid, node_ids, "mcnemar", base, timeout=timeout,
                     records={k.ARRAYS: arrays_a, k.ARRAYS_B: arrays_b}, required=keys)
    out["failures"].extend(mc.failures)
    out["sites"] = mc.site_names()
    if mc.values:
        pooled_mc = mc.pooled(keys)
        b = int(round(float(pooled_mc[k.ONLY_A_CORRECT])))
        c = int(round(float(pooled_mc[k.ONLY_B_CORRECT])))
        exact = mcnemar_test(b, c, exact=True)
        chi = mcnemar_test(b, c, exact=False, correction=True)
        out["mcnemar"] = {
            "b": b, "c": c,
            "both_correct": int(round(float(pooled_mc[k.BOTH_CORRECT]))),
            "both_wrong": int(round(float(pooled_mc[k.BOTH_WRONG]))),
            "exact": {"statistic": exact.statistic, "p": exact.pvalue},
            "chi2": {"statistic": chi.statistic, "p": chi.pvalue},
        }
    return out


def conformal_prediction(
    grid: Grid,
    node_ids: Sequence[int],
    arrays: ArrayRecord,
    plan: TrainPlan,
    *,
    timeout: float,
    alpha: float = 0.1,
    calibration_split: str = k.SPLIT_VAL,
    test_split: str = k.SPLIT_TEST,
    bins: int = 10_000,
) -> dict[str, Any]:
    """Split conformal prediction with the pooled quantile of nonconformity scores.

    Round 1 on ``calibration_split``: nonconformity histograms; the coordinator computes the
    threshold ``qhat`` (:func:`common.stats.conformal.conformal_quantile`). Round 2 on
    ``test_split``: coverage counts at ``qhat``; pooled empirical coverage with a Wilson CI.
    """
    from common.stats.conformal import conformal_edges, conformal_quantile, coverage_summary

    base = {**plan.to_record(), k.VALUE_BINS: int(bins)}
    cal = query_nodes(grid, node_ids, "conformal", {**base, k.SPLIT: calibration_split},
                      timeout=timeout, records={k.ARRAYS: arrays},
                      required=(k.NONCONFORMITY_HIST,))
    out: dict[str, Any] = {"alpha": alpha, "failures": list(cal.failures), "qhat": None,
                           "coverage": None}
    if not cal.values:
        out.update(status="failed", reason="no node released a calibration histogram")
        return out
    hist = np.rint(cal.pooled((k.NONCONFORMITY_HIST,))[k.NONCONFORMITY_HIST])
    qhat = conformal_quantile(hist, alpha=alpha, edges=conformal_edges(bins))
    out.update(qhat=_finite(qhat), n_calibration=int(hist.sum()),
               calibration_sites=[cal.sites[i] for i in cal.values])
    test = query_nodes(grid, node_ids, "conformal",
                       {**base, k.SPLIT: test_split,
                        k.CONFORMAL_QHAT: qhat if math.isfinite(qhat) else 2.0},
                       timeout=timeout, records={k.ARRAYS: arrays},
                       required=(k.NUM_EXAMPLES, k.COVERED, k.SET_SIZE_COUNTS))
    out["failures"].extend(test.failures)
    if not test.values:
        out.update(status="failed", reason="no node returned coverage counts")
        return out
    pooled = test.pooled((k.NUM_EXAMPLES, k.COVERED, k.SET_SIZE_COUNTS))
    sizes = np.maximum(np.rint(pooled[k.SET_SIZE_COUNTS]), 0).astype(int)
    # Exact releases satisfy n = sum of set sizes; noised ones are post-processed to it.
    n_test = int(sizes.sum())
    counts = {"n": n_test,
              "covered": min(max(int(round(float(pooled[k.COVERED]))), 0), n_test),
              "set_size_0": int(sizes[0]), "set_size_1": int(sizes[1]),
              "set_size_2": int(sizes[2])}
    try:
        summary = coverage_summary(counts)
    except VesaliusError as exc:
        out.update(status="failed", reason=str(exc))
        return out
    out.update(status="completed", reason="", test_sites=[test.sites[i] for i in test.values],
               **summary)
    return out


def predictive_entropy_summary(
    grid: Grid,
    node_ids: Sequence[int],
    plan: TrainPlan,
    *,
    split: str,
    timeout: float,
    arrays: ArrayRecord | None = None,
    ensemble: Sequence[ArrayRecord] = (),
    mc_samples: int = 20,
    bins: int = 50,
) -> dict[str, Any]:
    """Pooled predictive entropy: MC-dropout of ``arrays`` or a deep ``ensemble``.

    Returns the pooled mean, SD, histogram and quantiles
    (:func:`common.stats.uncertainty.entropy_summary`) and the same per site.
    """
    from common.stats.uncertainty import entropy_edges, entropy_summary

    records: dict[str, Record] = {f"{k.ENSEMBLE_PREFIX}{i}": a for i, a in enumerate(ensemble)}
    if not records:
        if arrays is None:
            raise ValueError("give arrays (MC-dropout) or an ensemble")
        records[k.ARRAYS] = arrays
    cfg = {**plan.to_record(), k.SPLIT: split, k.MC_SAMPLES: int(mc_samples),
           k.VALUE_BINS: int(bins)}
    keys = (k.NUM_EXAMPLES, k.ENTROPY_SUM, k.ENTROPY_SQ_SUM, k.ENTROPY_HIST)
    res = query_nodes(grid, node_ids, "entropy", cfg, timeout=timeout, records=records,
                      required=keys)
    out: dict[str, Any] = {"split": split, "failures": list(res.failures),
                           "method": "ensemble" if ensemble else "mc-dropout"}
    if not res.values:
        out.update(status="failed", reason="no node answered the entropy query")
        return out
    edges = entropy_edges(bins=bins)

    def summary(values: Mapping[str, Any]) -> dict[str, Any]:
        hist = np.maximum(np.rint(values[k.ENTROPY_HIST]), 0)
        # Exact releases satisfy n = histogram total; noised ones are post-processed to it.
        return entropy_summary({"n": int(hist.sum()), "sum": float(values[k.ENTROPY_SUM]),
                                "sum_sq": float(values[k.ENTROPY_SQ_SUM]), "hist": hist},
                               edges=edges)

    try:
        out.update(status="completed", reason="", pooled=summary(res.pooled(keys)),
                   sites={res.sites[i]: summary(v) for i, v in res.values.items()})
    except VesaliusError as exc:
        out.update(status="failed", reason=str(exc))
    return out


def federated_elm_readout(
    grid: Grid,
    node_ids: Sequence[int],
    arrays: ArrayRecord,
    plan: TrainPlan,
    *,
    ridge: float,
    clip: float = 1.0,
    timeout: float,
) -> tuple[ArrayRecord | None, dict[str, Any]]:
    """Fit a DC-ELM's readout in closed form from every node's training-patient sums.

    One ``elm-readout`` query round: each node releases ``H^T H`` and ``H^T Y`` over its
    training patients (rows clipped per patient to ``clip``; noised and charged to its ledger
    when the node says so); the coordinator sums them and solves
    ``beta = (sum H^T H + ridge I)^-1 sum H^T Y`` once, which is the ridge solution on the
    pooled rows (exactly, when no node adds noise).

    Noised sums: Gaussian noise on ``H^T H`` is symmetric but not positive semi-definite, and
    its negative eigenvalues (about ``-sqrt(2 d)`` times the pooled noise std) would make a
    small ``ridge`` give an indefinite, meaningless system. The coordinator does not know the
    nodes' noise, so it reads the scale off the pooled matrix: when any node noised, the ridge
    used is ``ridge + 2 max(0, -lambda_min)`` (post-processing of released values: no privacy
    cost), which keeps the system's smallest eigenvalue at least ``ridge + |lambda_min|``.

    Returns
    -------
    tuple
        The model's arrays with the fitted readout (None when no node answered) and a summary:
        ``status``, ``sites``, ``failures``, ``noised``, ``ridge`` (requested), ``ridge_used``,
        ``min_eigenvalue`` (of the pooled symmetrised ``H^T H``), ``features`` (``d``, bias
        column included), ``clip``.
    """
    import torch

    from common.models import build_model

    config = {**plan.to_record(), k.SPLIT: k.SPLIT_TRAIN, k.ELM_CLIP: float(clip)}
    res = query_nodes(grid, node_ids, "elm-readout", config, timeout=timeout,
                      records={k.ARRAYS: arrays}, required=(k.ELM_HTH, k.ELM_HTY))
    summary: dict[str, Any] = {"ridge": ridge, "clip": clip, "failures": list(res.failures),
                               "sites": [res.sites[i] for i in res.values]}
    if not res.values:
        summary.update(status="failed", reason="no node answered the elm-readout query")
        return None, summary
    from common.tasks.federated import federated_task

    # The plan's outputs (2 for binary, K for multiclass), as the coordinator built the model.
    outputs = federated_task(plan.task, plan.model).num_outputs(plan.num_classes)
    model = build_model(plan.model, in_channels=1, num_classes=outputs, image_size=plan.image_size)
    model.load_state_dict(arrays.to_torch_state_dict())
    readout: Any = getattr(model, "readout")  # noqa: B009 - a DC-ELM's linear readout
    d, classes = int(readout.weight.shape[1]), int(readout.weight.shape[0])
    pooled = res.pooled([k.ELM_HTH, k.ELM_HTY])
    hth = torch.as_tensor(np.asarray(pooled[k.ELM_HTH], dtype=np.float64).reshape(d, d))
    hty = torch.as_tensor(np.asarray(pooled[k.ELM_HTY], dtype=np.float64).reshape(d, classes))
    hth = (hth + hth.T) / 2  # noised sums need not be symmetric; the mean is (post-processing)
    noised, _ = _flags(res)
    min_eig = float(torch.linalg.eigvalsh(hth)[0])
    ridge_used = float(ridge) + (2.0 * max(0.0, -min_eig) if noised else 0.0)
    beta = model.solve_readout(hth, hty, ridge_used)  # type: ignore[operator]
    model.set_readout(beta)  # type: ignore[operator]
    summary.update(status="completed", reason="", noised=noised, ridge_used=ridge_used,
                   min_eigenvalue=min_eig, features=d)
    return ArrayRecord(model.state_dict()), summary
