"""Sparse (SecAgg+) secure aggregation: each node shares and masks only within its group.

The sums must equal the plain sums over the survivors with dropouts at every stage, a node's
share boxes go to its neighbours only, and a session whose survivors fall apart in the
neighbour graph is abandoned before anyone reveals a share. The small-graph tests lower
``SLOW_ABOVE``/``NEIGHBOURS`` so a dozen nodes run sparse; one test runs the real
parameters at 100 hospitals.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from common import messages as k
from common.secagg import graph, params
from server.strategies import secagg_session
from server.strategies.secagg_session import secure_sum
from tests.server.secagg_fakes import DroppingGrid, fixed_update_app

NODES = list(range(101, 113))  # 12 nodes
EXAMPLES = {n: 3 + (7 * n) % 50 for n in range(1, 400)}


def _grid(nodes: list[int], drop: dict[int, str] | None = None) -> DroppingGrid:
    app = fixed_update_app({}, EXAMPLES, {n: 0.5 for n in nodes})
    return DroppingGrid(app, nodes, drop)


def _queries(nodes: list[int]) -> list[Message]:
    content = RecordDict({k.CONFIG: ConfigRecord({"query": "counts"})})
    return [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]


def _expected(summed: list[int]) -> list[int]:
    return [sum(EXAMPLES[n] % 5 for n in summed), 2 * len(summed),
            sum(EXAMPLES[n] for n in summed), len(summed)]


@pytest.fixture
def sparse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions of more than 5 nodes run sparse with 4 neighbours (groups of 5, threshold 3);
    the graph is the ring in node order (no shuffle) so that a test can cut it."""
    monkeypatch.setattr(params, "SLOW_ABOVE", 5)
    monkeypatch.setattr(params, "NEIGHBOURS", 4)

    class NoShuffle(random.Random):
        def shuffle(self, x: list[int]) -> None:  # type: ignore[override]
            x.sort()

    monkeypatch.setattr(secagg_session, "neighbourhoods",
                        lambda nodes, k: graph.neighbourhoods(nodes, k, rng=NoShuffle()))


# --- the graph ------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "k"), [(12, 4), (30, 6), (41, 40), (100, 40), (7, 10)])
def test_the_graph_is_symmetric_regular_and_complete_when_small(n: int, k: int) -> None:
    nodes = list(range(1000, 1000 + n))
    g = graph.neighbourhoods(nodes, k, rng=random.Random(n))
    assert sorted(g) == nodes
    degree = min(k, n - 1)
    for node, peers in g.items():
        assert node not in peers and len(peers) == degree == len(set(peers))
        assert all(node in g[p] for p in peers)


def test_the_graph_survives_the_loss_of_fewer_than_k_nodes() -> None:
    # a Harary graph H(k, n) is k-connected: removing any k - 1 nodes leaves it connected
    nodes = list(range(14))
    g = graph.neighbourhoods(nodes, 4, rng=random.Random(3))
    for gone in itertools.combinations(nodes, 3):
        assert graph.connected(set(nodes) - set(gone), g)
    ring = graph.neighbourhoods(nodes, 2, rng=random.Random(3))
    order = [nodes[0]]
    while len(order) < len(nodes):  # walk the ring to find two opposite nodes
        order.append(next(p for p in ring[order[-1]] if p not in order))
    assert not graph.connected(set(nodes) - {order[0], order[7]}, ring)


def test_the_rule_is_full_sharing_up_to_slow_above_and_sparse_beyond() -> None:
    assert params.neighbour_count(params.SLOW_ABOVE) == params.SLOW_ABOVE - 1
    assert params.neighbour_count(params.SLOW_ABOVE + 1) == params.NEIGHBOURS
    assert params.neighbour_count(1000) == params.NEIGHBOURS
    assert params.group_threshold(params.NEIGHBOURS + 1) == params.NEIGHBOURS // 2 + 1


# --- the protocol ---------------------------------------------------------------------------

@pytest.mark.parametrize("drop", [{}, {103: "train", 108: "train"}, {104: "unmask"},
                                  {102: "share", 107: "train", 111: "unmask"}])
def test_a_sparse_sum_equals_the_plain_sum_over_the_survivors(sparse: None, drop: dict[int, str]
                                                              ) -> None:
    grid = _grid(NODES, drop)
    result = secure_sum(grid, _queries(NODES), int_keys=[k.CONFUSION, k.NUM_EXAMPLES],
                        int_lengths=[4, 1], min_survivors=3, timeout=5)
    assert result.record["status"] == "ok", result.record
    assert result.record["neighbours"] == 4 and result.record["share_threshold"] == 3
    summed = [n for n in NODES if drop.get(n) not in ("share", "train")]
    assert result.sums is not None and result.contributors == len(summed)
    assert result.sums[k.CONFUSION].tolist() == _expected(summed)
    assert result.sums[k.NUM_EXAMPLES].tolist() == [sum(EXAMPLES[n] for n in summed)]


