"""``python -m client.warm_worker.supernode ARGS``: ``flower-supernode`` with capped idle sleeps.

Flower 1.42's SuperNode sleeps 3 s after every empty pull from the SuperLink and 0.5 s between
checks for a task's reply; a message then waits up to 3 s before the node even sees it. This
launcher runs Flower's own ``flower-supernode`` entry point in this process after capping those
two sleeps (:func:`client.warm_worker.flower_seams.cap_supernode_sleeps`). Arguments are
``flower-supernode``'s; the cap comes from ``VESALIUS_SUPERNODE_SLEEP_CAP_S`` (seconds; 3 s
keeps Flower's stock polling, as ``node start --worker per-message`` does). With
``VESALIUS_NODE_PARENT_PID`` set, the SuperNode stops when that process dies.

The cost: an idle node asks the SuperLink for work every cap seconds instead of every 3 s.
"""

from __future__ import annotations

import math
import os
import sys

from client.warm_worker import flower_seams

SLEEP_CAP_ENV = "VESALIUS_SUPERNODE_SLEEP_CAP_S"
DEFAULT_SLEEP_CAP_S = 0.2
STOCK_SLEEP_CAP_S = 3.0
"""Flower's own longest idle sleep: with this cap the SuperNode polls exactly as shipped."""
PARENT_PID_ENV = "VESALIUS_NODE_PARENT_PID"
"""The ``vesalius node start`` process this SuperNode stops with (:mod:`.orphan_guard`)."""


def sleep_cap_from_env(environ: dict[str, str] | None = None) -> float:
    """The cap in seconds from :data:`SLEEP_CAP_ENV` (default :data:`DEFAULT_SLEEP_CAP_S`)."""
    raw = (os.environ if environ is None else environ).get(SLEEP_CAP_ENV, "")
    if not raw:
        return DEFAULT_SLEEP_CAP_S
    value = float(raw)
    if not math.isfinite(value) or not 0.01 <= value <= 3:
        raise ValueError(f"{SLEEP_CAP_ENV} must be between 0.01 and 3 seconds")
    return value


def main(argv: list[str] | None = None) -> None:
    """Cap the SuperNode's sleeps, then run ``flower-supernode`` with ``argv``."""
    flower_seams.require_pinned_flower()
    if os.environ.get(PARENT_PID_ENV):  # ends with `node start`, even one killed with SIGKILL
        from client.warm_worker.orphan_guard import exit_with_parent

        exit_with_parent(parent=int(os.environ[PARENT_PID_ENV]))
    flower_seams.cap_supernode_sleeps(sleep_cap_from_env())
    flower_seams.answer_abandoned_messages()  # a task that died unanswered never stalls it
    from common.flower_pulls import SUPERLINK_BACKOFF_S, poll_objects_quickly

    # a message's objects from the SuperLink: retried after 50 ms .. 0.5 s, not 1 s .. 10 s
    poll_objects_quickly("flwr.supernode.start_client_internal", *SUPERLINK_BACKOFF_S)
    from flwr.supernode.cli import flower_supernode

    # flwr_exit names its telemetry event after argv[0]; keep Flower's own program name
    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()
