"""The in-process simulation engine: its seam on Flower, its semantics, and a run on each engine.

The seam: Flower 1.42's ``start_vce`` builds its backend by importing ``RayBackend`` from
``flwr.server.superlink.fleet.vce.backend.raybackend`` when the engine starts; the in-process
engine replaces that name for the length of a run. The semantics: the ClientApp gets its own
copies (as Ray's serialisation gives it), an exception becomes Flower's ``ClientAppException``
(so an error reply for that hospital), and the updated context comes back.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException

from common.config import NodeConfig, RunConfig, TrainPlan
from common.errors import ConfigError
from server.inprocess_engine import (
    InProcessBackend,
    add_messages_to_queue,
    fast_pickup,
    in_process_backend,
    pickup_interval,
    undelivered_messages,
)
from server.simulation import simulation_engine
from tests.flower_helpers import incoming, node_context


def test_flower_builds_its_backend_from_the_name_the_engine_replaces() -> None:
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    source = inspect.getsource(vce_api.start_vce)
    assert "from .backend.raybackend import RayBackend" in source
    assert "RayBackend(backend_config)" in source
    # the message pick-up loop is looked up by name when the engine starts its thread
    assert "target=add_messages_to_queue" in inspect.getsource(vce_api.run_api)
    assert list(inspect.signature(vce_api.add_messages_to_queue).parameters) == list(
        inspect.signature(add_messages_to_queue).parameters)
    original = raybackend.RayBackend, vce_api.add_messages_to_queue
    with in_process_backend():
        assert raybackend.RayBackend is InProcessBackend
        assert vce_api.add_messages_to_queue is add_messages_to_queue
    assert (raybackend.RayBackend, vce_api.add_messages_to_queue) == original
    with fast_pickup():  # Ray's engine keeps its backend, gets the pick-up loop
        assert raybackend.RayBackend is original[0]
        assert vce_api.add_messages_to_queue is add_messages_to_queue
    assert vce_api.add_messages_to_queue is original[1]


def test_one_pass_pickup_does_what_flowers_in_memory_link_state_does_per_node() -> None:
    """The fields and steps :func:`undelivered_messages` repeats from ``get_message_ins``."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    source = inspect.getsource(InMemoryLinkState.get_message_ins)
    for step in ("self.message_ins_store", "with self.lock:", "self._check_stored_messages(",
                 'msg_ins.metadata.delivered_at == ""', "delivered_at = now().isoformat()",
                 "msg_ins.metadata.delivered_at = delivered_at"):
        assert step in source, step


def test_one_pass_pickup_marks_and_returns_each_undelivered_message_once() -> None:
    import threading
    from types import SimpleNamespace

    def msg(dst: int, delivered: str = "") -> SimpleNamespace:
        return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst, delivered_at=delivered))

    class Store:
        def __init__(self) -> None:
            self.lock = threading.RLock()
            self.message_ins_store = {"m1": msg(1), "m2": msg(2, "earlier"), "m3": msg(3),
                                      "m4": msg(1), "expired": msg(1)}
            self.checked: list[set[str]] = []

        def _check_stored_messages(self, ids: set[str]) -> None:
            self.checked.append(ids)
            self.message_ins_store.pop("expired")

    state = Store()
    picked = undelivered_messages(state, {1, 2})
    assert picked == [state.message_ins_store["m1"], state.message_ins_store["m4"]]
    assert all(m.metadata.delivered_at not in ("", "earlier") for m in picked)
    assert state.checked == [{"m1", "m2", "m3", "m4", "expired"}]
    assert state.message_ins_store["m3"].metadata.delivered_at == ""  # not one of ours
    state.message_ins_store["expired"] = msg(9)
    assert undelivered_messages(state, {1, 2}) == []  # delivered once
    assert undelivered_messages(object(), {1}) is None  # another kind of link state


def test_messages_are_picked_up_sooner_for_few_hospitals_never_more_often_for_many() -> None:
    assert pickup_interval(3) == 0.01
    assert pickup_interval(30) == pytest.approx(0.03)
    assert pickup_interval(100) == pickup_interval(1000) == 0.1  # Flower's own interval


def test_the_pickup_loop_hands_each_hospital_its_next_message_until_stopped() -> None:
    import threading
    from queue import Queue

    class State:
        def __init__(self) -> None:
            self.pending = {1: ["a1", "a2"], 2: ["b1"]}

        def get_message_ins(self, node_id: int, limit: int) -> list[str]:
            assert limit == 1
            return [self.pending[node_id].pop(0)] if self.pending[node_id] else []

    queue: Queue[str] = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=add_messages_to_queue,
                              args=(State(), queue, {1: 0, 2: 1}, stop))
    thread.start()
    got = [queue.get(timeout=5) for _ in range(3)]
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive() and sorted(got) == ["a1", "a2", "b1"]
    assert got.index("a1") < got.index("a2")


def test_the_backend_is_restored_when_the_run_fails() -> None:
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    with pytest.raises(RuntimeError), in_process_backend():
        raise RuntimeError("the run failed")
    assert raybackend.RayBackend is original


