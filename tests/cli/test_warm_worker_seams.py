"""The Flower 1.42 internals the warm worker relies on, pinned (:mod:`client.warm_worker.flower_seams`).

Each test fails loudly when Flower changes what the warm worker needs: the release, the
signatures of the two entry-point functions it calls, the module-level names it replaces,
the executor protocol it implements and the hard-coded sleeps it caps.
"""

from __future__ import annotations

import importlib
import inspect
import time
from dataclasses import fields

import flwr
import pytest

from client.warm_worker import flower_seams
from client.warm_worker.flower_seams import CappedTime


def test_flower_is_the_pinned_release() -> None:
    # Assert: a new Flower needs these seams re-read before the warm worker may run on it
    assert flwr.__version__ == flower_seams.PINNED_FLWR == "1.42.0"
    flower_seams.require_pinned_flower()


def test_refuses_another_flower_release(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    # Execute / Assert
    with pytest.raises(flower_seams.FlowerVersionError, match="--worker per-message"):
        flower_seams.require_pinned_flower()


def test_run_superexec_signature_and_executor_lookup() -> None:
    # Prepare
    from flwr.supercore.superexec import run_superexec as module

    # Assert: the keyword arguments the worker passes, and the module-level name it replaces
    params = inspect.signature(module.run_superexec).parameters
    for name in ("runtime_api_address", "insecure", "root_certificates_path",
                 "superexec_auth_secret", "parent_pid", "runtime_dependency_install"):
        assert name in params, name
    assert "get_executor(" in inspect.getsource(module.run_superexec)
    assert module._TASK_POLL_INTERVAL_ENV == flower_seams.TASK_POLL_INTERVAL_ENV


def test_inject_executor_replaces_and_restores_the_lookup() -> None:
    # Prepare
    from flwr.supercore.superexec import run_superexec as module

    original = module.get_executor
    mine = object()
    # Execute
    with flower_seams.inject_executor(mine):
        got = module.get_executor("subprocess", executor_config=None)
    # Assert
    assert got is mine
    assert module.get_executor is original


def test_run_clientapp_signature_and_entry_point() -> None:
    # Prepare
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    entry = importlib.import_module("flwr.supernode.cli.flwr_clientapp")

    # Assert: the same function the `flwr-clientapp` executable calls, with these keywords
    assert entry.run_clientapp is run_clientapp
    assert list(inspect.signature(run_clientapp).parameters) == [
        "runtime_api_address", "token", "insecure", "certificates", "parent_pid",
        "runtime_dependency_install"]
    module = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    assert "flwr_exit(" in inspect.getsource(run_clientapp)  # ends through this module's name
    assert module.flwr_exit.__module__ == "flwr.supercore.exit.exit"
    assert "register_signal_handlers(" in inspect.getsource(run_clientapp)
    assert "exit_handlers" in inspect.signature(module.register_signal_handlers).parameters


def test_executor_protocol_and_execution_spec() -> None:
    # Prepare
    from flwr.supercore.superexec.executor import ExecutionSpec, Executor

    from client.warm_worker.executor import WarmExecutor

    # Assert: WarmExecutor has every method of Flower's protocol; the spec fields it reads exist
    protocol = {n for n, _ in inspect.getmembers(Executor, inspect.isfunction) if not n.startswith("_")}
    assert protocol == {"get_eligible_capacity", "wait_for_capacity", "launch", "reconcile", "close"}
    assert all(callable(getattr(WarmExecutor, name)) for name in protocol)
    names = {f.name for f in fields(ExecutionSpec)}
    assert {"task_type", "runtime_api_address", "token", "insecure", "root_certificates_path",
            "parent_pid", "task_id"} <= names


def test_forget_inherited_exit_handlers_empties_flowers_registry() -> None:
    # Prepare
    from flwr.supercore.exit import exit_handler

    saved = list(exit_handler.registered_exit_handlers)
    exit_handler.add_exit_handler(lambda: None)
    try:
        # Execute
        flower_seams.forget_inherited_exit_handlers()
        # Assert
        assert exit_handler.registered_exit_handlers == []
    finally:
        exit_handler.registered_exit_handlers[:] = saved


def test_supernode_loop_sleeps_through_its_module_time() -> None:
    # Prepare
    from flwr.supernode import start_client_internal as module

    source = inspect.getsource(module)
    # Assert: the two hard-coded waits the cap is for, reached through `module.time`
    assert "time.sleep(3)" in inspect.getsource(module.start_client_internal)
    assert "time.sleep(0.5)" in inspect.getsource(module._push_messages)
    assert "\nimport time\n" in source and "from time import" not in source


def test_capped_time_caps_sleep_and_delegates_the_rest() -> None:
    # Prepare
    slept: list[float] = []
    capped = CappedTime(0.2)
    capped.sleep_fn = slept.append
    # Execute
    capped.sleep(3)
    capped.sleep(0.05)
    # Assert
    assert slept == [0.2, 0.05]
    assert capped.monotonic is time.monotonic and capped.time is time.time
    with pytest.raises(ValueError, match="positive"):
        CappedTime(0)


def test_cap_supernode_sleeps_patches_that_module_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    from flwr.supernode import start_client_internal as module

    monkeypatch.setattr(module, "time", module.time)  # restored after the test
    # Execute
    capped = flower_seams.cap_supernode_sleeps(0.1)
    # Assert
    assert module.time is capped and capped.cap_s == 0.1
    assert time.sleep is not capped.sleep  # the rest of the process keeps the real clock


def test_task_scope_turns_flowers_exit_into_task_finished_and_restores_the_worker() -> None:
    # Prepare: the worker's own exit handler and SIGTERM handler
    import signal

    from flwr.supercore.exit import exit_handler
    from flwr.supernode.runtime import run_clientapp as module

    ran: list[str] = []
    saved = list(exit_handler.registered_exit_handlers)
    exit_handler.registered_exit_handlers.clear()
    exit_handler.add_exit_handler(lambda: ran.append("worker"))
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        # Execute: a task registers its handler and a signal handler, then exits as Flower does
        with pytest.raises(flower_seams.TaskFinished) as finished:
            with flower_seams.task_scope():
                exit_handler.add_exit_handler(lambda: ran.append("task"))
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                module.flwr_exit(0, event_type=None)
        # Assert: only the task's handler ran; the worker's handlers are back
        assert finished.value.code == 0 and ran == ["task"]
        assert [h.exit_handler() for h in exit_handler.registered_exit_handlers] == [None]
        assert ran == ["task", "worker"]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert module.flwr_exit.__module__ == "flwr.supercore.exit.exit"
    finally:
        signal.signal(signal.SIGTERM, previous)
        exit_handler.registered_exit_handlers[:] = saved


def test_sigint_during_a_task_aborts_the_task_not_the_worker() -> None:
    # Prepare
    import signal

    from flwr.supercore.exit import ExitCode, exit_handler
    from flwr.supernode.runtime import run_clientapp as module

    ran: list[str] = []
    saved = list(exit_handler.registered_exit_handlers)
    exit_handler.registered_exit_handlers.clear()
    previous = signal.getsignal(signal.SIGINT)
    try:
        # Execute: the task registers its handlers the way run_clientapp does, then Flower
        # raises SIGINT in its own process (a refused heartbeat)
        with pytest.raises(flower_seams.TaskFinished) as aborted:
            with flower_seams.task_scope():
                module.register_signal_handlers(event_type=None,
                                                exit_handlers=[lambda: ran.append("on_exit")])
                signal.raise_signal(signal.SIGINT)
        # Assert: the task ended and reported (its exit handler ran); this process goes on
        assert aborted.value.code == int(ExitCode.GRACEFUL_EXIT_SIGINT)
        assert ran == ["on_exit"]
        assert signal.getsignal(signal.SIGINT) == previous
        assert module.register_signal_handlers.__module__ == "flwr.supercore.exit.signal_handler"
    finally:
        signal.signal(signal.SIGINT, previous)
        exit_handler.registered_exit_handlers[:] = saved


def test_supernode_launcher_caps_then_runs_flowers_entry_point(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: Flower's entry point replaced by a recorder; the patched module restored after
    import sys

    import flwr.supernode.cli as supernode_cli
    from flwr.supernode import start_client_internal as module

    from client.warm_worker import supernode

    monkeypatch.setattr(module, "time", module.time)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    seen: list[tuple[list[str], object]] = []
    monkeypatch.setattr(supernode_cli, "flower_supernode",
                        lambda: seen.append((list(sys.argv), module.time)))
    monkeypatch.setenv(supernode.SLEEP_CAP_ENV, "0.05")
    # Execute
    supernode.main(["--superlink", "127.0.0.1:9092", "--isolation", "process"])
    # Assert: Flower's own program name and arguments, with the capped clock in place
    argv, clock = seen[0]
    assert argv == ["flower-supernode", "--superlink", "127.0.0.1:9092", "--isolation", "process"]
    assert isinstance(clock, CappedTime) and clock.cap_s == 0.05


@pytest.mark.parametrize(("raw", "expected"), [("", 0.2), ("0.5", 0.5)])
def test_sleep_cap_from_env(raw: str, expected: float) -> None:
    # Execute / Assert
    from client.warm_worker.supernode import SLEEP_CAP_ENV, sleep_cap_from_env

    assert sleep_cap_from_env({SLEEP_CAP_ENV: raw}) == expected


@pytest.mark.parametrize("raw", ["0", "4", "nan", "-1"])
def test_sleep_cap_out_of_range_is_refused(raw: str) -> None:
    # Execute / Assert
    from client.warm_worker.supernode import SLEEP_CAP_ENV, sleep_cap_from_env

    with pytest.raises(ValueError, match="between 0.01 and 3"):
        sleep_cap_from_env({SLEEP_CAP_ENV: raw})


def test_run_clientapp_installs_the_fab_through_its_module_level_name() -> None:
    # Assert: the name the FAB cache replaces is the one the task runner calls
    from flwr.supernode.runtime import run_clientapp as module

    assert "install_from_fab(fab.content, skip_prompt=True)" in inspect.getsource(
        module.run_clientapp)


def test_fab_install_cache_installs_the_same_bytes_once(tmp_path) -> None:
    # Prepare: a stand-in for Flower's installer that makes a folder per call
    calls: list[bytes] = []

    def install(content: bytes, skip_prompt: bool = False):
        calls.append(content)
        folder = tmp_path / f"install-{len(calls)}"
        folder.mkdir()
        return folder

    cache = flower_seams.FabInstallCache(install)
    # Execute / Assert: same bytes -> one install; other bytes -> another install
    first = cache(b"fab-1", skip_prompt=True)
    assert cache(b"fab-1", skip_prompt=True) == first and cache.hits == 1
    assert cache(b"fab-2", skip_prompt=True) != first
    assert calls == [b"fab-1", b"fab-2"]
    # ... a folder removed behind its back is installed again
    first.rmdir()
    assert cache(b"fab-1", skip_prompt=True) != first and len(calls) == 3


def test_install_each_fab_once_patches_the_task_runner_once(monkeypatch) -> None:
    from flwr.supernode.runtime import run_clientapp as module

    monkeypatch.setattr(module, "install_from_fab", module.install_from_fab)
    cache = flower_seams.install_each_fab_once()
    assert module.install_from_fab is cache
    assert flower_seams.install_each_fab_once() is cache  # idempotent


def _node_state_with_abandoned_message(task_status: str, monkeypatch):
    """A SuperNode state holding one pulled query whose task is in ``task_status``."""
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.common.constant import Status, SubStatus
    from flwr.supercore.constant import TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode import start_client_internal as module
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    store = ObjectStoreFactory().store()
    state = InMemoryNodeState(store)
    state.set_node_id(7)
    task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=11, fab_hash="f")
    if task_status != Status.PENDING:
        assert state.claim_task(task_id) is not None
        assert state.activate_task(task_id)
    if task_status == Status.FINISHED:
        assert state.finish_task(task_id, SubStatus.FAILED, "worker restarted")
    for name, value in (("_run_id", 11), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)
    request = Message(RecordDict(), dst_node_id=7, message_type="query")
    module._insert_message(request, state, store)
    return state, store, request


def test_abandoned_message_is_answered_with_flowers_crash_error(monkeypatch) -> None:
    # Prepare: the task of the pulled message ended without a reply (a restarted worker)
    from flwr.common.constant import ErrorCode, Status
    from flwr.supernode import start_client_internal as module

    monkeypatch.setattr(module, "_push_messages", module._push_messages)
    monkeypatch.setattr(module, "time", CappedTime(0.01))
    state, store, request = _node_state_with_abandoned_message(Status.FINISHED, monkeypatch)
    sent = []

    def send(message, tree, runtime):
        sent.append(message)
        return set(), "session"

    push = flower_seams.answer_abandoned_messages(grace_s=0.05)
    # Execute: the main loop's push step returns instead of waiting for ever
    push(state, store, send, lambda *args: None)
    # Assert: Flower's own crash error went out as the reply of that message, and was cleared
    assert len(sent) == 1 and sent[0].has_error()
    assert sent[0].error.code == ErrorCode.CLIENT_APP_CRASHED
    assert sent[0].metadata.reply_to_message_id == request.metadata.message_id
    assert flower_seams._unreplied_requests(state) == []
    assert flower_seams.answer_abandoned_messages() is push  # installed once


def test_a_live_task_is_waited_for(monkeypatch) -> None:
    # Prepare: the task is still running: nothing may be answered in its place
    from flwr.common.constant import Status

    state, store, _ = _node_state_with_abandoned_message(Status.RUNNING, monkeypatch)
    # Execute / Assert
    assert flower_seams._task_alive(state)
    assert not flower_seams._reply_waiting(state)
    assert len(flower_seams._unreplied_requests(state)) == 1


@pytest.mark.parametrize("module_name, caller", [
    ("flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree"),
    ("flwr.supernode.start_client_internal", "_pull_and_store_message"),
    ("flwr.superlink.grid.http_grid", "HttpGrid.pull_messages"),
])
def test_each_hop_pulls_objects_through_its_module_level_name(module_name: str, caller: str) -> None:
    # Assert: the three hops of a message call the name common.flower_pulls replaces
    module = importlib.import_module(module_name)
    target = module
    for part in caller.split("."):
        target = getattr(target, part)
    assert "pull_objects(" in inspect.getsource(target)
    assert callable(module.pull_objects)


def test_task_object_pulls_retry_quickly_through_the_module_level_name(monkeypatch) -> None:
    # Prepare: the name the wrapper replaces is the one pull_and_inflate_object_from_tree calls
    from flwr.supercore.inflatable import inflatable_utils as module
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    assert "pulled_object_contents = pull_objects(" in inspect.getsource(
        module.pull_and_inflate_object_from_tree)
    monkeypatch.setattr(module, "pull_objects", module.pull_objects)
    wrapper = flower_seams.poll_local_objects_quickly(initial_s=0.01, cap_s=0.02)
    assert module.pull_objects is wrapper and flower_seams.poll_local_objects_quickly() is wrapper
    # Execute: an object that becomes available on the 4th try (Flower's own back-off: 7 s)
    tries = []

    def pull(object_id: str) -> bytes:
        tries.append(object_id)
        if len(tries) < 4:
            raise ObjectUnavailableError(object_id)
        return b"content"

    started = time.monotonic()
    got = module.pull_objects(["a"], pull, initial_backoff=1, backoff_cap=10,
                              max_tries_per_object=500)
    # Assert
    assert got == {"a": b"content"} and len(tries) == 4
    assert time.monotonic() - started < 1.0
