"""Run a whole federation on this machine with Flower's simulation runtime (Ray).

Each simulated hospital is a virtual SuperNode whose settings come from a prepared
:class:`~common.config.NodeConfig` (its own data folder and epsilon cap), looked up by Flower's
``partition-id``. The ServerApp and ClientApp are the same code that runs in deployment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from flwr.serverapp import ServerApp

from common.config import NodeConfig, RunConfig
from common.errors import ConfigError
from server.app import RoundCallback, build_server_app
from server.progress import ProgressCallback
from server.report import RunReport

log = logging.getLogger(__name__)


def run_simulation(
    config: RunConfig,
    nodes: Sequence[NodeConfig],
    *,
    on_round: RoundCallback | None = None,
    num_cpus: int | None = None,
    verbose: bool = False,
    on_progress: ProgressCallback | None = None,
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
    """
    reports: list[RunReport] = []
    server_app = build_server_app(config, on_round=on_round, on_finish=reports.append,
                                  on_progress=on_progress)
    simulate_apps(server_app, config, nodes, num_cpus=num_cpus, verbose=verbose)
    if not reports:
        raise RuntimeError(
            "the simulated run ended without a report; see the log above "
            f"(a partial report may be in {config.out_dir})"
        )
    return reports[0]


def simulate_apps(
    server_app: ServerApp,
    config: RunConfig,
    nodes: Sequence[NodeConfig],
    *,
    num_cpus: int | None = None,
    verbose: bool = False,
) -> None:
    """Run ``server_app`` against ``len(nodes)`` simulated hospitals (Flower's Ray runtime).

    Shared by the plain run (:func:`run_simulation`) and the cross-validation
    (:func:`server.cv.simulate_cross_validation`): each simulated node is the real ClientApp
    with the :class:`NodeConfig` of its ``partition-id``, one CPU each.
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
    flwr_run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=len(nodes),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": init_args},
        verbose_logging=verbose,
    )
