"""The warm worker process: import once, warm up single-threaded, serve every task.

Run as ``python -m client.warm_worker --runtime-api-address HOST:PORT ...`` beside a
``flower-supernode --isolation process`` (``vesalius node start`` does both). It prints
``warm worker PID ready ...`` once, then two lines per task (served, done in N s).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

from client.warm_worker import flower_seams

log = logging.getLogger(__name__)

#: Default seconds between two task polls of the SuperNode's Runtime API (Flower's is 1 s).
DEFAULT_TASK_POLL_S = 0.1


def warm_up() -> int:
    """Import torch and the ClientApp and run one tiny DP-SGD step with one torch thread.

    The step pays, once, the lazy imports and first-call costs of the training path (torch's
    optimizer machinery, Opacus's per-sample gradients), which otherwise land on the first
    message. One thread: no OpenMP pool exists yet if the worker forks per task.

    Returns
    -------
    int
        The intra-op thread count torch would have used.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    import client.app  # noqa: F401 - the point: imported once, serves every task
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from common.models import build_model

    model = build_model("cnn", in_channels=1, num_classes=2, image_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(torch.zeros(4, 1, 32, 32), torch.zeros(4, dtype=torch.long)),
                        batch_size=2)
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0)
    for images, targets in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()
        break
    return threads


def _poll_interval(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or not 0.01 <= value <= 60:
        raise argparse.ArgumentTypeError("must be between 0.01 and 60 seconds")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the worker process."""
    parser = argparse.ArgumentParser(prog="python -m client.warm_worker",
                                     description="Vesalius warm worker for a Flower SuperNode.")
    parser.add_argument("--runtime-api-address", required=True,
                        help="The SuperNode's Runtime API, HOST:PORT.")
    parser.add_argument("--insecure", action="store_true",
                        help="Plain-text Runtime API (the SuperNode serves it on loopback).")
    parser.add_argument("--root-certificates", default=None,
                        help="CA certificate of a TLS Runtime API.")
    parser.add_argument("--superexec-auth-secret-file", default=None,
                        help="Shared secret file also given to the SuperNode.")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="Stop when this process ends (the node's supervisor).")
    parser.add_argument("--fork-per-task", action="store_true",
                        help="Serve each task in a fork of the worker (crash-isolated, nothing "
                        "cached between messages) instead of in the worker itself.")
    parser.add_argument("--task-poll-interval", type=_poll_interval, default=DEFAULT_TASK_POLL_S,
                        help="Seconds between task polls (0.01-60).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Warm up, then run Flower's SuperExec loop with the fork executor until stopped."""
    # Our lines at INFO; third-party libraries (httpx logs every request at INFO) at WARNING.
    # Flower's own logger has its handler and level already.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)-8s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("client.warm_worker").setLevel(logging.INFO)
    logging.getLogger("flwr").propagate = False  # Flower's logger has its own console handler
    from common.logsafe import install_log_sanitiser

    install_log_sanitiser()  # the supervisor redacts too; nothing identifying reaches a log
    args = parse_args(argv)
    if args.parent_pid is not None:  # ends with `node start`, even one killed with SIGKILL
        from client.warm_worker.orphan_guard import exit_with_parent

        exit_with_parent(parent=args.parent_pid)
    try:
        flower_seams.require_pinned_flower()
    except flower_seams.FlowerVersionError as exc:
        sys.exit(str(exc))
    # Flower's own setting for its SuperExec loop (read once when the loop starts)
    os.environ[flower_seams.TASK_POLL_INTERVAL_ENV] = repr(args.task_poll_interval)
    secret = None
    if args.superexec_auth_secret_file is not None:
        secret = Path(args.superexec_auth_secret_file).read_bytes()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's note on its RNG, about the warm-up step only
        threads = warm_up()
    from client.warm_worker.executor import WarmExecutor

    if not args.fork_per_task:
        import torch

        torch.set_num_threads(threads)
    flower_seams.install_each_fab_once()  # not once per message (forks inherit the cache)
    flower_seams.poll_local_objects_quickly()  # a task's message: no 1 s back-off on loopback
    executor = WarmExecutor(fork_per_task=args.fork_per_task, torch_threads=threads)
    log.info("warm worker %d ready: torch and the ClientApp imported once in %.1f s",
             os.getpid(), time.perf_counter() - started)
    with flower_seams.inject_executor(executor):
        flower_seams.run_superexec(
            runtime_api_address=args.runtime_api_address,
            insecure=args.insecure,
            root_certificates_path=args.root_certificates,
            superexec_auth_secret=secret,
            parent_pid=args.parent_pid,
            runtime_dependency_install=False,
        )
