"""Packed models and adaptive polling between the coordinator and the nodes.

server/transport.py (TransportGrid) on a fake grid, client/transport.py (transport_mod) on
in-process messages, and both together under Flower's FedAvg: the aggregated model is the
same, bit for bit, as without packing.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from client.transport import transport_mod
from common.packing import (
    ENV_TRANSPORT,
    LAYOUT_KEY,
    TRANSPORT_KEY,
    PackingError,
    is_marked,
    is_packed,
    pack_content,
)
from server.progress import ProgressEvent, ProgressGrid
from server.transport import IN_MEMORY_POLLS, PollSchedule, TransportGrid, with_transport
from tests.flower_helpers import incoming, node_context

Handler = Callable[[Message, Context], Message]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a running ServerApp Flower has no task identity to stamp on new messages."""
    for attr in ("_run_id", "_node_id", "_task_id"):
        if getattr(TaskIdentity, attr) is None:
            monkeypatch.setattr(TaskIdentity, attr, 1 if attr != "_node_id" else 0)


def _model(seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({
        "conv.weight": Array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32)),
        "conv.bias": Array(rng.standard_normal(4).astype(np.float32)),
        "norm.weight": Array(np.ones(4, np.float32)),
        "steps": Array(np.array(0, dtype=np.int64)),
        "ring": Array(np.array([2**64 - 1, 3], dtype=np.uint64)),
    })


def _echo_train(msg: Message, context: Context) -> Message:
    """A deterministic "node": adds its node id / 100 to every float weight."""
    arrays = msg.content["arrays"]
    assert isinstance(arrays, ArrayRecord) and not is_packed(arrays)
    assert TRANSPORT_KEY not in msg.content  # the mod hid the marker from the handler
    shift = context.node_id / 100.0
    out = ArrayRecord({
        name: Array(np.asarray(arr.numpy() + np.asarray(shift, arr.numpy().dtype))
                    if arr.numpy().dtype.kind == "f" else arr.numpy())
        for name, arr in arrays.items()
    })
    metrics = MetricRecord({"num-examples": 10 * context.node_id})
    return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)


