"""Statistics queries a hospital node answers with sums over its held-out patients.

Importing this package registers every query family (:mod:`client.queries.registry`); the
ClientApp's ``query`` handler is :func:`client.queries.handler.handle_query`.
"""

from __future__ import annotations

from client.queries import (  # noqa: F401  (registration)
    elm,
    ensemble,
    logistic,
    metrics,
    multiclass,
    multilabel,
    multi_task,
    ordinal,
    paired,
    regression,
    segmentation,
    uncertainty,
)
from client.queries.registry import Query, QueryRequest, get_query, list_queries, register_query

__all__ = ["Query", "QueryRequest", "get_query", "list_queries", "register_query"]
