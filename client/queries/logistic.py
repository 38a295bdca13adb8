"""Queries ``logistic`` (clinical covariates) and ``calibration-glm`` (a model's calibration
intercept and slope): one Newton-Raphson step of a federated logistic regression each.

``logistic`` works on the node's clinical table.

One query is one Newton-Raphson step of :func:`common.stats.glm.fit_logistic` at the
coordinator: the node returns, at the coefficients ``beta`` the coordinator sent, the score
``X'(y - p)``, the information ``X'WX``, the log-likelihood and the row count
(:func:`common.stats.glm.logistic_node_stats`). Covariates are chosen by the coordinator by
name from the node's allow-list (:mod:`client.data.tabular`); the intercept comes first.

Sensitivities (one patient's row ``x``, with ``|x| <= B`` after clipping every covariate to
its declared range, :func:`client.data.tabular.row_norm_bound`): score ``B``; information
(Frobenius norm) ``B^2 / 4``; log-likelihood ``B |beta| + log 2``; count 1. Rows are clipped
only for a noised release (an exact release uses the values as recorded).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from client.data.tabular import TabularData, design_matrix, parse_columns, row_norm_bound
from client.queries.registry import Query, QueryRequest, register_query
from client.queries.scoring import model_arrays, patient_scores
from client.release import Statistic
from common import messages as k
from common.errors import ConfigError
from common.stats.calibration import LOGIT_CLIP, calibration_glm_stats
from common.stats.glm import logistic_node_stats


def _columns(req: QueryRequest) -> tuple[str, ...]:
    raw = req.config.get(k.COLUMNS)
    if not isinstance(raw, list):
        raise ConfigError("logistic query without columns",
                          safe_reason="malformed query: 'columns' (a list of names) is required")
    return parse_columns([str(c) for c in raw])


def _beta(req: QueryRequest, p: int) -> np.ndarray:
    raw = req.config.get(k.BETA)
    beta = np.asarray(raw if isinstance(raw, list) else [], dtype=np.float64)
    if beta.shape != (p,) or not np.all(np.isfinite(beta)):
        raise ConfigError(
            f"beta must hold {p} finite numbers",
            safe_reason=f"malformed query: 'beta' must hold {p} finite numbers "
            "(intercept, then one per column)",
        )
    return beta


@register_query("logistic")
class LogisticQuery(Query):
    """Gradient, information matrix, log-likelihood and count at ``beta``."""

    source = "tabular"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        cols = _columns(req)
        p = len(cols) + 1
        beta = _beta(req, p)
        bound = row_norm_bound(cols)
        return [
            Statistic(k.GRAD, bound, (p,)),
            Statistic(k.HESSIAN, bound * bound / 4.0, (p, p)),
            Statistic(k.LOGLIK, bound * float(np.linalg.norm(beta)) + math.log(2.0)),
            Statistic(k.NUM_EXAMPLES, 1.0, integer=True),
        ]

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        if not isinstance(data, TabularData):
            raise ConfigError("logistic query needs tabular data")
        cols = _columns(req)
        x, y = design_matrix(data, cols, clip=req.node.stats_noise_multiplier > 0)
        stats = logistic_node_stats(x, y, _beta(req, len(cols) + 1))
        return {
            k.GRAD: stats["grad"],
            k.HESSIAN: stats["hessian"],
            k.LOGLIK: stats["loglik"],
            k.NUM_EXAMPLES: stats["n"],
        }


CALIBRATION_LOGIT_BOUND = -math.log(LOGIT_CLIP)
"""Largest ``|logit(score)|`` after the stats library's clipping of scores."""


@register_query("calibration-glm")
class CalibrationGLMQuery(Query):
    """GLM statistics of ``logit P(y=1) = a + b logit(score)`` at ``beta = (a, b)``.

    Rows are ``(1, logit(score))`` with ``|logit(score)| <= -log(1e-12)``
    (:func:`common.stats.calibration.calibration_glm_stats`), which bounds the sensitivities
    as for ``logistic``.
    """

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        model_arrays(req, k.ARRAYS)
        beta = _beta(req, 2)
        bound = math.sqrt(1.0 + CALIBRATION_LOGIT_BOUND ** 2)
        return [
            Statistic(k.GRAD, bound, (2,)),
            Statistic(k.HESSIAN, bound * bound / 4.0, (2, 2)),
            Statistic(k.LOGLIK, bound * float(np.linalg.norm(beta)) + math.log(2.0)),
            Statistic(k.NUM_EXAMPLES, 1.0, integer=True),
        ]

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        scores, labels = patient_scores(req, data, k.ARRAYS)
        stats = calibration_glm_stats(scores, labels, _beta(req, 2))
        return {k.GRAD: stats["grad"], k.HESSIAN: stats["hessian"],
                k.LOGLIK: stats["loglik"], k.NUM_EXAMPLES: stats["n"]}
