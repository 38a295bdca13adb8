"""Who must survive a secure-aggregation session: the threshold and the minimum survivors.

Modes (run config ``secure-aggregation``): ``"on"``, ``"off"`` or ``"auto"`` (on when at
least :data:`AUTO_MIN_NODES` nodes take part). ``secagg-min-survivors`` = 0 picks
:func:`default_min_survivors`.
"""

from __future__ import annotations

import math

from common.errors import ConfigError

__all__ = ["AUTO_MIN_NODES", "MODES", "SLOW_ABOVE", "default_min_survivors", "enabled",
           "scale_warning", "threshold"]

MODES = ("auto", "on", "off")
AUTO_MIN_NODES = 3
#: Above this many hospitals one session's secret sharing costs more than ~10 s of CPU
#: (every node shares with every other; measured in bench/RESULTS.md: 4 s at 30, 125 s at 100).
SLOW_ABOVE = 40


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


def scale_warning(num_nodes: int) -> str | None:
    """What an operator should know before a secure run with many hospitals (None when few).

    Each session shares two seeds of every node with every other node and recovers one per
    node from a majority of shares (Flower's pure-Python Shamir): its cost grows like n^3, and
    a run's statistics take dozens of sessions.
    """
    if num_nodes <= SLOW_ABOVE:
        return None
    return (f"secure aggregation with {num_nodes} hospitals: every hospital shares its secrets "
            "with every other, so each secure session costs tens of seconds to minutes of CPU "
            "(about 2 min at 100 hospitals) and the final statistics take dozens of sessions; "
            "the run may take hours. --secure-aggregation off is fast but shows the "
            "coordinator each hospital's update")
