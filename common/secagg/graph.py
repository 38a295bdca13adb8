"""Who shares secrets with whom: the neighbour graph of a secure-aggregation session.

Full secure aggregation (Bonawitz et al., CCS 2017) has every node share its two seeds with
every other node; each session then costs O(n^2) shares and O(n * t^2) field operations to
recover, with t a majority of n. SecAgg+ (Bell et al., "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS 2020) restricts sharing and pairwise masks to a sparse
graph: each node's *group* is itself and its ``k`` neighbours, its secrets are shared within
the group with a majority threshold of the group, and it masks only towards its neighbours.
Their graph is a Harary graph (a ring where each node links to its ``k/2`` nearest on either
side) over a random ordering of the nodes, which is what :func:`neighbourhoods` draws; a
complete graph when ``k >= n - 1`` (then the session is exactly Bonawitz et al.'s).

The masks of the survivors cancel within every connected part of the graph restricted to
them, so if that graph fell apart the coordinator could unmask each part's sum on its own;
the coordinator therefore checks :func:`connected` before asking anyone to reveal a share.
(A graph algorithm of a few lines; no cryptography is written here.)
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["connected", "neighbourhoods"]


def neighbourhoods(nodes: Sequence[int], neighbours: int,
                   rng: random.Random | None = None) -> dict[int, list[int]]:
    """Node -> its neighbours (sorted) in a Harary graph over a random ordering of ``nodes``.

    ``neighbours`` is rounded up to an even number; at ``len(nodes) - 1`` or more the graph
    is complete. Every node has the same number of neighbours, and the graph is symmetric.
    The ordering is drawn from OS entropy unless ``rng`` is given (tests).
    """
    order = list(dict.fromkeys(int(n) for n in nodes))
    m = len(order)
    if neighbours >= m - 1:
        return {n: sorted(x for x in order if x != n) for n in order}
    half = (max(2, neighbours) + 1) // 2
    (rng or secrets.SystemRandom()).shuffle(order)
    out: dict[int, list[int]] = {}
    for pos, node in enumerate(order):
        near = {order[(pos + d) % m] for d in range(1, half + 1)}
        near |= {order[(pos - d) % m] for d in range(1, half + 1)}
        out[node] = sorted(near)
    return out


def connected(nodes: Iterable[int], graph: Mapping[int, Iterable[int]]) -> bool:
    """Whether ``nodes`` form one connected part of ``graph`` restricted to them."""
    members = {int(n) for n in nodes}
    if not members:
        return True
    start = next(iter(members))
    seen, todo = {start}, [start]
    while todo:
        for peer in graph.get(todo.pop(), ()):
            if peer in members and peer not in seen:
                seen.add(peer)
                todo.append(peer)
    return seen == members
