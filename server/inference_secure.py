"""Statistics queries summed under secure aggregation (the coordinator's half).

While :func:`secure_queries` is active (the run's secure aggregation is on:
:func:`server.app.final_inference`, :func:`server.cv.run_cross_validation`), every query
round of :func:`server.inference.query_nodes` whose query has a key specification here
(:func:`register_spec`) goes through :func:`server.strategies.secagg_session.secure_sum`:
the nodes release their sums under their own rules (noise, small-cell suppression), re-encode
them as exact integers (:mod:`client.queries.secure_release`: two 32-bit cells per value,
fixed point with 32 fractional bits) and mask them; the coordinator learns only the sum over
the survivors of the session. Integer sums are exact; a float sum is off by at most
``n_nodes * 2^-33``.

The round's :class:`server.inference.QueryRound` then holds one pseudo-entry,
:data:`SECURE_ID`, whose values are the pooled sums, so that every estimator that adds up
``values`` reads the same numbers as in the clear; ``secure`` says which nodes contributed
(``members``), who dropped and why, and which keys only some nodes released (``partial``:
their sums are left out, since which nodes they cover is hidden). Per-hospital values
(per-site rows, the between-site meta-analyses) cannot be computed: the sections say
:data:`HIDDEN`.

A query without a specification is asked in the clear as before, and the round's
``secure`` says so (``{"covered": False}``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from common import messages as k
from common.stats.bins import fine_score_edges

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from server.inference import QueryRound, Record

__all__ = ["FIXED_BITS", "HIDDEN", "SECURE_ID", "SecureQueries", "current", "decode_fixed",
           "is_secure", "register_spec", "secure_queries", "secure_round", "spec_of"]

log = logging.getLogger(__name__)

FIXED_BITS = 32  # as client.queries.secure_release
FIXED_BITS_KEY = "secagg-fixed-bits"
PRESENT_KEY = "secagg-present"
SUFFIX = ".fx"
OFFSET = 2**30
SECURE_ID = -1
"""The pseudo node id of a secure round's one entry (the pooled sums)."""
HIDDEN = "hidden by secure aggregation"


@dataclass(frozen=True)
class SecureQueries:
    """The run's secure-aggregation setting for statistics queries."""

    min_survivors: int = 0
    neighbours: int = 0


_CURRENT: ContextVar[SecureQueries | None] = ContextVar("vesalius_secure_queries", default=None)


@contextmanager
def secure_queries(enabled: bool, *, min_survivors: int = 0, neighbours: int = 0
                   ) -> Iterator[None]:
    """Sum every covered statistics query securely inside the ``with`` block (when enabled)."""
    token = _CURRENT.set(SecureQueries(min_survivors, neighbours) if enabled else None)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> SecureQueries | None:
    """The active setting, or None when queries travel in the clear."""
    return _CURRENT.get()


Spec = Callable[[Mapping[str, Any]], tuple[dict[str, int], tuple[str, ...]]]
"""``config -> ({key: number of values}, optional keys)``."""

_SPECS: dict[str, Spec] = {}


def register_spec(*names: str) -> Callable[[Spec], Spec]:
    """Register the summed keys of the queries ``names``."""

    def wrap(fn: Spec) -> Spec:
        for name in names:
            _SPECS[name] = fn
        return fn

    return wrap


def spec_of(name: str) -> Spec | None:
    """The key specification of query ``name`` (None: not covered)."""
    return _SPECS.get(name)


_FLAGS = {k.NOISED: 1, k.SUPPRESSED_CELLS: 1}


def _fine_bins() -> int:
    return int(fine_score_edges().size - 1)


@register_spec("metrics")
def _metrics(config: Mapping[str, Any]) -> tuple[dict[str, int], tuple[str, ...]]:
    bins = int(config.get(k.CALIBRATION_BINS, 10))
    keys = {k.NUM_EXAMPLES: 1, k.TP: 1, k.FP: 1, k.TN: 1, k.FN: 1, k.CAL_COUNT: bins,
            k.CAL_SCORE_SUM: bins, k.CAL_LABEL_SUM: bins, k.BRIER_SUM: 1, k.LOGLIK: 1, **_FLAGS}
    optional: tuple[str, ...] = ()
    if bool(config.get(k.WITH_HISTOGRAMS, True)):
        keys.update({k.HIST_POSITIVE: _fine_bins(), k.HIST_NEGATIVE: _fine_bins()})
        optional = (k.HIST_POSITIVE, k.HIST_NEGATIVE)
    return keys, optional


def models_of(config: Mapping[str, Any]) -> int:
    """Models a placements-type query scores (set by :func:`secure_round` from its records)."""
    return int(config.get("_models", 1))


@register_spec("placements")
def _placements(config: Mapping[str, Any]) -> tuple[dict[str, int], tuple[str, ...]]:
    m = models_of(config)
    return {k.NUM_POSITIVE: 1, k.NUM_NEGATIVE: 1, k.V10_SUM: m, k.V10_CROSS: m * m,
            k.V01_SUM: m, k.V01_CROSS: m * m, **_FLAGS}, ()


