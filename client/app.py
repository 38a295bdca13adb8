"""The hospital node's Flower ClientApp: wiring only.

Handlers
--------
train
    Load the node's data (cached), check the plan against the node's epsilon cap, run DP-SGD
    (:mod:`client.training`), and reply with the updated weights, the number of patients and
    the epsilon spent so far in the run. The accountant history lives in ``Context.state`` so
    that epsilon composes across rounds although Flower recreates the app for every message.
evaluate
    Evaluate the received model on the node's validation (or test) split: loss, accuracy,
    AUC (patient level) and the number of patients; optionally per-class score histograms.

The outermost mod, :func:`client.mods.sanitize_errors_mod`, replaces every exception text with
a reason safe to leave the hospital.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.budget import decide
from client.data import NodeData, PatientRecordDataset, load_node_data
from client.mods import sanitize_errors_mod
from client.training import evaluate as evaluate_model
from client.training import select_device, train_dp
from common import messages as k
from common.config import NodeConfig, TrainPlan
from common.errors import ConfigError, DataError
from common.models import build_model
from common.privacy import AccountantState
from common.stats.histogram import score_histograms

log = logging.getLogger(__name__)

NodeConfigResolver = Callable[[Context], NodeConfig]


def node_config_from_context(context: Context) -> NodeConfig:
    """Default resolver: the node's own ``--node-config``."""
    return NodeConfig.from_user_config(context.node_config)


def simulated_nodes(configs: Mapping[int, NodeConfig]) -> NodeConfigResolver:
    """Resolver for simulations: map Flower's ``partition-id`` to a prepared NodeConfig."""
    table = dict(configs)

    def resolve(context: Context) -> NodeConfig:
        pid = int(context.node_config[k.PARTITION_ID])
        return table[pid]

    return resolve


def _config(msg: Message) -> ConfigRecord:
    record = msg.content.get(k.CONFIG)
    if not isinstance(record, ConfigRecord):
        raise ConfigError("message has no config record", safe_reason="malformed message: no config")
    return record


def _arrays(msg: Message) -> ArrayRecord:
    record = msg.content.get(k.ARRAYS)
    if not isinstance(record, ArrayRecord):
        raise ConfigError("message has no model arrays", safe_reason="malformed message: no model")
    return record


def _load(node: NodeConfig, plan: TrainPlan) -> NodeData:
    """The node's data at the plan's image size; refuse sizes and labels the node can't serve."""
    if plan.image_size > node.max_image_size:
        raise ConfigError(
            f"image-size {plan.image_size} > max-image-size {node.max_image_size}",
            safe_reason=f"refused: image-size {plan.image_size} exceeds this node's maximum "
            f"of {node.max_image_size}",
        )
    data = load_node_data(
        node.data_dir,
        image_size=plan.image_size,
        require_deidentified=node.require_deidentified,
        seed=0,  # the split is the hospital's, not the run's: fixed so it never moves
    )
    for split in (data.train, data.val, data.test):
        if len(split) and int(split.labels.max()) > 1:
            raise DataError(
                "labels other than 0/1 in labels.csv",
                safe_reason="the node's labels are not binary (0/1), which this model needs",
            )
    return data