class NodesGrid:
    """A fake Grid whose nodes answer at the k-th pull after a push, each through the node's
    mods. It records what travelled, as the SuperLink would store it."""

    def __init__(self, handler: Handler, *, nodes: int = 3, mods: bool = True,
                 answer_after: Iterable[int] = (), never: Iterable[int] = ()) -> None:
        self.handler = handler
        self.nodes = list(range(1, nodes + 1))
        self.mods = mods
        self.answer_after = dict(enumerate(answer_after))
        self.never = set(never)
        self.wire: list[Message] = []  # every pushed message, as pushed
        self.replies_wire: list[Message] = []  # every reply, as pulled
        self.pulls = 0
        self._queue: dict[str, tuple[int, Message]] = {}
        self._counter = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for i, msg in enumerate(messages):
            self._counter += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._counter}"
            self.wire.append(msg)
            if i not in self.never:
                self._queue[msg.metadata.message_id] = (self.pulls + self.answer_after.get(i, 0),
                                                        msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        out = []
        for mid, (due, msg) in list(self._queue.items()):
            if mid in wanted and self.pulls >= due:
                del self._queue[mid]
                out.append(self._answer(msg))
        self.pulls += 1
        self.replies_wire.extend(out)
        return out

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """Flower's loop without its sleeps (the stock path of the comparison)."""
        pending = set(self.push_messages(messages))
        replies: list[Message] = []
        while pending:
            got = self.pull_messages(pending)
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
        return replies

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        received = incoming(msg.content, msg.metadata.message_type, node_id=node)
        received.metadata.__dict__["_message_id"] = msg.metadata.message_id
        context = node_context({}, node_id=node)
        if self.mods:
            reply = transport_mod(received, context, self.handler)
        else:
            reply = self.handler(received, context)
        reply.metadata.__dict__["_message_id"] = f"r-{msg.metadata.message_id}"
        return reply


def _train_messages(grid: NodesGrid, content: RecordDict) -> list[Message]:
    return [Message(content, node, "train", group_id="1") for node in grid.get_node_ids()]


def _content(server_round: int = 1) -> RecordDict:
    return RecordDict({"arrays": _model(), "config": ConfigRecord({"server-round": server_round})})


# --- what travels ---------------------------------------------------------------------------

def test_models_travel_packed_both_ways_and_arrive_as_ordinary_records() -> None:
    # Prepare
    fake = NodesGrid(_echo_train)
    grid = TransportGrid(fake, sleep=lambda _s: None)  # type: ignore[arg-type]
    content = _content()
    messages = _train_messages(fake, content)
    # Execute
    replies = list(grid.send_and_receive(messages, timeout=10))
    # Assert: on the wire, one layout + one buffer per dtype, and the marker
    assert len(replies) == 3
    for sent in fake.wire:
        assert is_marked(sent.content)
        assert is_packed(sent.content["arrays"])  # type: ignore[arg-type]
        assert len(sent.content["arrays"]) == 4  # type: ignore[arg-type]  # layout + f4, i8, u8
    for reply in fake.replies_wire:  # the node packed its reply (pulled ones were unpacked
        assert reply.has_content()  # in place, so check the content the grid received now)
    # what the strategy sees: ordinary records, exact values
    for reply in replies:
        arrays = reply.content["arrays"]
        assert isinstance(arrays, ArrayRecord) and LAYOUT_KEY not in arrays
        assert list(arrays.keys()) == list(_model().keys())
        shift = np.float32(reply.metadata.src_node_id / 100.0)
        for name, arr in _model().items():
            got = arrays[name].numpy()
            want = arr.numpy() + shift if arr.numpy().dtype.kind == "f" else arr.numpy()
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
    # the caller's messages and their shared content are unchanged
    assert all(m.content is content for m in messages)
    assert not is_packed(content["arrays"]) and TRANSPORT_KEY not in content  # type: ignore[arg-type]


def test_replies_are_packed_by_the_node_on_the_wire() -> None:
    seen: list[bool] = []

    class Spy(NodesGrid):
        def _answer(self, msg: Message) -> Message:
            reply = super()._answer(msg)
            seen.append(is_packed(reply.content["arrays"]))  # type: ignore[arg-type]
            return reply

    fake = Spy(_echo_train)
    list(TransportGrid(fake, sleep=lambda _s: None).send_and_receive(  # type: ignore[arg-type]
        _train_messages(fake, _content()), timeout=10))
    assert seen == [True, True, True]


def test_a_shared_content_is_packed_once() -> None:
    fake = NodesGrid(_echo_train)
    grid = TransportGrid(fake, sleep=lambda _s: None)  # type: ignore[arg-type]
    list(grid.send_and_receive(_train_messages(fake, _content()), timeout=10))
    assert len({id(m.content) for m in fake.wire}) == 1


def test_push_gives_the_callers_messages_their_ids() -> None:
    fake = NodesGrid(_echo_train)
    grid = TransportGrid(fake)  # type: ignore[arg-type]
    messages = _train_messages(fake, _content())
    ids = list(grid.push_messages(messages))
    assert [m.metadata.message_id for m in messages] == ids
    replies = list(grid.pull_messages(ids))
    assert {r.metadata.reply_to_message_id for r in replies} == set(ids)
    assert all(not is_packed(r.content["arrays"]) for r in replies)  # type: ignore[arg-type]


def test_replies_of_nodes_without_the_mod_are_understood() -> None:
    fake = NodesGrid(_echo_train, mods=False)
    grid = TransportGrid(fake, sleep=lambda _s: None)  # type: ignore[arg-type]

    def old_node(msg: Message, context: Context) -> Message:  # sees the packed layout
        return Message(RecordDict({"metrics": MetricRecord({"n": len(msg.content)})}),
                       reply_to=msg)

    fake.handler = old_node
    replies = list(grid.send_and_receive(_train_messages(fake, _content()), timeout=10))
    assert len(replies) == 3 and all(r.content["metrics"]["n"] == 3 for r in replies)  # type: ignore[index]


def test_error_replies_pass_through() -> None:
    def failing(msg: Message, context: Context) -> Message:
        return Message(Error(code=9, reason="refused"), reply_to=msg)

    fake = NodesGrid(failing)
    replies = list(TransportGrid(fake, sleep=lambda _s: None).send_and_receive(  # type: ignore[arg-type]
        _train_messages(fake, _content()), timeout=10))
    assert [r.error.reason for r in replies] == ["refused"] * 3


# --- polling --------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def test_polls_fast_then_backs_off_and_resets_when_a_reply_arrives() -> None:
    # node 0 answers at pull 6, node 1 at pull 8, node 2 at pull 9
    fake = NodesGrid(_echo_train, answer_after=(6, 8, 9))
    clock = FakeClock()
    grid = TransportGrid(fake, sleep=clock.sleep, clock=clock,  # type: ignore[arg-type]
                         schedule=PollSchedule(first=0.02, factor=2.0, longest=0.2))
    replies = list(grid.send_and_receive(_train_messages(fake, _content()), timeout=60))
    assert len(replies) == 3
    assert clock.sleeps == [0.02, 0.04, 0.08, 0.16, 0.2, 0.2,  # pulls 0-5: nothing
                            0.02,  # pull 6: a reply -> reset; pull 7: nothing
                            0.04,
                            0.02]  # pull 8: a reply -> reset; pull 9: the last one, no sleep
    assert fake.pulls == 10


def test_the_timeout_is_honoured_and_no_pull_follows_it() -> None:
    fake = NodesGrid(_echo_train, never=(2,))
    clock = FakeClock()
    grid = TransportGrid(fake, sleep=clock.sleep, clock=clock)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive(_train_messages(fake, _content()), timeout=1.0))
    assert len(replies) == 2
    assert clock.now == pytest.approx(101.0)  # slept exactly up to the deadline, not past it
    assert max(clock.sleeps) <= 0.2
    pulls = fake.pulls
    assert sum(clock.sleeps) == pytest.approx(1.0)
    assert pulls == len(clock.sleeps)  # one pull before each sleep, none after the deadline