def test_a_node_shares_with_its_neighbours_only(sparse: None) -> None:
    grid = _grid(NODES)
    secure_sum(grid, _queries(NODES), int_keys=[k.CONFUSION], int_lengths=[4],
               min_survivors=3, timeout=5)
    share_asks = [m for m in grid.sent
                  if m.content[k.CONFIG].get(k.SECAGG_STAGE) == "share"]
    assert len(share_asks) == len(NODES)
    for msg in share_asks:  # the ring in node order: two neighbours on either side
        me = int(msg.metadata.dst_node_id)
        pos = NODES.index(me)
        group = sorted(NODES[(pos + d) % len(NODES)] for d in (-2, -1, 0, 1, 2))
        assert list(msg.content[k.CONFIG][k.SECAGG_NODES]) == group
        assert msg.content[k.CONFIG][k.SECAGG_C_PKS] and len(
            msg.content[k.CONFIG][k.SECAGG_C_PKS]) == 5
    replies = [r for r in grid.replies if not r.has_error()
               and k.SECAGG in r.content and k.SECAGG_DEST in r.content[k.SECAGG]]
    assert all(len(r.content[k.SECAGG][k.SECAGG_DEST]) == 4 for r in replies)


def test_survivors_that_fall_apart_abandon_the_session_before_any_share_is_revealed(
        sparse: None) -> None:
    # the ring 101..112 with two neighbours either side: losing 103, 104 and 109, 110 at the
    # masked input leaves {105..108} and {111, 112, 101, 102}, two separate parts
    drop = {103: "train", 104: "train", 109: "train", 110: "train"}
    grid = _grid(NODES, drop)
    result = secure_sum(grid, _queries(NODES), int_keys=[k.CONFUSION], int_lengths=[4],
                        min_survivors=3, timeout=5)
    assert result.sums is None and result.record["status"] == "abandoned"
    assert "connected" in result.record["reason"]
    assert not [m for m in grid.sent if m.content[k.CONFIG].get(k.SECAGG_STAGE) == "unmask"]


def test_a_node_refuses_a_sparse_threshold_below_a_majority_of_its_group(
        sparse: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secagg_session, "group_threshold", lambda size: 2)
    grid = _grid(NODES)
    result = secure_sum(grid, _queries(NODES), int_keys=[k.CONFUSION], int_lengths=[4],
                        min_survivors=3, timeout=5)
    assert result.sums is None and result.record["stage"] == "key sharing"
    errors = [r for r in grid.replies if r.has_error()]
    assert len(errors) == len(NODES)
    assert all("not a majority" in e.error.reason for e in errors)


def test_a_hundred_hospitals_share_with_forty_neighbours_each() -> None:
    nodes = list(range(1, 101))
    drop = {5: "train", 50: "unmask", 77: "share"}
    grid = _grid(nodes, drop)
    result = secure_sum(grid, _queries(nodes), int_keys=[k.CONFUSION], int_lengths=[4],
                        timeout=5)
    assert result.record["status"] == "ok", result.record
    assert result.record["neighbours"] == 40 and result.record["share_threshold"] == 21
    summed = [n for n in nodes if n not in (5, 77)]
    assert result.sums is not None
    assert result.sums[k.CONFUSION].tolist() == _expected(summed)
    groups = [list(m.content[k.CONFIG][k.SECAGG_NODES]) for m in grid.sent
              if m.content[k.CONFIG].get(k.SECAGG_STAGE) == "share"]
    assert groups and all(len(g) == 41 for g in groups)
    assert np.mean([len(set(g) & set(range(1, 42))) for g in groups]) < 30  # random, not a band


def test_the_report_says_how_the_hospitals_shared_their_secrets() -> None:
    from server.report_secagg import secagg_html, secagg_lines, secagg_record

    many = secagg_record(enabled=True, mode="auto", hospitals=100, min_survivors=67, sessions=[])
    assert many["neighbours"] == 40
    line = secagg_lines({"secure_aggregation": many})[0]
    assert "40 randomly drawn neighbours, not all 99 others (SecAgg+" in line
    assert "21 of its group of 41" in line and "21 of its group of 41" in secagg_html(many)
    few = secagg_record(enabled=True, mode="auto", hospitals=3, min_survivors=3, sessions=[])
    assert "shared its mask secrets with every other" in secagg_lines({"secure_aggregation": few})[0]


def test_an_operator_can_ask_for_more_or_fewer_neighbours() -> None:
    from common.config import RunConfig
    from common.errors import ConfigError

    assert params.neighbour_count(100, 99) == 99  # full sharing at any size
    assert params.neighbour_count(100, 500) == 99
    assert params.neighbour_count(20, 6) == 6  # sparse below SLOW_ABOVE when asked
    assert params.neighbour_count(5, 1) == 2
    assert params.scale_warning(20, 6) is not None and params.scale_warning(20) is None
    full = params.scale_warning(100, 100)
    assert full is not None and "full sharing" in full and "hours" in full
    config = RunConfig(secagg_neighbours=12)
    assert RunConfig.from_user_config(config.to_dict()).secagg_neighbours == 12
    with pytest.raises(ConfigError, match="secagg-neighbours"):
        RunConfig(secagg_neighbours=1)


def test_the_session_takes_the_operators_neighbours() -> None:
    nodes = list(range(1, 13))
    grid = _grid(nodes)
    result = secure_sum(grid, _queries(nodes), int_keys=[k.CONFUSION], int_lengths=[4],
                        timeout=5, neighbours=4)
    assert result.record["status"] == "ok" and result.record["neighbours"] == 4
    assert result.sums is not None and result.sums[k.CONFUSION].tolist() == _expected(nodes)
