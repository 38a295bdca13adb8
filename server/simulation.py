"""Run a whole federation on this machine with Flower's simulation runtime.

Each simulated hospital is a virtual SuperNode whose settings come from a prepared
:class:`~common.config.NodeConfig` (its own data folder and epsilon cap), looked up by Flower's
``partition-id``. The ServerApp and ClientApp are the same code that runs in deployment.

Two engines (:func:`simulation_engine`):

* ``inprocess`` (the default): every hospital runs in this process, one message at a time
  (:mod:`server.inprocess_engine`). Hospitals share the driver's imports; nothing else starts.
* ``ray``: Flower's own Ray backend. Ray runs one actor per CPU it may use (``num_cpus``,
  default all) and each actor serves any hospital (its NodeConfig comes with the message), so
  300 hospitals on 2 cores run in 2 actor processes that import torch once each. Start-up and
  shut-down are bounded (:class:`RayStarter`, :class:`~server.process_reaper.Reaper`): Ray is
  started here, once per simulation, before Flower's engine (which then reuses it), and must
  be up within :data:`RAY_START_TIMEOUT_S` seconds (``VESALIUS_RAY_START_TIMEOUT_S``
  overrides it), otherwise a :class:`~common.errors.ConfigError` says so instead of a hang;
  every process it starts (Ray's GCS, raylet, agents and actors) ends with the driver, when
  it returns, fails, is stopped by ``SIGTERM``/``SIGINT``/``SIGHUP`` or killed with
  ``SIGKILL``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

from flwr.serverapp import ServerApp

from common.config import SIMULATION_ENGINES, NodeConfig, RunConfig
from common.errors import ConfigError
from server.app import RoundCallback, build_server_app
from server.inprocess_engine import fast_pickup, in_process_backend
from server.process_reaper import Reaper
from server.progress import ProgressCallback
from server.report import RunReport

log = logging.getLogger(__name__)

#: Seconds Ray may take to start before the run fails with a clear error (a loaded 2-core
#: machine needs 5-15 s); ``VESALIUS_RAY_START_TIMEOUT_S`` overrides it.
RAY_START_TIMEOUT_S: Final = 120.0
#: Round time-out per simulated hospital (seconds; see :func:`with_simulated_timeout`).
SIMULATED_NODE_S: Final = 10.0
#: Signals that end a simulation's driver: its Ray processes are ended before it exits.
_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_simulation(
    config: RunConfig,
    nodes: Sequence[NodeConfig],
    *,
    on_round: RoundCallback | None = None,
    num_cpus: int | None = None,
    verbose: bool = False,
    on_progress: ProgressCallback | None = None,
    engine: str | None = None,
) -> RunReport:
    """Simulate ``len(nodes)`` hospitals and the coordinator; return the run report.

    Parameters
    ----------
    config : RunConfig
        The coordinator's run configuration.
    nodes : sequence of NodeConfig
        One entry per simulated hospital.
    on_round : callable, optional
        Called after each round with its :class:`~server.strategies.fedavg.RoundLog`.
    num_cpus : int, optional
        CPUs Ray may use (default: all); each simulated node takes one.
    verbose : bool
        Show Flower's and Ray's own logs.
    on_progress : callable, optional
        Called whenever a node answers (:class:`~server.progress.ProgressEvent`).
    engine : {"inprocess", "ray"}, optional
        The simulation engine (:func:`simulation_engine`).
    """
    reports: list[RunReport] = []
    config = with_simulated_timeout(config, len(nodes))
    server_app = build_server_app(config, on_round=on_round, on_finish=reports.append,
                                  on_progress=on_progress)
    simulate_apps(server_app, config, nodes, num_cpus=num_cpus, verbose=verbose,
                  engine=engine)
    if not reports:
        raise RuntimeError(
            "the simulated run ended without a report; see the log above "
            f"(a partial report may be in {config.out_dir})"
        )
    return reports[0]


def with_simulated_timeout(config: RunConfig, num_nodes: int) -> RunConfig:
    """``config`` with a round time-out long enough for ``num_nodes`` simulated hospitals.

    Simulated hospitals take turns on a few actor processes, so a round lasts about
    ``num_nodes`` times one node's step: the time-out (meant for a node that never answers)
    is raised to :data:`SIMULATED_NODE_S` seconds per hospital when that is longer.
    """
    needed = SIMULATED_NODE_S * num_nodes
    if config.round_timeout >= needed:
        return config
    log.info("round time-out raised from %g s to %g s for %d simulated hospitals",
             config.round_timeout, needed, num_nodes)
    return dataclasses.replace(config, round_timeout=needed)


def simulate_apps(
    server_app: ServerApp,
    config: RunConfig,
    nodes: Sequence[NodeConfig],
    *,
    num_cpus: int | None = None,
    verbose: bool = False,
    engine: str | None = None,
) -> None:
    """Run ``server_app`` against ``len(nodes)`` simulated hospitals (Flower's runtime).

    Shared by the plain run (:func:`run_simulation`) and the cross-validation
    (:func:`server.cv.simulate_cross_validation`): each simulated node is the real ClientApp
    with the :class:`NodeConfig` of its ``partition-id``. ``engine`` (see
    :func:`simulation_engine`): ``inprocess`` runs them in this process one at a time;
    ``ray`` on Ray's actors, one CPU each (``num_cpus`` applies to it only).
    """
    # Imported here: the simulation runtime pulls in Ray, which deployment does not need.
    from flwr.simulation import run_simulation as flwr_run_simulation

    from client.app import build_client_app, simulated_nodes

    if len(nodes) < config.min_nodes:
        raise ConfigError(
            f"{len(nodes)} simulated node(s) but the run needs min-nodes={config.min_nodes}"
        )
    for var, value in (
        ("FLWR_TELEMETRY_ENABLED", "0"),
        ("FLWR_DISABLE_UPDATE_CHECK", "1"),
        ("RAY_DEDUP_LOGS", "0"),
        ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"),
    ):
        os.environ.setdefault(var, value)
    # Flower logs every step at INFO through its own "flwr" logger; keep it for --verbose.
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    client_app = build_client_app(simulated_nodes(dict(enumerate(nodes))))
    init_args: dict[str, Any] = {"logging_level": "INFO" if verbose else "ERROR",
                                 "log_to_driver": verbose}  # passed to ray.init
    if num_cpus is not None:
        init_args["num_cpus"] = num_cpus
    if simulation_engine(engine) == "inprocess":
        with in_process_backend(quiet=not verbose), _stop_signals_reap(_NothingToReap()):
            flwr_run_simulation(server_app=server_app, client_app=client_app,
                                num_supernodes=len(nodes),
                                backend_config=backend_config(init_args),
                                verbose_logging=verbose)
        return
    starter = RayStarter()
    with Reaper() as reaper:
        try:
            starter.start(init_args)
            # After Ray's start: its driver installs a SIGTERM handler of its own (it aborts).
            with _stop_signals_reap(reaper), fast_pickup():
                flwr_run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=len(nodes),
                    backend_config=backend_config(init_args),
                    verbose_logging=verbose,
                )
        finally:
            _shutdown_ray()
            starter.release()


def simulation_engine(engine: str | None = None) -> str:
    """The engine to simulate with: ``engine``, else ``VESALIUS_SIMULATION_ENGINE``, else
    ``inprocess``; anything else is a ConfigError."""
    chosen = (engine or os.environ.get("VESALIUS_SIMULATION_ENGINE", "").strip()
              or SIMULATION_ENGINES[0])
    if chosen not in SIMULATION_ENGINES:
        raise ConfigError(f"the simulation engine must be one of {', '.join(SIMULATION_ENGINES)}, "
                          f"got {chosen!r}")
    return chosen


class _NothingToReap:
    """The in-process engine starts no process: a stop signal only ends the driver."""

    def reap_now(self) -> None:
        pass


def backend_config(init_args: dict[str, Any]) -> dict[str, Any]:
    """Flower's Ray backend settings: one CPU and no GPU per actor, so Ray starts one actor
    per CPU and every actor serves many hospitals in turn (one torch import each)."""
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


def ray_start_timeout() -> float:
    """:data:`RAY_START_TIMEOUT_S`, or ``VESALIUS_RAY_START_TIMEOUT_S`` when set (seconds)."""
    text = os.environ.get("VESALIUS_RAY_START_TIMEOUT_S", "").strip()
    if not text:
        return RAY_START_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"VESALIUS_RAY_START_TIMEOUT_S must be a number of seconds > 0, "
                          f"got {text!r}")
    return value


class RayStarter:
    """Start Ray in a thread that stays alive until :meth:`release`, within a time limit.

    Ray makes its GCS and raylet die with the *thread* that started them (Linux parent-death
    signal), so the starting thread must outlive the run; a thread is what bounds the wait.
    """

    def __init__(self) -> None:
        self._started = threading.Event()
        self._release = threading.Event()
        self._failure: list[BaseException] = []
        self._saved_pythonpath: str | None = None
        self._set_pythonpath = False

    def start(self, init_args: dict[str, Any], timeout_s: float | None = None) -> None:
        """Start Ray for Flower's engine (which reuses a running Ray) within ``timeout_s``.

        Flower's Ray backend passes the driver's ``sys.path`` to the actors as
        ``PYTHONPATH``; done here the same way. Raises :class:`ConfigError` when Ray fails or
        is not up in time.
        """
        import ray

        if ray.is_initialized():
            return
        limit = ray_start_timeout() if timeout_s is None else timeout_s
        pythonpath = os.pathsep.join(sys.path)
        if os.environ.get("PYTHONPATH"):
            pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
        self._saved_pythonpath = os.environ.get("PYTHONPATH")
        self._set_pythonpath = True
        os.environ["PYTHONPATH"] = pythonpath  # restored by release()
        args = {"include_dashboard": False, **init_args,
                "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}}
        thread = threading.Thread(target=self._run, args=(args,), name="ray-start",
                                  daemon=True)
        thread.start()
        if not self._started.wait(limit):
            raise ConfigError(
                f"the simulation engine (Ray) did not start within {limit:g} s; the machine "
                "may be overloaded or /tmp full: retry, or allow more time with "
                "VESALIUS_RAY_START_TIMEOUT_S=SECONDS"
            )
        if self._failure:
            raise ConfigError(f"the simulation engine (Ray) could not start: "
                              f"{self._failure[0]}") from self._failure[0]

    def _run(self, args: dict[str, Any]) -> None:
        import ray

        try:
            ray.init(**args)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's thread
            self._failure.append(exc)
        finally:
            self._started.set()
        self._release.wait()

    def release(self) -> None:
        """Let the starting thread end (after Ray has shut down); restore ``PYTHONPATH``."""
        self._release.set()
        if self._set_pythonpath:
            self._set_pythonpath = False
            if self._saved_pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = self._saved_pythonpath


def _shutdown_ray() -> None:
    import ray

    try:
        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - the reaper ends what is left
        log.warning("Ray did not shut down cleanly; its processes are ended", exc_info=True)


@contextmanager
def _stop_signals_reap(reaper: Reaper | _NothingToReap) -> Iterator[None]:
    """While the simulation runs, a stop signal ends its processes, then the driver.

    Flower's engine cannot be interrupted cleanly (its worker threads wait for a stop event
    only its own ``finally`` sets), so the driver ends Ray's processes and exits with
    128 + the signal's number. Installed only in the main thread; restored afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        print(f"simulation stopped by signal {signum}: ending its processes", file=sys.stderr,
              flush=True)
        reaper.reap_now()
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
