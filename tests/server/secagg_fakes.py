"""A fake federation for secure-aggregation tests: fixed updates, dropouts at chosen stages.

:func:`fixed_update_app` is a real Flower ClientApp (with the node's real secure-aggregation
mod and stage handler) whose train handler adds a fixed update to the weights it receives;
:class:`DroppingGrid` delivers messages in-process and lets a test silence a node from a
given stage on: ``"advertise"``, ``"share"``, ``"train"``, ``"unmask"`` or ``"evaluate"``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from client.mods import sanitize_errors_mod
from client.secagg import handle_stage, secagg_mod
from common import messages as k
from common.errors import BudgetExceededError
from tests.flower_helpers import incoming, node_context

STAGE_ORDER = ("advertise", "share", "train", "unmask", "evaluate")


def arrays_of(values: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.asarray(v)) for key, v in values.items()})


def fixed_update_app(updates: Mapping[int, Mapping[str, np.ndarray]], examples: Mapping[int, int],
                     losses: Mapping[int, float],
                     histograms: Mapping[int, tuple[list[int], list[int]]] | None = None,
                     refuse_evaluate: Collection[int] = (),
                     ) -> ClientApp:
    """Node ``i`` returns ``w + updates[i]``, ``examples[i]`` and ``losses[i]``; a node in
    ``refuse_evaluate`` refuses to evaluate (too few patients), as a small hospital does."""
    app = ClientApp(mods=[sanitize_errors_mod, secagg_mod])

    def info(node: int) -> ConfigRecord:
        return ConfigRecord({k.SITE: f"h{node}"})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node = int(msg.metadata.dst_node_id)
        sent = msg.content[k.ARRAYS]
        out = {key: sent[key].numpy() + updates[node][key] for key in sent.keys()}
        metrics = MetricRecord({k.NUM_EXAMPLES: examples[node], k.UNIT_WEIGHT: 1,
                                k.TRAIN_LOSS: losses[node], k.EPSILON: 1.5,
                                k.SAMPLE_RATE: 0.1, k.STEPS: 10})
        return Message(RecordDict({k.ARRAYS: arrays_of(out), k.METRICS: metrics,
                                   k.NODE_INFO: info(node)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        node = int(msg.metadata.dst_node_id)
        if node in refuse_evaluate:
            raise BudgetExceededError("too few", safe_reason="refused: 5 patient(s) in the val "
                                      "split, fewer than this node's minimum release count (10)")
        values: dict[str, Any] = {k.NUM_EXAMPLES: examples[node], k.UNIT_WEIGHT: 1,
                                  k.LOSS: losses[node], k.AUC: 0.5, k.ACCURACY: 0.5}
        if histograms is not None and msg.content[k.CONFIG].get(k.WITH_HISTOGRAMS, True):
            values[k.HIST_POSITIVE], values[k.HIST_NEGATIVE] = histograms[node]
        return Message(RecordDict({k.METRICS: MetricRecord(values), k.NODE_INFO: info(node)}),
                       reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        node = int(msg.metadata.dst_node_id)
        if k.SECAGG_STAGE in msg.content[k.CONFIG]:
            return handle_stage(msg, context, f"h{node}")
        # a statistics query: a confusion table of counts, and the node's patient count
        counts = [examples[node] % 5, 2, examples[node], 1]
        return Message(RecordDict({k.METRICS: MetricRecord({k.CONFUSION: counts,
                                                            k.NUM_EXAMPLES: examples[node]}),
                                   k.NODE_INFO: info(node)}), reply_to=msg)

    return app


def stage_of(msg: Message) -> str:
    if msg.metadata.message_type == MessageType.QUERY:
        # a statistics query is the masked input of its session, like a train message
        return str(msg.content[k.CONFIG].get(k.SECAGG_STAGE, "train"))
    return "train" if msg.metadata.message_type == MessageType.TRAIN else "evaluate"


class DroppingGrid:
    """In-process grid; ``drop[node] = stage`` silences the node from that stage on."""

    def __init__(self, app: ClientApp, node_ids: list[int], drop: Mapping[int, str] | None = None
                 ) -> None:
        self.app = app
        self.contexts = {nid: node_context({}, node_id=nid) for nid in node_ids}
        self.drop = dict(drop or {})
        for attr in ("_run_id", "_node_id", "_task_id"):
            if getattr(TaskIdentity, attr) is None:
                setattr(TaskIdentity, attr, 1 if attr != "_node_id" else 0)
        self.replies: list[Message] = []
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def _silent(self, node: int, stage: str) -> bool:
        start = self.drop.get(node)
        return start is not None and STAGE_ORDER.index(stage) >= STAGE_ORDER.index(start)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        out = []
        for msg in messages:
            self.sent.append(msg)
            nid = int(msg.metadata.dst_node_id)
            if self._silent(nid, stage_of(msg)):
                continue
            reply = self.app(incoming(msg.content, msg.metadata.message_type, node_id=nid),
                             self.contexts[nid])
            self.replies.append(reply)
            out.append(reply)
        return out

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)
