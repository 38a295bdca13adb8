"""What a masked reply holds, in order, and how its sum decodes.

A node's vector is ``[model | weighted floats | integers | contributed]``:

* model: the update ``w_i - w`` of every array of the received model (in its key order),
  times the node's example count ``n_i`` (FedAvg), or clipped to L2 norm ``clip`` and
  unweighted (hospital-level DP);
* weighted floats: ``n_i * m`` for each metric ``m`` averaged by examples (train loss);
* integers: counts and histograms, summed exactly;
* contributed: 1 when the node filled the integer segment, so that the coordinator knows over
  how many nodes an integer sum runs.

Bounds that size the ring (:func:`common.secagg.encoding.fractional_bits`) are declared here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common import messages as k
from common.secagg.encoding import decode, fractional_bits

__all__ = ["MAX_ABS_UPDATE", "MAX_COUNT", "MAX_EXAMPLES", "MAX_METRIC", "Layout"]

MAX_EXAMPLES = 2**20  # examples one node may weigh its update by
MAX_ABS_UPDATE = 2.0**10  # |w_i - w| per coordinate in one round
MAX_METRIC = 2.0**10  # |m| of a weighted metric (e.g. the train loss)
MAX_COUNT = 2**32  # one integer entry (count, histogram cell)


@dataclass(frozen=True)
class Layout:
    """Lengths and fixed-point scales of one session's vectors (both sides build it)."""

    model_length: int
    model_bits: int
    model_bound: float
    weighted_keys: tuple[str, ...]
    float_bits: int
    int_keys: tuple[str, ...]
    int_lengths: tuple[int, ...]
    dp_clip: float = 0.0

    @classmethod
    def plan(cls, *, num_nodes: int, model_length: int, dp_clip: float,
             weighted_keys: Sequence[str] = (), int_keys: Sequence[str] = (),
             int_lengths: Sequence[int] = ()) -> Layout:
        """The coordinator's layout for ``num_nodes`` (refuses what 64 bits cannot hold)."""
        bound = dp_clip if dp_clip > 0 else MAX_EXAMPLES * MAX_ABS_UPDATE
        fractional_bits(num_nodes=num_nodes, value_bound=MAX_COUNT, integer=True)
        return cls(
            model_length=model_length,
            model_bits=fractional_bits(num_nodes=num_nodes, value_bound=bound) if model_length else 0,
            model_bound=bound,
            weighted_keys=tuple(weighted_keys),
            float_bits=fractional_bits(num_nodes=num_nodes, value_bound=MAX_EXAMPLES * MAX_METRIC),
            int_keys=tuple(int_keys),
            int_lengths=tuple(int(n) for n in int_lengths),
            dp_clip=dp_clip,
        )

    def to_config(self) -> dict[str, int | float | str | list[str] | list[int]]:
        """The ConfigRecord entries that tell a node this layout."""
        return {
            k.SECAGG_MODEL_BITS: self.model_bits, k.SECAGG_MODEL_BOUND: self.model_bound,
            k.SECAGG_DP_CLIP: self.dp_clip, k.SECAGG_WEIGHTED_KEYS: list(self.weighted_keys),
            k.SECAGG_FLOAT_BITS: self.float_bits, k.SECAGG_INT_KEYS: list(self.int_keys),
            k.SECAGG_INT_LENGTHS: list(self.int_lengths),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], model_length: int) -> Layout:
        """The layout a node reads from its message (``model_length``: of the model it got)."""
        return cls(
            model_length=model_length,
            model_bits=int(config[k.SECAGG_MODEL_BITS]),
            model_bound=float(config[k.SECAGG_MODEL_BOUND]),
            weighted_keys=tuple(config.get(k.SECAGG_WEIGHTED_KEYS) or ()),
            float_bits=int(config[k.SECAGG_FLOAT_BITS]),
            int_keys=tuple(config.get(k.SECAGG_INT_KEYS) or ()),
            int_lengths=tuple(int(n) for n in config.get(k.SECAGG_INT_LENGTHS) or ()),
            dp_clip=float(config.get(k.SECAGG_DP_CLIP, 0.0)),
        )

    @property
    def length(self) -> int:
        """Ring elements in one vector."""
        return self.model_length + len(self.weighted_keys) + sum(self.int_lengths) + 1

    def split(self, total: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], int]:
        """Decode an unmasked sum: model sum, weighted-float sums, integer sums, contributors."""
        model = decode(total[: self.model_length], self.model_bits)
        at = self.model_length
        floats = decode(total[at: at + len(self.weighted_keys)], self.float_bits)
        at += len(self.weighted_keys)
        ints: dict[str, np.ndarray] = {}
        for key, size in zip(self.int_keys, self.int_lengths):
            ints[key] = total[at: at + size].view(np.int64).copy()
            at += size
        return model, floats, ints, int(total[at: at + 1].view(np.int64)[0])
