"""Who must survive a secure-aggregation session: the threshold and the minimum survivors.

Modes (run config ``secure-aggregation``): ``"on"``, ``"off"`` or ``"auto"`` (on when at
least :data:`AUTO_MIN_NODES` nodes take part). ``secagg-min-survivors`` = 0 picks
:func:`default_min_survivors`.
"""

from __future__ import annotations

import math

from common.errors import ConfigError

__all__ = ["AUTO_MIN_NODES", "MODES", "NEIGHBOURS", "SLOW_ABOVE", "default_min_survivors",
           "enabled", "group_threshold", "neighbour_count", "scale_warning", "threshold"]

MODES = ("auto", "on", "off")
AUTO_MIN_NODES = 3
#: Above this many hospitals full sharing (every node with every other) costs more than ~10 s
#: of CPU per session (bench/RESULTS.md: 4 s at 30, 125 s at 100), so sessions switch to
#: SecAgg+'s sparse groups (:mod:`common.secagg.graph`).
SLOW_ABOVE = 40
#: Neighbours per hospital in a sparse session: its group (itself and these) is as large as a
#: full session of ``NEIGHBOURS + 1`` hospitals, so a session costs each hospital about what
#: one of 41 hospitals costs, and the coordinator's recovery grows linearly with n.
NEIGHBOURS = 40


def enabled(mode: str, num_nodes: int) -> bool:
    """Whether secure aggregation runs for ``num_nodes`` nodes under ``mode``."""
    if mode not in MODES:
        raise ConfigError(f"secure-aggregation must be one of {', '.join(MODES)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and num_nodes >= AUTO_MIN_NODES)


def default_min_survivors(num_nodes: int) -> int:
    """Default minimum survivors: ``max(3, ceil(2n/3))``, at most ``n``.

    With three hospitals and one dropout, the two survivors could each compute the other's
    update from the released sum; the default therefore never accepts fewer than three (a
    run config may lower it explicitly, down to 2).
    """
    return min(num_nodes, max(AUTO_MIN_NODES, math.ceil(2 * num_nodes / 3)))


def threshold(num_nodes: int, min_survivors: int) -> int:
    """The secret-sharing threshold: at least the minimum survivors and a strict majority.

    A majority threshold keeps a coordinator that lies about who dropped from collecting
    both shares of one node's secrets from two disjoint groups.
    """
    wanted = min_survivors if min_survivors > 0 else default_min_survivors(num_nodes)
    return max(wanted, num_nodes // 2 + 1, 2)


def neighbour_count(num_nodes: int, requested: int = 0) -> int:
    """How many peers each of ``num_nodes`` nodes shares its secrets with and masks towards.

    ``requested`` is the run config's ``secagg-neighbours``: 0 picks the default, all others
    up to :data:`SLOW_ABOVE` nodes (full secure aggregation) and :data:`NEIGHBOURS` beyond
    (SecAgg+); a positive number asks for that many (at least 2, at most all others).
    """
    if requested > 0:
        return max(0, min(num_nodes - 1, max(2, requested)))
    if num_nodes <= SLOW_ABOVE:
        return max(0, num_nodes - 1)
    return min(num_nodes - 1, NEIGHBOURS)


def group_threshold(group_size: int) -> int:
    """Shares that recover a secret shared within a sparse group of ``group_size`` nodes: a
    strict majority of the group, so a coordinator that lies about who dropped cannot collect
    both of a node's secrets from two disjoint parts of its group."""
    return max(2, group_size // 2 + 1)


def scale_warning(num_nodes: int, requested: int = 0) -> str | None:
    """What an operator should know before a secure run with many hospitals (None when few).

    Beyond :data:`SLOW_ABOVE` hospitals sessions are sparse (SecAgg+): cheaper, and with a
    weaker collusion bound than full sharing, which the operator should know.
    """
    k = neighbour_count(num_nodes, requested)
    if k >= num_nodes - 1:
        if num_nodes <= SLOW_ABOVE:
            return None
        return (f"secure aggregation with {num_nodes} hospitals and full sharing "
                "(--secagg-neighbours): every hospital shares its secrets with every other, "
                "so each session costs O(n^2) shares and the run may take hours; the default "
                f"shares with {NEIGHBOURS} neighbours beyond {SLOW_ABOVE} hospitals")
    return (f"secure aggregation with {num_nodes} hospitals: each hospital shares its secrets "
            f"with {k} randomly drawn neighbours (SecAgg+), not with all {num_nodes - 1} others, "
            f"so that a session stays cheap; a hospital's update is hidden unless "
            f"{group_threshold(k + 1)} of its group of {k + 1} collude with the coordinator "
            f"(with full sharing: {threshold(num_nodes, 0)} of {num_nodes}). "
            "--secagg-neighbours N asks for more (all: full sharing, slow); "
            "--secure-aggregation off is faster still but shows the coordinator each "
            "hospital's update")
