"""The node's warm worker: one long-lived process that serves every ClientApp task.

Flower 1.42's stock SuperNode (``--isolation subprocess``) starts a fresh ``flwr-clientapp``
process for every message, which re-imports torch and the Vesalius ClientApp (about 10 s of
CPU each on the project's machines). With ``--isolation process`` the SuperNode only serves its
Runtime API and leaves the tasks to an outside process; this package is that process:

- :mod:`client.warm_worker.worker` imports torch, Flower and ``client.app`` once, warms the
  training path up single-threaded, then runs Flower's own SuperExec loop (``run_superexec``:
  acquire a task, launch it) with an executor of its own;
- :mod:`client.warm_worker.executor` is that executor: each ClientApp task runs Flower's own
  ``run_clientapp`` (the function behind ``flwr-clientapp``) with the task's token, so the
  protocol, heartbeats and task status are Flower's; by default in the worker itself, so that
  what the ClientApp caches (loaded splits, the accountant's noise search) lasts from one
  message to the next, or in a ``fork()`` per task;
- :mod:`client.warm_worker.supernode` starts ``flower-supernode`` in-process with its hard-coded
  idle sleeps (3 s after an empty pull, 0.5 s waits for a reply) capped;
- :mod:`client.warm_worker.flower_seams` holds every Flower internal these rely on, in one
  place, each pinned by a test on ``flwr==1.42.0``.

``vesalius node start`` (:mod:`cli.node_start`) runs the SuperNode and the worker side by side
and supervises both (:mod:`cli.node_processes`).
"""
