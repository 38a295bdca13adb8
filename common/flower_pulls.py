"""Shorter waits for Flower's object pulls (Flower 1.42 internals, one seam).

A Flower message travels as a message record plus its objects (the arrays, the records), and a
receiver pulls the objects after the message (``pull_objects`` in
``flwr.supercore.inflatable.inflatable_utils``). The sender registers the message before it has
uploaded every object, so the first pull often finds an object not there yet; Flower then
waits 1 s, 2 s, 4 s ... (up to 10 s) before trying again. On the three hops of a message (the
SuperNode pulling from the SuperLink, the ClientApp task pulling from its SuperNode, the
ServerApp pulling a reply from the SuperLink) that cost about a second each, for a message that
arrived a few milliseconds later: most of the round time beyond compute measured by
``bench/deployment.py``.

:func:`poll_objects_quickly` replaces the name ``pull_objects`` in one calling module with a
wrapper that retries after ``initial_s`` doubling to ``cap_s`` and drops the try count (Flower's
time limit, 2 h, still ends a pull that never completes). Nothing else changes. Each caller is
pinned by ``tests/cli/test_warm_worker_seams.py`` on ``flwr==1.42.0``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["LOOPBACK_BACKOFF_S", "SUPERLINK_BACKOFF_S", "poll_objects_quickly"]

LOOPBACK_BACKOFF_S = (0.02, 0.25)
"""First and longest wait (s) of a task pulling from its own SuperNode (loopback)."""
SUPERLINK_BACKOFF_S = (0.05, 0.5)
"""First and longest wait (s) of a pull from the SuperLink (the SuperNode's, the ServerApp's)."""


def poll_objects_quickly(module_name: str, initial_s: float, cap_s: float) -> Callable[..., Any]:
    """Make ``module_name``'s calls of ``pull_objects`` retry after ``initial_s`` doubling to
    ``cap_s`` seconds; returns the wrapper (installed once per module)."""
    module = importlib.import_module(module_name)
    original = module.pull_objects
    if getattr(original, "vesalius_wrapped", False):
        return original  # type: ignore[no-any-return]

    def pull_objects(*args: Any, **kwargs: Any) -> Any:
        kwargs["initial_backoff"] = min(float(kwargs.get("initial_backoff") or initial_s),
                                        initial_s)
        kwargs["backoff_cap"] = min(float(kwargs.get("backoff_cap") or cap_s), cap_s)
        kwargs["max_tries_per_object"] = None
        return original(*args, **kwargs)

    pull_objects.vesalius_wrapped = True  # type: ignore[attr-defined]
    module.pull_objects = pull_objects
    return pull_objects
