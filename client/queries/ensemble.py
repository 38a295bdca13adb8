"""Query ``ensemble-scores``: a deep ensemble's histograms on the held-out patients.

The message carries the members as ArrayRecords ``member-0``, ``member-1``, ... (member 0 is
the *single model* the report compares with), their combination weights
(``ensemble-weights``, default equal), the MC-dropout passes of member 0 (``mc-samples``) and
the bins (``value-bins`` on [0, 1] for scores, ``uncertainty-bins`` for uncertainties). For
every held-out patient the node computes, and keeps, each member's probability ``p_i``, the
ensemble's ``p = sum_i w_i p_i`` (with a trained stacker's head ``ensemble-stacker`` =
``[v_1, ..., v_M, b]``: ``p = sigmoid(b + sum_i v_i logit p_i)``; the disagreement keeps the
weights ``w``), member 0's mean ``m`` over T MC-dropout passes (``mc-samples``; with
``mc-dropout`` = p the node switches on dropout of rate p before member 0's last linear layer
for them, :func:`client.paradigms.ensemble.add_dropout`, as its training had it) and three
uncertainties scaled to [0, 1]: the binary entropy (in bits) of ``m``, the members' weighted variance
``4 sum_i w_i (p_i - p)^2`` (disagreement) and the entropy of ``p``. It releases only counts:

``ensemble-member-hist`` (M, 2, B)
    Per member, the positive and the negative patients' score histograms.
``ensemble-variant-hist`` (3, 2, B)
    The same for the single model (member 0), the ensemble and member 0's MC-dropout mean.
``ensemble-uncertainty-hist`` (3, 2, U)
    Per uncertainty, its histogram over the patients the model (member 0's MC-dropout mean
    for the first, the ensemble for the others) misclassifies at its operating threshold
    (``ensemble-thresholds`` = ``[single, ensemble, MC-dropout mean]``, chosen by the
    coordinator on the validation patients; absent: 0.5), and over those it classifies right.

A patient adds 1 to one cell of each histogram row: L2 sensitivities ``sqrt(M)``,
``sqrt(3)`` and ``sqrt(3)``; the patient count 1. Fine histograms: released only where the
hospital consents (``release-histograms``) and, like the score histograms, exempt from
small-cell suppression.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from client.queries.metrics import int_param
from client.queries.registry import Query, QueryRequest, register_query
from client.queries.scoring import model_arrays, patient_samples, patient_scores
from client.release import Statistic
from common import messages as k
from common.errors import ConfigError
from common.paradigms.ensemble import (
    MC_DROPOUT,
    MEMBER_HIST,
    QUERY,
    STACKER_HEAD,
    THRESHOLDS,
    UNCERTAINTY_HIST,
    VARIANT_HIST,
    WEIGHTS,
)

__all__ = ["EnsembleScoresQuery", "ensemble_histograms", "stacked", "UNCERTAINTY_BINS", "SCORE_BINS"]

MAX_MEMBERS = 16
MAX_PASSES = 100
SCORE_BINS = 1000
UNCERTAINTY_BINS = 200
#: Config key: bins of the uncertainty histograms.
UNCERTAINTY_BINS_KEY = "uncertainty-bins"


def _members(req: QueryRequest) -> list[str]:
    keys = [key for key in req.content if key.startswith(k.ENSEMBLE_PREFIX)]
    names = [f"{k.ENSEMBLE_PREFIX}{i}" for i in range(len(keys))]
    if sorted(keys) != sorted(names) or not 2 <= len(keys) <= MAX_MEMBERS:
        raise ConfigError("bad ensemble", safe_reason=f"malformed query: 2 to {MAX_MEMBERS} "
                          f"ensemble members named {k.ENSEMBLE_PREFIX}0, 1, ...")
    for key in names:
        model_arrays(req, key)
    return names


def _weights(req: QueryRequest, members: int) -> np.ndarray:
    raw = req.config.get(WEIGHTS)
    if raw is None:
        return np.full(members, 1.0 / members)
    w = np.asarray(raw if isinstance(raw, list) else [], dtype=np.float64)
    if w.shape != (members,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfigError("bad ensemble weights", safe_reason=f"malformed query: {WEIGHTS} "
                          f"must hold {members} non-negative numbers, not all 0")
    return w / w.sum()


def _stacker(req: QueryRequest, members: int) -> np.ndarray | None:
    raw = req.config.get(STACKER_HEAD)
    if raw is None:
        return None
    head = np.asarray(raw if isinstance(raw, list) else [], dtype=np.float64)
    if head.shape != (members + 1,) or not np.all(np.isfinite(head)):
        raise ConfigError("bad stacker head", safe_reason=f"malformed query: {STACKER_HEAD} "
                          f"must hold {members + 1} finite numbers")
    return head


def _thresholds(req: QueryRequest) -> np.ndarray:
    raw = req.config.get(THRESHOLDS)
    if raw is None:
        return np.full(3, 0.5)
    t = np.asarray(raw if isinstance(raw, list) else [], dtype=np.float64)
    if t.shape != (3,) or not np.all((t >= 0) & (t <= 1)):
        raise ConfigError("bad ensemble thresholds", safe_reason=f"malformed query: {THRESHOLDS} "
                          "must hold 3 numbers in [0, 1]")
    return t


def stacked(member_probs: np.ndarray, head: np.ndarray) -> np.ndarray:
    """``sigmoid(b + sum_i v_i logit p_i)`` per patient, ``head = [v_1, ..., v_M, b]``."""
    from scipy.special import expit, logit

    p = np.clip(np.asarray(member_probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    return expit(head[-1] + head[:-1] @ logit(p))


def _dropout_rate(req: QueryRequest) -> float:
    raw = req.config.get(MC_DROPOUT, 0.0)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0 <= raw < 1:
        raise ConfigError("bad dropout rate", safe_reason=f"malformed query: {MC_DROPOUT} must "
                          "be a number in [0, 1)")
    return float(raw)


def _mc_dropout(req: QueryRequest, data: Any, key: str, passes: int, rate: float) -> np.ndarray:
    """``(T, n_patients)`` probabilities of ``key`` with dropout ``rate`` before its last
    linear layer (:func:`client.paradigms.ensemble.add_dropout`), each pass a fresh mask."""
    import torch

    from client.paradigms.ensemble import add_dropout
    from client.queries.scoring import load_model

    split, device = data.split, data.device
    _, inverse = np.unique(split.patient_index.reshape(-1).cpu().numpy(), return_inverse=True)
    counts = np.bincount(inverse)
    model = add_dropout(load_model(req, key), rate).to(device).train()
    rows = []
    with torch.no_grad():
        for _ in range(passes):
            img = torch.cat([torch.softmax(model(split.images[i:i + 256].to(device)), dim=1)[:, 1]
                             .double().cpu() for i in range(0, len(split.images), 256)]).numpy()
            rows.append(np.bincount(inverse, weights=img) / counts)
    out = np.vstack(rows)
    if not np.all(np.isfinite(out)):
        raise ConfigError("non-finite scores", safe_reason="the model produced non-finite "
                          "scores")
    return out


def _binary_entropy_bits(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-12, 1.0 - 1e-12)
    return np.clip(-(q * np.log(q) + (1 - q) * np.log(1 - q)) / math.log(2.0), 0.0, 1.0)


def _bin(values: np.ndarray, bins: int) -> np.ndarray:
    """Bin index of values in [0, 1] on ``bins`` equal bins (1.0 in the last bin)."""
    return np.clip(np.floor(np.clip(values, 0.0, 1.0) * bins).astype(int), 0, bins - 1)


def _class_hist(scores: np.ndarray, labels: np.ndarray, bins: int) -> np.ndarray:
    idx = _bin(scores, bins)
    pos = np.bincount(idx[labels == 1], minlength=bins)
    neg = np.bincount(idx[labels != 1], minlength=bins)
    return np.stack([pos, neg])


def _error_hist(uncertainty: np.ndarray, wrong: np.ndarray, bins: int) -> np.ndarray:
    idx = _bin(uncertainty, bins)
    return np.stack([np.bincount(idx[wrong], minlength=bins),
                     np.bincount(idx[~wrong], minlength=bins)])


def ensemble_histograms(member_probs: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                        mc_probs: np.ndarray, *, bins: int = SCORE_BINS,
                        uncertainty_bins: int = UNCERTAINTY_BINS,
                        stacker: np.ndarray | None = None,
                        thresholds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The query's histograms from per-patient probabilities (kept on the node).

    Parameters
    ----------
    member_probs : ndarray, shape (M, n)
        Each member's class-1 probability per patient (member 0: the single model).
    labels : ndarray, shape (n,)
        0/1 patient labels.
    weights : ndarray, shape (M,)
        Combination weights summing to 1.
    mc_probs : ndarray, shape (T, n)
        Member 0's class-1 probabilities over T MC-dropout passes.
    stacker : ndarray, shape (M + 1,), optional
        A trained stacker's head: the ensemble is :func:`stacked`, not the weighted mean.
    thresholds : ndarray, shape (3,), optional
        Operating thresholds of the single model, the ensemble and the MC-dropout mean: a
        patient is misclassified when ``(score >= threshold) != label`` (default 0.5 each).
    """
    y = np.asarray(labels).astype(int).reshape(-1)
    p = np.asarray(member_probs, dtype=np.float64)
    mean = weights @ p
    ens = mean if stacker is None else stacked(p, np.asarray(stacker, dtype=np.float64))
    single = p[0]
    disagreement = np.clip(4.0 * (weights @ (p - mean) ** 2), 0.0, 1.0)
    mc_entropy = _binary_entropy_bits(np.asarray(mc_probs, dtype=np.float64).mean(axis=0))
    mc_mean = np.asarray(mc_probs, dtype=np.float64).mean(axis=0)
    t = np.full(3, 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    wrong_mc = (mc_mean >= t[2]).astype(int) != y
    wrong_ens = (ens >= t[1]).astype(int) != y
    return {
        MEMBER_HIST: np.stack([_class_hist(row, y, bins) for row in p]),
        VARIANT_HIST: np.stack([_class_hist(single, y, bins), _class_hist(ens, y, bins),
                                _class_hist(mc_mean, y, bins)]),
        UNCERTAINTY_HIST: np.stack([
            _error_hist(mc_entropy, wrong_mc, uncertainty_bins),
            _error_hist(disagreement, wrong_ens, uncertainty_bins),
            _error_hist(_binary_entropy_bits(ens), wrong_ens, uncertainty_bins)]),
    }


@register_query(QUERY)
class EnsembleScoresQuery(Query):
    """Score and uncertainty histograms of a deep ensemble (see the module docstring)."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        members = len(_members(req))
        _weights(req, members)
        _stacker(req, members)
        _thresholds(req)
        int_param(req, k.MC_SAMPLES, 10, lo=1, hi=MAX_PASSES)
        if not req.node.release_histograms:
            raise ConfigError("ensemble histograms without consent",
                              safe_reason="refused: this node does not release fine "
                              "histograms (release-histograms is off)")
        bins = int_param(req, k.VALUE_BINS, SCORE_BINS, lo=2, hi=100_000)
        ubins = int_param(req, UNCERTAINTY_BINS_KEY, UNCERTAINTY_BINS, lo=2, hi=10_000)
        return [Statistic(k.NUM_EXAMPLES, 1.0, integer=True),
                Statistic(MEMBER_HIST, math.sqrt(members), (members, 2, bins), integer=True),
                Statistic(VARIANT_HIST, math.sqrt(3.0), (3, 2, bins), integer=True),
                Statistic(UNCERTAINTY_HIST, math.sqrt(3.0), (3, 2, ubins), integer=True)]

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        members = _members(req)
        weights = _weights(req, len(members))
        single, labels = patient_scores(req, data, members[0])
        probs = patient_samples(req, data, members, passes=1)
        probs[0] = single
        passes = int_param(req, k.MC_SAMPLES, 10, lo=1, hi=MAX_PASSES)
        rate = _dropout_rate(req)
        if passes > 1 and rate > 0:
            mc = _mc_dropout(req, data, members[0], passes, rate)
        elif passes > 1:  # the model's own dropout layers
            mc = patient_samples(req, data, [members[0]], passes=passes)
        else:
            mc = probs[:1]
        out: dict[str, Any] = ensemble_histograms(
            probs, labels, weights, mc, bins=int_param(req, k.VALUE_BINS, SCORE_BINS, lo=2,
                                                       hi=100_000),
            uncertainty_bins=int_param(req, UNCERTAINTY_BINS_KEY, UNCERTAINTY_BINS, lo=2,
                                       hi=10_000), stacker=_stacker(req, len(members)),
            thresholds=_thresholds(req))
        out[k.NUM_EXAMPLES] = int(len(labels))
        return out
