"""Bagging across hospitals: a Grid that shows one member's federation a bootstrap resample.

Member ``i`` of ``--paradigm ensemble -P method=bagging`` draws as many hospitals as there
are, with replacement (Breiman 1996), from its own seed. :class:`BaggedGrid` hides the
hospitals not drawn (Flower's FedAvg samples from :meth:`get_node_ids`, so they neither
train nor evaluate that member) and multiplies the FedAvg weight a drawn hospital's training
reply carries by the times it was drawn (a hospital drawn twice counts twice). The hospital
still trains once per round: its privacy spend does not depend on its draws.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import Message, MessageType, MetricRecord
from flwr.serverapp import Grid

from common import messages as k
from server.progress import DelegatingGrid

__all__ = ["BaggedGrid", "bootstrap_hospitals"]

_WEIGHT_KEYS = (k.NUM_EXAMPLES, k.UNIT_WEIGHT)


def bootstrap_hospitals(node_ids: Sequence[int], *, seed: int) -> dict[int, int]:
    """Node id -> times drawn, for one bootstrap resample of ``node_ids`` (sorted first)."""
    nodes = sorted(int(n) for n in node_ids)
    rng = np.random.default_rng(seed)
    drawn = rng.choice(len(nodes), size=len(nodes), replace=True)
    return dict(sorted(Counter(nodes[int(i)] for i in drawn).items()))


class BaggedGrid(DelegatingGrid):
    """``inner`` restricted to the drawn hospitals, their training weights multiplied.

    Parameters
    ----------
    inner : Grid
        The run's grid.
    draws : dict
        Node id -> times drawn (:func:`bootstrap_hospitals`); every value >= 1.
    """

    def __init__(self, inner: Grid, draws: dict[int, int]) -> None:
        super().__init__(inner)
        if not draws or min(draws.values()) < 1:
            raise ValueError("a bootstrap resample draws at least one hospital")
        self.draws = dict(draws)

    def get_node_ids(self) -> Iterable[int]:
        """Only the drawn hospitals that are connected."""
        return [n for n in self._inner.get_node_ids() if int(n) in self.draws]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Delegate; weight each training reply by its hospital's draws."""
        replies = list(self._inner.send_and_receive(
            [m for m in messages if int(m.metadata.dst_node_id) in self.draws], timeout=timeout))
        for reply in replies:
            self._weigh(reply)
        return replies

    def _weigh(self, reply: Message) -> None:
        if reply.has_error() or reply.metadata.message_type != MessageType.TRAIN:
            return
        times = self.draws.get(int(reply.metadata.src_node_id), 1)
        metrics = reply.content.get(k.METRICS)
        if times == 1 or not isinstance(metrics, MetricRecord):
            return
        for key in _WEIGHT_KEYS:
            if key in metrics:
                metrics[key] = metrics[key] * times  # type: ignore[operator]
