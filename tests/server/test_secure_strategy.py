"""SecureFedAvg against plain FedAvg on a fake federation with fixed updates.

Prepare: five nodes whose train handler adds a fixed update (the real secure-aggregation mod
and stage handler run on each node). Execute: one round of the secure strategy, with a node
silenced from a chosen stage on. Assert: the model equals plain FedAvg over the nodes whose
vectors were summed, within the quantisation bound; nothing per node travels in the clear.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common import messages as k
from common.secagg.encoding import quantisation_bound
from server.strategies.fedavg import VesaliusFedAvg
from server.strategies.secagg_session import secure_sum
from server.strategies.secure import SecureFedAvg
from tests.server.secagg_fakes import DroppingGrid, arrays_of, fixed_update_app

NODES = [11, 12, 13, 14, 15]
RNG = np.random.default_rng(7)
START = {"w": RNG.normal(size=(6, 5)), "b": RNG.normal(size=5), "steps": np.array(3, dtype=np.int64)}
UPDATES = {n: {"w": RNG.normal(scale=0.1, size=(6, 5)), "b": RNG.normal(scale=0.1, size=5),
               "steps": np.array(2, dtype=np.int64)} for n in NODES}
EXAMPLES = {11: 40, 12: 13, 13: 100, 14: 7, 15: 55}
LOSSES = {11: 0.7, 12: 0.2, 13: 0.5, 14: 1.1, 15: 0.9}
HISTS = {n: ([i + n for i in range(1000)], [3 * i % 7 for i in range(1000)]) for n in NODES}


def _grid(drop: dict[int, str] | None = None) -> DroppingGrid:
    return DroppingGrid(fixed_update_app(UPDATES, EXAMPLES, LOSSES, HISTS), NODES, drop)


def _one_round(strategy: VesaliusFedAvg, grid: DroppingGrid
               ) -> tuple[ArrayRecord | None, dict[str, float]]:
    arrays = arrays_of(START)
    messages = strategy.configure_train(1, arrays, ConfigRecord({"seed": 1}), grid)  # type: ignore[arg-type]
    replies = grid.send_and_receive(messages)
    new, metrics = strategy.aggregate_train(1, replies)
    return new, dict(metrics or {})


def _secure(**kw: object) -> SecureFedAvg:
    return SecureFedAvg(min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1,
                        timeout=5, **kw)  # type: ignore[arg-type]


def _plain_over(nodes: list[int]) -> tuple[ArrayRecord, dict[str, float]]:
    drop = {n: "advertise" for n in NODES if n not in nodes}
    new, metrics = _one_round(VesaliusFedAvg(min_train_nodes=1, min_available_nodes=1), _grid(drop))
    assert new is not None
    return new, metrics


def _assert_close(secure: ArrayRecord, plain: ArrayRecord, summed: list[int], bits: int) -> None:
    # |error of sum(n_i d_i)| < nodes * 2^-bits per coordinate, then divided by sum(n_i).
    bound = quantisation_bound(len(summed), bits) / sum(EXAMPLES[n] for n in summed)
    for key in START:
        a, b = secure[key].numpy(), plain[key].numpy()
        assert a.shape == b.shape and a.dtype == START[key].dtype  # dtypes kept
        if key == "steps":  # an integer buffer: exact (Flower's FedAvg turns it into a float)
            assert a == np.rint(b)  # (its float average may come out as 4.999...)
        else:
            assert np.abs(a - b).max() <= bound + 1e-12


@pytest.mark.parametrize(
    ("drop", "summed"),
    [
        ({}, NODES),
        ({12: "advertise"}, [11, 13, 14, 15]),  # before key advertisement
        ({12: "share"}, [11, 13, 14, 15]),  # after advertising, before sharing
        ({12: "train"}, [11, 13, 14, 15]),  # after key sharing, no masked input
        ({12: "unmask"}, NODES),  # after its masked input: its vector is in the sum
        ({12: "share", 14: "train"}, [11, 13, 15]),  # two stages, down to the minimum
    ],
)
def test_secure_round_equals_fedavg_over_the_summed_nodes(drop: dict[int, str],
                                                          summed: list[int]) -> None:
    strategy = _secure(min_survivors=3)
    grid = _grid(drop)
    new, metrics = _one_round(strategy, grid)
    plain, plain_metrics = _plain_over(summed)
    assert new is not None
    bits = int(next(m for m in grid.sent if m.metadata.message_type == "train")
               .content[k.CONFIG][k.SECAGG_MODEL_BITS])
    _assert_close(new, plain, summed, bits)
    assert metrics[k.NUM_EXAMPLES] == sum(EXAMPLES[n] for n in summed)
    assert metrics[k.TRAIN_LOSS] == pytest.approx(plain_metrics[k.TRAIN_LOSS], abs=1e-6)
    row = strategy.log_rows[-1]
    assert row["status"] == "ok" and row["survivors"] == len(summed if drop.get(12) != "unmask" else NODES)
    # a node silent from the first stage on never named itself in this run: its node id
    assert {d["site"] for d in row["dropped"]} == {
        f"node-{n}" if stage == "advertise" else f"h{n}" for n, stage in drop.items()}


def test_nothing_per_node_leaves_in_the_clear() -> None:
    grid = _grid()
    _one_round(_secure(min_survivors=3), grid)
    train = [r for r in grid.replies if k.SECAGG_MASKED in r.content]
    assert len(train) == len(NODES)
    for reply in train:
        assert k.ARRAYS not in reply.content
        metrics = reply.content[k.METRICS]
        for hidden in (k.NUM_EXAMPLES, k.UNIT_WEIGHT, k.TRAIN_LOSS, k.SAMPLE_RATE, k.STEPS):
            assert hidden not in metrics
        assert metrics[k.EPSILON] == 1.5  # the node's own privacy accounting stays visible
        assert reply.content[k.SECAGG_MASKED][k.SECAGG_VECTOR].numpy().dtype == np.uint64


@pytest.mark.parametrize(("drop", "stage"), [
    ({12: "advertise", 13: "advertise"}, "key advertisement"),
    ({12: "share", 13: "share"}, "key sharing"),
    ({12: "train", 13: "train"}, "masked input"),
    ({12: "unmask", 13: "unmask"}, "unmasking"),
])
def test_below_the_minimum_survivors_the_round_is_abandoned(drop: dict[int, str], stage: str) -> None:
    strategy = _secure()  # default minimum for 5 nodes: 4
    new, _ = _one_round(strategy, _grid(drop))
    assert new is None
    row = strategy.log_rows[-1]
    assert row["status"] == "abandoned" and row["stage"] == stage
    assert "fewer than the minimum of 4 survivors" in row["reason"]
    entry = strategy.rounds[1]  # the round log (report.json) says so too
    assert entry.status == "failed" and "abandoned at " + stage in entry.failure


def test_three_nodes_and_one_dropout_is_abandoned_by_default() -> None:
    strategy = _secure()
    grid = DroppingGrid(fixed_update_app(UPDATES, EXAMPLES, LOSSES), NODES[:3], {12: "train"})
    arrays = arrays_of(START)
    replies = grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord({}), grid))  # type: ignore[arg-type]
    assert strategy.aggregate_train(1, replies)[0] is None
    assert strategy.log_rows[-1]["threshold"] == 3


def test_hospital_dp_noise_is_z_times_c_over_the_survivors() -> None:
    # Zero updates: the new model minus the old is the noise alone, divided by the survivors.
    zero = {n: {"w": np.zeros((200, 100)), "b": np.zeros(5), "steps": np.array(0)} for n in NODES}
    start = {"w": np.zeros((200, 100)), "b": np.zeros(5), "steps": np.array(3, dtype=np.int64)}
    grid = DroppingGrid(fixed_update_app(zero, EXAMPLES, LOSSES), NODES, {15: "train"})
    strategy = _secure(min_survivors=3, dp_noise=0.8, dp_clip=0.5, dp_delta=1e-3, num_hospitals=5)
    msgs = strategy.configure_train(1, arrays_of(start), ConfigRecord({}), grid)  # type: ignore[arg-type]
    new, _ = strategy.aggregate_train(1, grid.send_and_receive(msgs))
    assert new is not None
    noise = new["w"].numpy().ravel()
    assert strategy.noise_std() == pytest.approx(0.8 * 0.5)
    assert noise.std() == pytest.approx(0.8 * 0.5 / 4, rel=0.03)  # 4 survivors of 5
    spent = strategy.spent()
    assert spent.releases == 1 and 0 < spent.epsilon < math.inf


def test_hospital_dp_clips_each_update_before_masking() -> None:
    big = {n: {"w": np.full((6, 5), 1.0 * (i + 1)), "b": np.zeros(5), "steps": np.array(0)}
           for i, n in enumerate(NODES)}
    grid = DroppingGrid(fixed_update_app(big, EXAMPLES, LOSSES), NODES)
    strategy = _secure(min_survivors=3, dp_noise=1e-9, dp_clip=2.0, num_hospitals=5)
    msgs = strategy.configure_train(1, arrays_of(START), ConfigRecord({}), grid)  # type: ignore[arg-type]
    new, _ = strategy.aggregate_train(1, grid.send_and_receive(msgs))
    assert new is not None
    step = new["w"].numpy() - START["w"]
    # every update is clipped to norm 2 over all arrays (30 equal entries): 2/sqrt(30) each
    assert np.allclose(step, 2.0 / math.sqrt(30), atol=1e-6)


def test_evaluation_histograms_are_summed_securely() -> None:
    grid = _grid({14: "evaluate"})
    strategy = _secure(min_survivors=3)
    msgs = strategy.configure_evaluate(1, arrays_of(START), ConfigRecord(
        {k.WITH_HISTOGRAMS: True}), grid)  # type: ignore[arg-type]
    metrics = strategy.aggregate_evaluate(1, grid.send_and_receive(msgs))
    assert metrics is not None
    alive = [n for n in NODES if n != 14]
    assert metrics[k.HIST_POSITIVE] == list(np.sum([HISTS[n][0] for n in alive], axis=0))
    assert metrics[k.HIST_NEGATIVE] == list(np.sum([HISTS[n][1] for n in alive], axis=0))
    assert k.AUC_POOLED in metrics
    assert all(k.HIST_POSITIVE not in r.content.get(k.METRICS, {}) for r in grid.replies
               if r.metadata.message_type == "evaluate")


def _queries() -> list[Message]:
    content = RecordDict({k.CONFIG: ConfigRecord({"query": "counts"})})
    return [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in NODES]


@pytest.mark.parametrize("drop", [{}, {13: "train"}, {13: "unmask"}])
def test_secure_sum_of_a_statistics_query(drop: dict[int, str]) -> None:
    grid = _grid(drop)
    result = secure_sum(grid, _queries(), int_keys=[k.CONFUSION, k.NUM_EXAMPLES],
                        int_lengths=[4, 1], min_survivors=3, timeout=5)
    summed = [n for n in NODES if drop.get(n) != "train"]
    assert result.sums is not None and result.contributors == len(summed)
    assert result.sums[k.CONFUSION].tolist() == [
        sum(EXAMPLES[n] % 5 for n in summed), 2 * len(summed), sum(EXAMPLES[n] for n in summed),
        len(summed)]
    assert result.sums[k.NUM_EXAMPLES].tolist() == [sum(EXAMPLES[n] for n in summed)]
    for reply in result.replies:  # what the coordinator saw of each node: no count at all
        assert k.CONFUSION not in reply.content[k.METRICS]
        assert k.NUM_EXAMPLES not in reply.content[k.METRICS]


def test_secure_sum_below_the_minimum_is_abandoned_with_its_reason() -> None:
    result = secure_sum(_grid({12: "share", 13: "share", 14: "share"}), _queries(),
                        int_keys=[k.CONFUSION], int_lengths=[4], timeout=5)
    assert result.sums is None and result.record["status"] == "abandoned"
    assert result.record["stage"] == "key sharing"


def test_the_final_evaluation_pools_histograms_securely() -> None:
    from common.stats.histogram import auc_from_histograms

    strategy = _secure(min_survivors=3)
    grid = _grid({15: "evaluate"})
    entry = strategy.evaluate_everywhere(grid, arrays_of(START), ConfigRecord(  # type: ignore[arg-type]
        {k.WITH_HISTOGRAMS: True}), timeout=5)
    alive = [n for n in NODES if n != 15]
    expected = auc_from_histograms(list(np.sum([HISTS[n][0] for n in alive], axis=0)),
                                   list(np.sum([HISTS[n][1] for n in alive], axis=0)))
    assert entry.evaluate_metrics[k.AUC_POOLED] == pytest.approx(expected)
    assert len(entry.evaluate) == 4
    assert strategy.log_rows[-1]["round"] == "final" and strategy.log_rows[-1]["status"] == "ok"
    assert all(k.HIST_POSITIVE not in r.content.get(k.METRICS, {}) for r in grid.replies)


def test_an_abandoned_final_evaluation_is_asked_again_without_histograms() -> None:
    strategy = _secure()  # 4 of 5 needed; two drop while sharing
    grid = _grid({12: "share", 13: "share"})
    entry = strategy.evaluate_everywhere(grid, arrays_of(START), ConfigRecord(  # type: ignore[arg-type]
        {k.WITH_HISTOGRAMS: True}), timeout=5)
    assert len(entry.evaluate) == 3 and k.LOSS in entry.evaluate_metrics
    assert k.AUC_POOLED not in entry.evaluate_metrics
    assert strategy.log_rows[-1]["status"] == "abandoned"
    assert all(k.HIST_POSITIVE not in r.content.get(k.METRICS, {}) for r in grid.replies)


@pytest.mark.parametrize("stage", ["advertise", "share", "train", "unmask"])
def test_a_hospital_lost_at_any_stage_is_in_the_rounds_errors_and_dropped_once(stage: str) -> None:
    strategy = _secure(min_survivors=3)
    strategy.sites[12] = "h12"  # it named itself in an earlier round
    _one_round(strategy, _grid({12: stage}))
    entry = strategy.rounds[1]
    assert [(e["site"], e["phase"]) for e in entry.errors] == [("h12", "train")]
    assert list(strategy.dropped) == ["h12"] and strategy.dropped["h12"]["round"] == 1


def test_a_hospital_that_refuses_a_secure_evaluation_is_named_for_its_refusal_not_as_dropped(
) -> None:
    """A small hospital refuses its masked input under its release rules: one row with its own
    reason, and it is not reported as having stopped answering."""
    app = fixed_update_app(UPDATES, EXAMPLES, LOSSES, HISTS, refuse_evaluate={14})
    grid = DroppingGrid(app, NODES)
    strategy = _secure(min_survivors=3)
    strategy.sites.update({n: f"h{n}" for n in NODES})
    msgs = strategy.configure_evaluate(1, arrays_of(START), ConfigRecord(
        {k.WITH_HISTOGRAMS: True}), grid)  # type: ignore[arg-type]
    metrics = strategy.aggregate_evaluate(1, grid.send_and_receive(msgs))
    assert metrics is not None and k.AUC_POOLED in metrics
    reasons = [(e["site"], e["reason"]) for e in strategy.rounds[1].errors]
    assert len(reasons) == 1 and reasons[0][0] == "h14"
    assert "refused: 5 patient(s)" in reasons[0][1] and "stopped answering" not in reasons[0][1]
    assert not strategy.dropped
