"""The node's secure-aggregation stages refuse what would reveal too much."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.secagg import handle_stage, masked_reply
from common import messages as k
from common.errors import ConfigError
from common.secagg.layout import Layout
from tests.flower_helpers import incoming, node_context

SESSION = "train-1"
NODES = [1, 2, 3]


def _stage(stage: str, node: int, context: Context, **extra: object) -> ConfigRecord:
    msg = incoming(RecordDict({k.CONFIG: ConfigRecord(
        {k.SECAGG_STAGE: stage, k.SECAGG_SESSION: SESSION, **extra})}), MessageType.QUERY,
        node_id=node)
    return handle_stage(msg, context, f"h{node}").content[k.SECAGG]  # type: ignore[return-value]


@pytest.fixture()
def shared() -> dict[int, Context]:
    """Three nodes past key sharing; node 1 has also sent its (empty) masked vector."""
    contexts = {n: node_context({}, node_id=n) for n in NODES}
    keys = {n: _stage("advertise", n, contexts[n], **{k.SECAGG_THRESHOLD: 2}) for n in NODES}
    roster = {k.SECAGG_NODES: NODES, k.SECAGG_C_PKS: [keys[n][k.SECAGG_C_PK] for n in NODES],
              k.SECAGG_S_PKS: [keys[n][k.SECAGG_S_PK] for n in NODES]}
    for n in NODES:
        _stage("share", n, contexts[n], **roster)
    layout = Layout.plan(num_nodes=3, model_length=0, dp_clip=0.0)
    msg = incoming(RecordDict({k.CONFIG: ConfigRecord(
        {k.SECAGG_SESSION: SESSION, k.SECAGG_NODES: NODES, **layout.to_config()})}),
        MessageType.EVALUATE, node_id=1)
    masked_reply(msg, Message(RecordDict(), reply_to=msg), contexts[1])
    return contexts


def test_a_node_answers_the_unmasking_once(shared: dict[int, Context]) -> None:
    lists = {k.SECAGG_SURVIVORS: [1, 2], k.SECAGG_DROPPED: [3]}
    first = _stage("unmask", 1, shared[1], **lists)
    assert list(first[k.SECAGG_OWNERS]) == [1]  # no boxes sent: its own share only
    with pytest.raises(ConfigError, match="already unmasked"):
        _stage("unmask", 1, shared[1], **{k.SECAGG_SURVIVORS: [1, 2, 3], k.SECAGG_DROPPED: []})


@pytest.mark.parametrize("lists", [
    {k.SECAGG_SURVIVORS: [1, 2], k.SECAGG_DROPPED: [2, 3]},  # 2 both survived and dropped
    {k.SECAGG_SURVIVORS: [1, 2], k.SECAGG_DROPPED: []},  # 3 left out
    {k.SECAGG_SURVIVORS: [1], k.SECAGG_DROPPED: [2, 3]},  # below the threshold
])
def test_inconsistent_survivor_lists_are_refused(shared: dict[int, Context],
                                                 lists: dict[str, list[int]]) -> None:
    with pytest.raises(ConfigError):
        _stage("unmask", 1, shared[1], **lists)


def test_a_node_without_a_masked_vector_reveals_nothing(shared: dict[int, Context]) -> None:
    with pytest.raises(ConfigError, match="sent no masked vector"):
        _stage("unmask", 2, shared[2], **{k.SECAGG_SURVIVORS: [1, 2], k.SECAGG_DROPPED: [3]})


def test_a_roster_without_the_nodes_own_keys_is_refused() -> None:
    ctx = node_context({}, node_id=1)
    _stage("advertise", 1, ctx, **{k.SECAGG_THRESHOLD: 2})
    other = {n: node_context({}, node_id=n) for n in NODES}
    keys = {n: _stage("advertise", n, other[n], **{k.SECAGG_THRESHOLD: 2}) for n in NODES}
    with pytest.raises(ConfigError, match="does not hold this node's keys"):
        _stage("share", 1, ctx, **{k.SECAGG_NODES: NODES,
                                   k.SECAGG_C_PKS: [keys[n][k.SECAGG_C_PK] for n in NODES],
                                   k.SECAGG_S_PKS: [keys[n][k.SECAGG_S_PK] for n in NODES]})


def test_a_threshold_below_a_majority_is_refused() -> None:
    contexts = {n: node_context({}, node_id=n) for n in [1, 2, 3, 4]}
    keys = {n: _stage("advertise", n, contexts[n], **{k.SECAGG_THRESHOLD: 2}) for n in contexts}
    roster = {k.SECAGG_NODES: list(contexts),
              k.SECAGG_C_PKS: [keys[n][k.SECAGG_C_PK] for n in contexts],
              k.SECAGG_S_PKS: [keys[n][k.SECAGG_S_PK] for n in contexts]}
    with pytest.raises(ConfigError, match="not a majority of 4"):
        _stage("share", 1, contexts[1], **roster)


def _group_node() -> Context:
    """Node 1 of a sparse session: its group is itself and nodes 2 and 7 (threshold 2)."""
    group = [1, 2, 7]
    contexts = {n: node_context({}, node_id=n) for n in group}
    keys = {n: _stage("advertise", n, contexts[n], **{k.SECAGG_THRESHOLD: 2}) for n in group}
    _stage("share", 1, contexts[1], **{
        k.SECAGG_NODES: group, k.SECAGG_C_PKS: [keys[n][k.SECAGG_C_PK] for n in group],
        k.SECAGG_S_PKS: [keys[n][k.SECAGG_S_PK] for n in group]})
    return contexts[1]


def _mask(context: Context, u2: list[int]) -> None:
    layout = Layout.plan(num_nodes=len(u2), model_length=0, dp_clip=0.0)
    msg = incoming(RecordDict({k.CONFIG: ConfigRecord(
        {k.SECAGG_SESSION: SESSION, k.SECAGG_NODES: u2, **layout.to_config()})}),
        MessageType.EVALUATE, node_id=1)
    masked_reply(msg, Message(RecordDict(), reply_to=msg), context)


def test_in_a_sparse_session_a_node_counts_its_own_group() -> None:
    # the session's U2 names non-neighbours too; what matters is how many of the group remain
    context = _group_node()
    with pytest.raises(ConfigError, match="too few of this node's group"):
        _mask(context, [1, 3, 4, 5, 6])  # only node 1 of its group {1, 2, 7} is left
    _mask(context, [1, 2, 3, 4, 5, 6, 7])
    with pytest.raises(ConfigError, match="fewer survivors in this node's group"):
        _stage("unmask", 1, context, **{k.SECAGG_SURVIVORS: [1, 3, 4, 5, 6],
                                        k.SECAGG_DROPPED: [2, 7]})
    answer = _stage("unmask", 1, context, **{k.SECAGG_SURVIVORS: [1, 2, 3, 4, 5, 6],
                                             k.SECAGG_DROPPED: [7]})
    assert list(answer[k.SECAGG_OWNERS]) == [1]
