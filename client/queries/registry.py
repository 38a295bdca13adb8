"""A small decorator registry of the statistics queries a node answers.

Each statistic family lives in its own module and registers a :class:`Query` under a short
name with :func:`register_query`; the handler looks the name of an incoming query up with
:func:`get_query`. Importing :mod:`client.queries` imports every family module and therefore
registers every query.

Query contract
--------------
* ``source`` says which of the node's data the query reads: ``"images"`` (the held-out split
  of the node's images, scored by the model(s) in the message) or ``"tabular"`` (the node's
  clinical table, ``tabular-path``).
* :meth:`Query.statistics` declares, from the request alone (before any patient value is
  read), every statistic the query will release with its L2 sensitivity per patient and its
  shape, which the coordinator's parameters fix (bins, features, models), never the patient
  count. The release rules (:mod:`client.release`) check the budget from this declaration.
* :meth:`Query.compute` returns exactly the declared statistics: sums over the node's
  held-out patients, never per-patient values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from flwr.app import ConfigRecord, RecordDict

from client.release import Statistic
from common.config import NodeConfig, TrainPlan
from common.errors import ConfigError

__all__ = ["Query", "QueryRequest", "get_query", "list_queries", "register_query"]

SOURCES = ("images", "tabular")


@dataclass(frozen=True)
class QueryRequest:
    """One parsed query message, as a query sees it.

    Attributes
    ----------
    name : str
        Registered query name.
    node : NodeConfig
        The node's own settings.
    plan : TrainPlan
        The run's plan (model, image size, cross-validation fields).
    split : str
        Held-out split: ``"val"``, ``"test"`` or ``"heldout"`` (cross-validation fold).
    config : ConfigRecord
        The message's config record (query parameters).
    content : RecordDict
        The whole message content (model arrays, pooled histograms).
    """

    name: str
    node: NodeConfig
    plan: TrainPlan
    split: str
    config: ConfigRecord
    content: RecordDict


class Query(ABC):
    """A statistics query (see the module docstring for the contract)."""

    source: ClassVar[str] = "images"
    #: Splits the query may read; only queries that fit on training data allow "train".
    splits: ClassVar[tuple[str, ...]] = ("val", "test", "heldout")

    @abstractmethod
    def statistics(self, req: QueryRequest) -> list[Statistic]:
        """Everything this query releases, with sensitivities and shapes."""

    @abstractmethod
    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        """The declared statistics, summed over the node's held-out patients."""

    def noise_multiplier(self, req: QueryRequest, num_patients: int) -> float | None:
        """This release's noise multiplier when the query sets it (a training release under a
        private plan); ``None``: the node's own ``stats-noise-multiplier``."""
        return None


_REGISTRY: dict[str, Query] = {}
_Q = TypeVar("_Q", bound=type[Query])


def register_query(name: str) -> Callable[[_Q], _Q]:
    """Class decorator: register a :class:`Query` subclass under ``name``."""

    def deco(cls: _Q) -> _Q:
        if name in _REGISTRY:
            raise ConfigError(f"query {name!r} is already registered")
        if cls.source not in SOURCES:
            raise ConfigError(f"query {name!r} has unknown source {cls.source!r}")
        _REGISTRY[name] = cls()
        return cls

    return deco


def get_query(name: str) -> Query:
    """The registered query ``name``; a clear refusal for an unknown name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown query {name!r}",
            safe_reason=f"unknown query {name!r}; this node answers: {', '.join(list_queries())}",
        ) from None


def list_queries() -> list[str]:
    """Registered query names, sorted."""
    return sorted(_REGISTRY)