def test_a_zero_timeout_pulls_nothing_as_flower_does() -> None:
    fake = NodesGrid(_echo_train)
    clock = FakeClock()
    grid = TransportGrid(fake, sleep=clock.sleep, clock=clock)  # type: ignore[arg-type]
    assert list(grid.send_and_receive(_train_messages(fake, _content()), timeout=0)) == []
    assert fake.pulls == 0 and len(fake.wire) == 3


def test_no_timeout_waits_for_every_reply() -> None:
    fake = NodesGrid(_echo_train, answer_after=(40, 0, 3))
    clock = FakeClock()
    grid = TransportGrid(fake, sleep=clock.sleep, clock=clock)  # type: ignore[arg-type]
    assert len(list(grid.send_and_receive(_train_messages(fake, _content()), timeout=None))) == 3


def test_progress_events_are_those_of_the_progress_grid() -> None:
    ours: list[ProgressEvent] = []
    theirs: list[ProgressEvent] = []
    fake = NodesGrid(_echo_train, answer_after=(0, 2, 2))
    TransportGrid(fake, ours.append, sleep=lambda _s: None).send_and_receive(  # type: ignore[arg-type]
        _train_messages(fake, _content(server_round=4)), timeout=10)
    fake2 = NodesGrid(_echo_train, answer_after=(0, 2, 2))
    ProgressGrid(fake2, theirs.append, poll_interval=0.0).send_and_receive(  # type: ignore[arg-type]
        _train_messages(fake2, _content(server_round=4)), timeout=10)
    assert ours == theirs and ours[0] == ProgressEvent("train", 4, 0, 3)


@pytest.mark.parametrize("bad", [dict(first=0.0), dict(first=0.5, longest=0.2),
                                 dict(factor=0.5)])
def test_poll_schedule_is_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PollSchedule(**bad)


# --- switching off --------------------------------------------------------------------------

class _NoState:
    def state(self) -> None:
        return None


