"""Double masking of a node's encoded vector, and its removal from the survivors' sum.

Node ``i`` of the set ``U2`` (those that shared their secrets) sends

    y_i = x_i + PRG(b_i) + sum_{j in U2, j != i} sign(i, j) * PRG(s_ij)    (mod 2^64)

with ``sign(i, j) = +1`` when ``i < j`` and ``-1`` otherwise, ``b_i`` the node's private
self-mask seed and ``s_ij`` the seed it agrees with ``j`` (X25519 + HKDF). In the sum over
the survivors ``U3`` the pairwise masks between survivors cancel; the coordinator removes
``PRG(b_i)`` for every survivor and the pairwise masks between survivors and dropped nodes,
from the seeds it recovers by threshold secret sharing (Bonawitz et al., CCS 2017, §4).
In a sparse (SecAgg+) session the pairwise sum runs over the node's neighbours only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from common.secagg.crypto import expand, pairwise_seed

__all__ = ["mask", "unmask"]


def _add_pair(out: np.ndarray, i: int, j: int, seed: bytes, sign: int = 1) -> None:
    """``out += sign * sign(i, j) * PRG(seed)`` in place (mod 2^64)."""
    stream = expand(seed, len(out))
    if (i < j) == (sign > 0):
        out += stream
    else:
        out -= stream


def mask(values: np.ndarray, *, node: int, self_seed: bytes, mask_private: bytes,
         peer_publics: Mapping[int, bytes], session: str) -> np.ndarray:
    """``values`` (uint64) with the self mask and the pairwise masks towards ``peer_publics``.

    ``peer_publics`` maps every other node of ``U2`` to its public mask key; ``node`` itself
    is skipped if present.
    """
    out = np.asarray(values, dtype=np.uint64) + expand(self_seed, len(values))
    for peer, public in peer_publics.items():
        if peer != node:
            _add_pair(out, node, peer, pairwise_seed(mask_private, public, session))
    return out


def unmask(total: np.ndarray, *, self_seeds: Mapping[int, bytes],
           dropped_privates: Mapping[int, bytes], survivor_publics: Mapping[int, bytes],
           session: str, neighbours: Mapping[int, Iterable[int]] | None = None) -> np.ndarray:
    """The sum of the survivors' encoded vectors, from the sum of their masked vectors.

    Parameters
    ----------
    total : numpy.ndarray
        Sum (mod 2^64) of the survivors' masked vectors.
    self_seeds : mapping
        Survivor id -> its recovered self-mask seed ``b_i``.
    dropped_privates : mapping
        Dropped node id -> its recovered private mask key.
    survivor_publics : mapping
        Survivor id -> its public mask key.
    session : str
        The session the seeds were agreed for.
    neighbours : mapping, optional
        Node id -> the nodes it masked towards (a sparse session's graph); default: all.
    """
    out = np.asarray(total, dtype=np.uint64).copy()
    for seed in self_seeds.values():
        out -= expand(seed, len(out))
    for dropped, private in dropped_privates.items():
        peers = None if neighbours is None else set(neighbours.get(dropped, ()))
        for survivor, public in survivor_publics.items():
            if peers is not None and survivor not in peers:
                continue
            # what survivor i added for dropped j: sign(i, j) * PRG(s_ij)
            _add_pair(out, survivor, dropped, pairwise_seed(private, public, session), sign=-1)
    return out