def _finite(state: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def _prior(context: Context) -> AccountantState | None:
    if k.STATE_PRIVACY not in context.state:
        return None
    return AccountantState.from_record(dict(context.state[k.STATE_PRIVACY]))


def _model(plan: TrainPlan, arrays: ArrayRecord) -> torch.nn.Module:
    model = build_model(plan.model, in_channels=1, num_classes=2, image_size=plan.image_size)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def _device(node: NodeConfig) -> torch.device:
    if node.torch_threads > 0:
        torch.set_num_threads(node.torch_threads)
    return select_device(None if node.device == "auto" else node.device)


def handle_train(msg: Message, context: Context, node: NodeConfig) -> Message:
    """Train on the node's data with DP-SGD; see module docstring."""
    config = _config(msg)
    plan = TrainPlan.from_record(dict(config))
    device = _device(node)
    data = _load(node, plan)
    prior = _prior(context)
    decision = decide(plan, node, num_patients=data.train.num_patients, prior=prior)
    server_round = int(cast(int, config.get(k.SERVER_ROUND, 1)))
    model = _model(plan, _arrays(msg))
    result = train_dp(
        model,
        PatientRecordDataset(data.train),
        epochs=plan.local_epochs,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        noise_multiplier=decision.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        delta=decision.delta,
        prior=prior,
        private=plan.private,
        device=device,
        # DP noise must not be predictable by the coordinator: never seed it from the plan.
        seed=None if plan.private else plan.seed * 1000 + server_round,
    )
    if plan.private:
        # Record the spend first: it happened whether or not the result is released.
        context.state[k.STATE_PRIVACY] = ConfigRecord(dict(result.accountant_state.to_record()))
    spent = result.epsilon  # inf for non-private training: no guarantee
    if not _finite(result.state_dict):
        raise DataError(
            "training produced non-finite weights",
            safe_reason="local training diverged (non-finite weights); nothing was released",
        )
    metrics = MetricRecord(
        {
            k.NUM_EXAMPLES: result.num_examples,
            k.TRAIN_LOSS: float(result.train_loss),
            k.EPSILON: float(spent),
            k.DELTA: float(decision.delta) if plan.private else math.nan,
            k.NOISE_MULTIPLIER: float(decision.noise_multiplier),
            k.SAMPLE_RATE: float(decision.sample_rate),
            k.STEPS: int(result.steps),
        }
    )
    content = RecordDict(
        {
            k.ARRAYS: ArrayRecord(result.state_dict),
            k.METRICS: metrics,
            k.NODE_INFO: ConfigRecord({k.SITE: node.site_name}),
        }
    )
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, node: NodeConfig) -> Message:
    """Evaluate the received model on a held-out split; see module docstring."""
    config = _config(msg)
    plan = TrainPlan.from_record(dict(config))
    split_name = str(config.get(k.SPLIT, k.SPLIT_VAL))
    if split_name not in (k.SPLIT_VAL, k.SPLIT_TEST):
        raise ConfigError(f"unknown split {split_name!r}",
                          safe_reason="malformed message: split must be 'val' or 'test'")
    device = _device(node)
    data = _load(node, plan)
    split = data.val if split_name == k.SPLIT_VAL else data.test
    if split.num_patients == 0:
        raise DataError(f"empty {split_name} split",
                        safe_reason=f"the node has no patients in its {split_name} split")
    model = _model(plan, _arrays(msg))
    res = evaluate_model(
        model, split.images, split.labels, patient_index=split.patient_index, device=device
    )
    if not (np.isfinite(res.scores).all() and math.isfinite(res.loss)):
        raise DataError("non-finite scores", safe_reason="the model produced non-finite scores")
    values: dict[str, int | float | list[int] | list[float]] = {
        k.NUM_EXAMPLES: int(res.num_examples),
        k.LOSS: float(res.loss),
        k.ACCURACY: float(res.accuracy),
        k.AUC: float(res.auc),
    }
    # Histograms only where the hospital allows them (see NodeConfig.release_histograms); a
    # node that does not simply leaves them out and the coordinator pools what it gets.
    if bool(config.get(k.WITH_HISTOGRAMS, False)) and node.release_histograms:
        pos, neg = score_histograms(res.scores, res.labels)
        values[k.HIST_POSITIVE] = [int(v) for v in pos]
        values[k.HIST_NEGATIVE] = [int(v) for v in neg]
    content = RecordDict(
        {k.METRICS: MetricRecord(values), k.NODE_INFO: ConfigRecord({k.SITE: node.site_name})}
    )
    return Message(content=content, reply_to=msg)


def build_client_app(resolve_node: NodeConfigResolver = node_config_from_context) -> ClientApp:
    """Build the ClientApp; ``resolve_node`` supplies the node's settings from its Context."""
    client_app = ClientApp(mods=[sanitize_errors_mod])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, resolve_node(context))

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, resolve_node(context))

    return client_app


app = build_client_app()

__all__ = ["app", "build_client_app", "simulated_nodes", "node_config_from_context"]