def _app() -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        if msg.content["config"].get("fail", False):
            raise ValueError("a hospital's handler failed")
        msg.content["config"]["touched"] = True  # must not reach the link state's copy
        context.state["config"] = ConfigRecord({"seen": int(msg.metadata.dst_node_id)})
        return Message(RecordDict({"config": ConfigRecord({"ok": True})}), reply_to=msg)

    return app


def _backend() -> InProcessBackend:
    backend = InProcessBackend({})
    backend.build(_app)
    return backend


def test_the_client_app_gets_its_own_copies_and_the_context_comes_back() -> None:
    message = incoming(RecordDict({"config": ConfigRecord({"fail": False})}), MessageType.QUERY,
                       node_id=9)
    context = node_context({}, node_id=9)
    reply, updated = _backend().process_message(message, context)
    assert reply.content["config"]["ok"] is True
    assert "touched" not in message.content["config"]  # the original is unchanged
    assert updated.state["config"]["seen"] == 9
    assert _backend().num_workers == 1 and _backend().is_worker_idle()


def test_an_exception_in_the_client_app_is_flowers_client_app_exception() -> None:
    message = incoming(RecordDict({"config": ConfigRecord({"fail": True})}), MessageType.QUERY)
    with pytest.raises(ClientAppException, match="a hospital's handler failed"):
        _backend().process_message(message, node_context({}))


@pytest.mark.parametrize("quiet", [True, False])
def test_a_hospitals_log_stays_off_the_screen_unless_verbose(quiet: bool) -> None:
    import logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        logging.getLogger("client.app").warning("a hospital's own line")
        return Message(RecordDict({"config": ConfigRecord({"ok": True})}), reply_to=msg)

    handler = Keep()
    logging.getLogger().addHandler(handler)
    try:
        backend = InProcessBackend({})
        backend.build(lambda: app)
        with in_process_backend(quiet=quiet):
            backend.process_message(
                incoming(RecordDict({"config": ConfigRecord({})}), MessageType.QUERY),
                node_context({}))
            logging.getLogger("server.app").warning("the coordinator's line")
        logging.getLogger("client.app").warning("after the run")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [r.getMessage() for r in records]
    assert "the coordinator's line" in lines and "after the run" in lines
    assert ("a hospital's own line" in lines) is not quiet
    assert not handler.filters  # removed with the run


def test_an_unbuilt_backend_says_so() -> None:
    message = incoming(RecordDict({"config": ConfigRecord({})}), MessageType.QUERY)
    with pytest.raises(ValueError, match="not built"):
        InProcessBackend({}).process_message(message, node_context({}))


def test_the_engine_is_chosen_by_argument_then_environment(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.delenv("VESALIUS_SIMULATION_ENGINE", raising=False)
    assert simulation_engine() == "inprocess"
    monkeypatch.setenv("VESALIUS_SIMULATION_ENGINE", "ray")
    assert simulation_engine() == "ray"
    assert simulation_engine("inprocess") == "inprocess"
    monkeypatch.setenv("VESALIUS_SIMULATION_ENGINE", "spark")
    with pytest.raises(ConfigError, match="inprocess, ray"):
        simulation_engine()


@pytest.mark.slow
def test_both_engines_run_the_same_federation_to_the_same_privacy_spend(
    tmp_path: Path, _private_vesalius_home: Path,
) -> None:
    """The same 3 hospitals x 2 rounds on each engine: both complete, every hospital answers
    every round on both, and each hospital's epsilon per round is the same (accounting is
    deterministic; the noise draws are not)."""
    from client.dicom.synth import synthesize_federation
    from server.simulation import run_simulation

    synthesize_federation(tmp_path / "data", n_sites=3, patients_per_site=40, seed=5)
    docs = {}
    for engine in ("inprocess", "ray"):
        out = tmp_path / engine
        config = RunConfig(plan=TrainPlan(num_rounds=2, batch_size=8, target_epsilon=8.0),
                           out_dir=str(out), min_nodes=3, secure_aggregation="off")
        nodes = [NodeConfig(data_dir=tmp_path / "data" / f"site-{i}", epsilon_cap=8.0,
                            site_name=f"site-{i}", release_histograms=True, min_release_count=1,
                            ledger_dir=tmp_path / "ledgers" / engine / f"site-{i}")
                 for i in (1, 2, 3)]
        run_simulation(config, nodes, engine=engine)
        docs[engine] = json.loads((out / "report.json").read_text())
    for doc in docs.values():
        assert doc["status"] == "completed"
        assert [sorted(t["site"] for t in r["train"]) for r in doc["rounds"]] == [
            ["site-1", "site-2", "site-3"]] * 2
        assert not [e for r in doc["rounds"] for e in r.get("errors") or []]
    spend = {engine: [{t["site"]: t["epsilon"] for t in r["train"]} for r in doc["rounds"]]
             for engine, doc in docs.items()}
    assert spend["inprocess"] == spend["ray"]