def _flower_grid() -> object:
    """Flower's simulation grid (never used here, only wrapped)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return InMemoryGrid(state_factory=_NoState())  # type: ignore[arg-type]


def test_flowers_grids_are_wrapped_unless_stock(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = _flower_grid()
    monkeypatch.delenv(ENV_TRANSPORT, raising=False)
    wrapped = with_transport(grid, None)  # type: ignore[arg-type]
    assert isinstance(wrapped, TransportGrid)
    assert with_transport(wrapped, None) is wrapped  # never twice
    # a simulation's in-memory grid is polled sooner than a SuperLink across the network
    assert wrapped._schedule == IN_MEMORY_POLLS
    assert IN_MEMORY_POLLS.longest < PollSchedule().longest
    monkeypatch.setenv(ENV_TRANSPORT, "Stock")
    assert with_transport(grid, None) is grid  # type: ignore[arg-type]
    assert type(with_transport(grid, lambda _e: None)) is ProgressGrid  # type: ignore[arg-type]


def test_in_process_stand_ins_keep_the_grid_of_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_TRANSPORT, raising=False)
    fake = NodesGrid(_echo_train)  # hands messages to handlers without the node's mods
    assert with_transport(fake, None) is fake  # type: ignore[arg-type]
    assert type(with_transport(fake, lambda _e: None)) is ProgressGrid  # type: ignore[arg-type]


def test_stock_node_answers_unpacked_but_still_reads_packed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_TRANSPORT, "stock")
    msg = incoming(pack_content(_content(), mark=True), "train", node_id=2)
    reply = transport_mod(msg, node_context({}, node_id=2), _echo_train)
    assert not is_packed(reply.content["arrays"])  # type: ignore[arg-type]


# --- the node's mod -------------------------------------------------------------------------

def test_mod_round_trip_with_a_marked_message() -> None:
    msg = incoming(pack_content(_content(), mark=True), "train", node_id=3)
    reply = transport_mod(msg, node_context({}, node_id=3), _echo_train)
    packed = reply.content["arrays"]
    assert isinstance(packed, ArrayRecord) and is_packed(packed)
    assert reply.content["metrics"]["num-examples"] == 30  # type: ignore[index]


def test_mod_passes_an_old_coordinators_message_through() -> None:
    content = _content()
    msg = incoming(content, "train", node_id=1)
    reply = transport_mod(msg, node_context({}, node_id=1), _echo_train)
    assert msg.content is content  # untouched
    assert not is_packed(reply.content["arrays"])  # type: ignore[arg-type]


def test_mod_unpacks_packed_records_even_without_the_marker() -> None:
    msg = incoming(pack_content(_content(), mark=False), "train", node_id=1)
    reply = transport_mod(msg, node_context({}, node_id=1), _echo_train)
    assert not is_packed(reply.content["arrays"])  # no marker: the sender may not unpack


def test_mod_refuses_a_malformed_packed_record() -> None:
    packed = pack_content(_content(), mark=True)
    arrays = packed["arrays"]
    assert isinstance(arrays, ArrayRecord)
    arrays[LAYOUT_KEY] = Array(np.frombuffer(b'{"version": 7}', dtype=np.uint8))
    with pytest.raises(PackingError):
        transport_mod(incoming(packed, "train"), node_context({}), _echo_train)


# --- the same model either way --------------------------------------------------------------

def _fedavg_run(grid: object) -> dict[str, np.ndarray]:
    random.seed(5)  # Flower samples the nodes with `random`: the same order both times
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3,
                      min_train_nodes=3)
    result = strategy.start(grid=grid, initial_arrays=_model(seed=3),  # type: ignore[arg-type]
                            num_rounds=3, timeout=30)
    return {name: arr.numpy() for name, arr in result.arrays.items()}


def test_fedavg_aggregates_the_same_model_packed_and_stock() -> None:
    # Prepare: the same deterministic nodes, once through the transport, once without it
    packed_fake = NodesGrid(_echo_train)
    stock_fake = NodesGrid(_echo_train, mods=False)
    # Execute
    packed = _fedavg_run(TransportGrid(packed_fake, sleep=lambda _s: None))  # type: ignore[arg-type]
    stock = _fedavg_run(stock_fake)
    # Assert
    assert any(is_packed(m.content["arrays"]) for m in packed_fake.wire)  # type: ignore[arg-type]
    assert not any(is_packed(m.content["arrays"]) for m in stock_fake.wire)  # type: ignore[arg-type]
    assert list(packed) == list(stock)
    for name in stock:
        assert packed[name].dtype == stock[name].dtype
        assert packed[name].tobytes() == stock[name].tobytes(), name
    assert not np.array_equal(stock["conv.bias"], _model(seed=3)["conv.bias"].numpy())


# --- a real simulation, packed and stock ----------------------------------------------------

@pytest.mark.slow
def test_a_simulated_run_aggregates_the_same_model_packed_and_stock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-private plan, fixed seed, two hospitals (a sum of two replies does not depend on
    their order): the checkpoints of every round are equal bit for bit."""
    import torch

    import server.transport as transport
    from client.dicom.synth import synthesize_federation
    from common.config import NodeConfig, RunConfig, TrainPlan
    from server.simulation import run_simulation

    # Prepare
    synthesize_federation(tmp_path / "data", n_sites=2, patients_per_site=24,
                          images_per_patient=(1, 2), image_size=16, seed=9)
    packed_calls: list[int] = []
    real_pack = transport.pack_content

    def counting_pack(*args: object, **kwargs: object) -> RecordDict:
        packed_calls.append(1)
        return real_pack(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transport, "pack_content", counting_pack)

    def run(name: str, mode: str) -> dict[str, torch.Tensor]:
        monkeypatch.setenv(ENV_TRANSPORT, mode)
        plan = TrainPlan(num_rounds=2, batch_size=8, private=False, image_size=16, seed=4,
                         run_id=f"transport-{name}")
        config = RunConfig(plan=plan, out_dir=str(tmp_path / name), min_nodes=2)
        nodes = [NodeConfig(data_dir=tmp_path / "data" / f"site-{i}", site_name=f"site-{i}",
                            allow_non_private=True, device="cpu", min_release_count=1,
                            ledger_dir=tmp_path / name / "ledgers" / f"site-{i}")
                 for i in (1, 2)]
        report = run_simulation(config, nodes, num_cpus=2)
        assert report.status == "completed", report.reason
        return {f"{r}/{key}": value for r in (1, 2) for key, value in torch.load(
            tmp_path / name / "checkpoints" / f"round-{r}.pt").items()}

    # Execute
    ours = run("ours", "")
    calls_ours = len(packed_calls)
    stock = run("stock", "stock")
    # Assert
    assert calls_ours > 0 and len(packed_calls) == calls_ours  # packed only in "ours"
    assert list(ours) == list(stock)
    for key in stock:
        assert torch.equal(ours[key], stock[key]), key


