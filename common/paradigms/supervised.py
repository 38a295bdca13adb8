"""Supervised learning: every node trains the task on its labelled patients, FedAvg rounds.

The default paradigm: the coordinator's rounds of :func:`server.app.run_federation` and the
node's training of :func:`client.app.handle_train`, unchanged.
"""

from __future__ import annotations

from common.paradigms.registry import DEFAULT_PARADIGM, Paradigm, register_paradigm

SUPERVISED = register_paradigm(Paradigm(
    name=DEFAULT_PARADIGM,
    summary="every hospital trains the task on its labelled patients; FedAvg rounds",
))