@register_spec("mcnemar")
def _mcnemar(config: Mapping[str, Any]) -> tuple[dict[str, int], tuple[str, ...]]:
    return {k.BOTH_CORRECT: 1, k.ONLY_A_CORRECT: 1, k.ONLY_B_CORRECT: 1, k.BOTH_WRONG: 1,
            **_FLAGS}, ()


@register_spec("calibration-glm", "logistic")
def _glm(config: Mapping[str, Any]) -> tuple[dict[str, int], tuple[str, ...]]:
    p = len(list(config.get(k.BETA) or []))
    return {k.GRAD: p, k.HESSIAN: p * p, k.LOGLIK: 1, k.NUM_EXAMPLES: 1, **_FLAGS}, ()


def _classes(config: Mapping[str, Any]) -> int:
    return int(config.get(k.NUM_CLASSES, 2))


@register_spec("multiclass-metrics")
def _multiclass_metrics(config: Mapping[str, Any]) -> tuple[dict[str, int], tuple[str, ...]]:
    K = _classes(config)
    keys = {k.NUM_EXAMPLES: 1, k.CONFUSION: K * K, k.LOGLIK: 1, **_FLAGS}
    optional: tuple[str, ...] = ()
    if bool(config.get(k.WITH_HISTOGRAMS, True)):
        keys.update({k.OVR_HIST_POSITIVE: K * _fine_bins(), k.OVR_HIST_NEGATIVE: K * _fine_bins()})
        optional = (k.OVR_HIST_POSITIVE, k.OVR_HIST_NEGATIVE)
    return keys, optional


@register_spec("multiclass-placements")
def _multiclass_placements(config: Mapping[str, Any]) -> tuple[dict[str, int], tuple[str, ...]]:
    K = _classes(config)
    return {k.OVR_NUM_POSITIVE: K, k.OVR_NUM_NEGATIVE: K, k.OVR_V10_SUM: K, k.OVR_V10_SQ: K,
            k.OVR_V01_SUM: K, k.OVR_V01_SQ: K, k.OVR_CROSS: K * K, **_FLAGS}, ()


@register_spec("ordinal-metrics")
def _ordinal(config: Mapping[str, Any]) -> tuple[dict[str, int], tuple[str, ...]]:
    K = _classes(config)
    return {k.NUM_EXAMPLES: 1, k.CONFUSION: K * K, **_FLAGS}, ()


@register_spec("multilabel-metrics")
def _multilabel_metrics(config: Mapping[str, Any]) -> tuple[dict[str, int], tuple[str, ...]]:
    K = _classes(config)
    keys = {k.NUM_EXAMPLES: 1, k.LABEL_CONFUSION: K * 4, **_FLAGS}
    optional: tuple[str, ...] = ()
    if bool(config.get(k.WITH_HISTOGRAMS, True)):
        keys.update({k.LABEL_HIST_POSITIVE: K * _fine_bins(),
                     k.LABEL_HIST_NEGATIVE: K * _fine_bins()})
        optional = (k.LABEL_HIST_POSITIVE, k.LABEL_HIST_NEGATIVE)
    return keys, optional


@register_spec("multilabel-placements")
def _multilabel_placements(config: Mapping[str, Any]) -> tuple[dict[str, int], tuple[str, ...]]:
    K = _classes(config)
    return {k.LABEL_NUM_POSITIVE: K, k.LABEL_NUM_NEGATIVE: K, k.LABEL_V10_SUM: K,
            k.LABEL_V10_SQ: K, k.LABEL_V01_SUM: K, k.LABEL_V01_SQ: K, k.LABEL_CROSS: K * K,
            **_FLAGS}, ()


@register_spec("regression-metrics")
def _regression(config: Mapping[str, Any]) -> tuple[dict[str, int], tuple[str, ...]]:
    keys = {key: 1 for key in (k.NUM_EXAMPLES, k.REG_SUM_Y, k.REG_SUM_PRED, k.REG_SUM_Y2,
                               k.REG_SUM_PRED2, k.REG_SUM_Y_PRED, k.REG_SUM_ABS_ERROR,
                               k.REG_SUM_SQ_ERROR, k.REG_SUM_ERROR)}
    keys.update(_FLAGS)
    if bool(config.get(k.WITH_HISTOGRAMS, True)):
        keys[k.REG_ABS_ERROR_HIST] = int(config.get(k.ABS_ERROR_BINS, 20))
    return keys, ()


@register_spec("segmentation-metrics")
def _segmentation(config: Mapping[str, Any]) -> tuple[dict[str, int], tuple[str, ...]]:
    keys = {key: 1 for key in (k.NUM_EXAMPLES, k.SEG_SUM_DICE, k.SEG_SUM_DICE_SQ,
                               k.SEG_NUM_HD95, k.SEG_SUM_HD95, k.SEG_SUM_HD95_SQ,
                               k.SEG_EMPTY_BOTH, k.SEG_EMPTY_ONE)}
    return {**keys, **_FLAGS}, ()