def test_mod_records_compute_spans_only_when_asked(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from client.transport import ENV_TIMINGS

    monkeypatch.delenv(ENV_TIMINGS, raising=False)
    transport_mod(incoming(_content(), "train", node_id=1), node_context({}, node_id=1),
                  _echo_train)
    target = tmp_path / "timings.jsonl"
    assert not target.exists()
    monkeypatch.setenv(ENV_TIMINGS, str(target))
    for node in (1, 2):
        transport_mod(incoming(pack_content(_content(), mark=True), "train", node_id=node),
                      node_context({}, node_id=node), _echo_train)
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["type"] for r in rows] == ["train", "train"]
    assert all(set(r) == {"type", "start", "end"} and r["end"] >= r["start"] for r in rows)


def test_timed_grid_records_each_phase_in_either_mode(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from server.transport import ENV_TIMINGS, TimedGrid

    target = tmp_path / "server.jsonl"
    monkeypatch.setenv(ENV_TIMINGS, str(target))
    for mode in ("", "stock"):
        monkeypatch.setenv(ENV_TRANSPORT, mode)
        grid = with_transport(_flower_grid(), None)  # type: ignore[arg-type]
        assert isinstance(grid, TimedGrid)
        fake = NodesGrid(_echo_train)
        timed = TimedGrid(fake, str(target))  # type: ignore[arg-type]
        assert len(list(timed.send_and_receive(_train_messages(fake, _content(3)), timeout=5))) == 3
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    server = [r for r in rows if r["type"] == "server"]
    assert [(r["phase"], r["round"]) for r in server] == [("train", 3)] * 2
    assert all(r["end"] >= r["start"] for r in rows)
    assert [r["type"] for r in rows if r["type"] != "server"] == ["train"] * 6  # the nodes'
