"""Federated DP-SGD of an ensemble's stacker (``--paradigm ensemble -P combine=stacker``).

The global model is :class:`client.paradigms.ensemble.Stacker`: the ``M`` trained members,
frozen, and a linear head over their logits, started as the average of the logits. Every
round sends it to every hospital as a train message of the stage paradigm ``ensemble-stacker``
(run id ``<run id>-stacker``, target ε ``stacker-share · ε``): each hospital trains the head
with DP-SGD on its validation patients (:func:`client.paradigms.ensemble.stacker_training`),
its ledger records the round, and the coordinator averages the replies' heads weighted by
their patients (the members come back unchanged and stay the coordinator's own).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import messages as k
from common.config import RunConfig
from common.paradigms import canonical_options
from common.paradigms.ensemble import stacker_epsilon, stacker_run_id

log = logging.getLogger(__name__)

__all__ = ["StackerResult", "stacker_plan", "train_stacker"]

HEAD_KEYS = ("head.weight", "head.bias")


@dataclass
class StackerResult:
    """The stacker's head and what the hospitals released training it."""

    weights: list[float]
    bias: float
    run_id: str
    target_epsilon: float
    rounds: list[dict[str, Any]] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    epsilon_dataset: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def head(self) -> list[float]:
        """``[w_1, ..., w_M, b]`` (the ``ensemble-scores`` query's ``ensemble-stacker``)."""
        return [*self.weights, self.bias]


def stacker_plan(config: RunConfig, members: int, share: float, rounds: int) -> Any:
    """The plan of the stacker's rounds: stage paradigm, own run id, ε share, rounds."""
    plan = config.plan
    return dataclasses.replace(
        plan, paradigm="ensemble-stacker",
        paradigm_options=canonical_options({"members": int(members)}),
        run_id=stacker_run_id(plan.run_id), num_rounds=int(rounds),
        target_epsilon=stacker_epsilon(plan.target_epsilon, share))


def _initial(config: RunConfig, arrays: list[ArrayRecord]) -> ArrayRecord:
    from client.paradigms.ensemble import Stacker
    from server.app import initial_model

    members = []
    for record in arrays:
        model = initial_model(config)[0]
        model.load_state_dict(record.to_torch_state_dict())
        members.append(model)
    return ArrayRecord(Stacker(members).state_dict())


def _site(msg: Message) -> str:
    info = msg.content.get(k.NODE_INFO)
    return str(info[k.SITE]) if isinstance(info, ConfigRecord) and k.SITE in info else \
        f"node-{msg.metadata.src_node_id}"


def train_stacker(grid: Grid, config: RunConfig, node_ids: list[int],
                  arrays: list[ArrayRecord], *, share: float, rounds: int) -> StackerResult:
    """Train the stacker over ``rounds`` federated rounds; its head and each hospital's ε."""
    plan = stacker_plan(config, len(arrays), share, rounds)
    state = _initial(config, arrays).to_torch_state_dict()
    result = StackerResult([], 0.0, plan.run_id, plan.target_epsilon)
    for rnd in range(1, rounds + 1):
        record = ConfigRecord({**plan.to_record(), k.SERVER_ROUND: rnd})
        messages = [Message(content=RecordDict({k.ARRAYS: ArrayRecord(state),
                                                k.CONFIG: record}),
                            message_type=MessageType.TRAIN, dst_node_id=int(n))
                    for n in node_ids]
        replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
        heads, counts, losses = [], [], []
        for reply in replies:
            if reply.has_error():
                result.failures.append({"site": f"node-{reply.metadata.src_node_id}",
                                        "reason": str(reply.error.reason)})
                continue
            metrics = reply.content.get(k.METRICS)
            got = reply.content.get(k.ARRAYS)
            if not isinstance(metrics, MetricRecord) or not isinstance(got, ArrayRecord):
                continue
            sd = got.to_torch_state_dict()
            heads.append([sd[key].double() for key in HEAD_KEYS])
            counts.append(float(metrics[k.NUM_EXAMPLES]))
            losses.append(float(metrics.get(k.TRAIN_LOSS, math.nan)))
            result.epsilon[_site(reply)] = float(metrics.get(k.EPSILON, math.nan))
            result.epsilon_dataset[_site(reply)] = float(metrics.get(k.EPSILON_DATASET,
                                                                     math.nan))
        if not heads:
            raise RuntimeError(f"no hospital trained the stacker in round {rnd}: "
                               + "; ".join(f"{f['site']}: {f['reason']}"
                                           for f in result.failures))
        total = sum(counts)
        for j, key in enumerate(HEAD_KEYS):
            state[key] = sum(h[j] * c for h, c in zip(heads, counts)).div(total).to(
                state[key].dtype)
        result.rounds.append({"round": rnd, "hospitals": len(heads),
                              "train_loss": float(sum(l * c for l, c in zip(losses, counts))
                                                  / total)})
        log.info("stacker round %d/%d: %d hospital(s)", rnd, rounds, len(heads))
    result.weights = [float(w) for w in state["head.weight"].reshape(-1)]
    result.bias = float(state["head.bias"].reshape(-1)[0])
    return result