def decode_fixed(cells: np.ndarray, present: int) -> np.ndarray:
    """The sum of ``present`` nodes' values from the summed hi/lo cells (see the module)."""
    ints = [int(x) for x in np.asarray(cells, dtype=np.int64)]
    half = len(ints) // 2
    scale = 2**FIXED_BITS
    totals = [(ints[i] << FIXED_BITS) + ints[half + i] - present * OFFSET * scale
              for i in range(half)]
    return np.asarray([t / scale for t in totals], dtype=np.float64)  # int / int: exact rounding


def is_secure(res: QueryRound) -> bool:
    """Whether ``res`` was summed securely (its values are one pooled pseudo-entry)."""
    return bool(res.secure and res.secure.get("covered"))


def _messages(node_ids: Sequence[int], name: str, config: Mapping[str, Any],
              records: Mapping[str, Record] | None) -> list[Message]:
    out = []
    for node_id in node_ids:
        content = RecordDict({k.CONFIG: ConfigRecord({**dict(config), k.QUERY: name,
                                                      FIXED_BITS_KEY: FIXED_BITS})})
        for key, record in (records or {}).items():
            content[key] = record
        out.append(Message(content=content, message_type=MessageType.QUERY,
                           dst_node_id=int(node_id)))
    return out


def secure_round(grid: Grid, node_ids: Sequence[int], name: str, config: Mapping[str, Any], *,
                 timeout: float, records: Mapping[str, Record] | None,
                 required: Sequence[str], setting: SecureQueries) -> QueryRound:
    """One query round summed securely (see the module docstring)."""
    from server.inference import QueryRound
    from server.strategies.secagg_session import secure_sum

    spec = _SPECS[name]
    models = 2 if records is not None and k.ARRAYS_B in records else 1
    keys, optional = spec({**dict(config), "_models": models})
    from server.strategies.fedavg import site_of_error

    result = QueryRound()
    names = list(keys)
    summed = secure_sum(grid, _messages(node_ids, name, config, records),
                        int_keys=[*(n + SUFFIX for n in names), PRESENT_KEY],
                        int_lengths=[2 * keys[n] for n in names] + [len(names)],
                        min_survivors=setting.min_survivors, timeout=timeout,
                        neighbours=setting.neighbours)
    errors: dict[int, str] = {}
    error_sites: dict[int, str] = {}
    for msg in summed.replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():  # named by its reason's site prefix (an error carries no records)
            errors[node] = msg.error.reason
            error_sites[node] = site_of_error(msg)
            continue
        info = msg.content.get(k.NODE_INFO)
        if isinstance(info, ConfigRecord):
            result.sites[node] = str(info.get(k.SITE, f"node-{node}"))
            if k.LEDGER_HEAD in info:
                result.heads[node] = str(info[k.LEDGER_HEAD])
    record = dict(summed.record)
    # A node lost at unmasking sent its masked vector: it is in the sum (its masks recovered).
    dropped = {int(d["node_id"]): d for d in record.get("dropped", [])
               if d.get("stage") != "unmasking"}
    members = [int(n) for n in node_ids if int(n) not in dropped and int(n) not in errors]
    for node in node_ids:
        node = int(node)
        if node in errors or node in dropped:
            stage = dropped.get(node, {}).get("stage", "masked input")
            result.failures.append({
                "node_id": node, "site": result.sites.get(node, error_sites.get(node, str(
                    dropped.get(node, {}).get("site", f"node-{node}")))),
                "query": name,
                "reason": errors.get(node, f"dropped during secure aggregation ({stage})")})
    result.secure = {"covered": True, "session": record, "members": members,
                     "contributors": summed.contributors, "partial": []}
    if summed.sums is None:
        reason = str(record.get("reason", "secure aggregation abandoned"))
        failed = {f["node_id"] for f in result.failures}
        result.failures += [{"node_id": int(n), "site": result.sites.get(int(n), f"node-{n}"),
                             "query": name, "reason": reason}
                            for n in node_ids if int(n) not in failed]
        result.secure["members"] = []
        return result
    present = summed.sums[PRESENT_KEY]
    contributors = summed.contributors
    values: dict[str, Any] = {}
    for i, key in enumerate(names):
        count = int(present[i])
        if count < contributors:
            if key in optional:
                result.secure["partial"].append({"key": key, "nodes": count,
                                                 "of": contributors})
                continue
            result.failures += [{"node_id": SECURE_ID, "site": "secure sum", "query": name,
                                 "reason": f"{contributors - count} node(s) left out {key}: "
                                 "the secure sum is not usable"}]
            return result
        if contributors == 0:
            continue
        decoded = decode_fixed(summed.sums[key + SUFFIX], count)
        values[key] = float(decoded[0]) if keys[key] == 1 and key not in optional else decoded
    missing = [key for key in required if key not in values]
    if contributors == 0 or missing:
        result.failures.append({"node_id": SECURE_ID, "site": "secure sum", "query": name,
                                "reason": "no node contributed to the secure sum" if not
                                contributors else f"secure sum lacks {', '.join(missing)}"})
        return result
    result.values[SECURE_ID] = values
    result.sites[SECURE_ID] = f"secure sum of {contributors} site(s)"
    return result
