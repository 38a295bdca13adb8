"""The hospital node's Flower ClientApp: wiring only.

Handlers
--------
train
    Load the node's data (cached), check the plan against the node's epsilon cap **for this
    dataset over every run** (the node's signed privacy ledger, :mod:`common.ledger`), record
    the round's spend in the ledger, run DP-SGD (:mod:`client.training`), and reply with the
    updated weights, the number of patients and epsilon: this run's (RDP and PRV, composed
    from the run's history in ``Context.state``) and the dataset's total over all runs (from
    the ledger). The spend is written to the ledger *before* training: a crash after noise
    was drawn can then only over-count, never lose a spend.
    In cross-validation (``cv-mode``) the node trains on the plan's training folds
    (:mod:`client.data.folds`); the held-out site of leave-one-site-out trains nothing and
    returns the received weights with zero patients.
evaluate
    Evaluate the received model on the node's validation, test or CV held-out split: loss,
    accuracy, AUC (patient level) and the number of patients; optionally per-class score
    histograms (binary task only).

Tasks
-----
The plan names the learning task (``task``, ``num-classes``; :mod:`common.tasks`): the node
checks its labels with the task's target check, builds the model with the task's number of
outputs and evaluates through the task's predictions (:func:`client.training.evaluate`).
Only the tasks of :data:`common.tasks.federated.FEDERATED_TASKS` are served; a plan naming
another is refused before any data is read.

The outermost mod, :func:`client.mods.sanitize_errors_mod`, replaces every exception text with
a reason safe to leave the hospital.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.budget import PrivacyDecision, decide
from client.data import NodeData
from client.data.task_data import load_task_data
from client.data.folds import cv_splits
from client.data.node_data import SplitArrays
from client.capture import capture_mod
from client.mods import sanitize_errors_mod
from client.paradigms import node_training
from client.transport import transport_mod
from client.secagg import handle_stage as handle_secagg_stage
from client.secagg import is_stage as is_secagg_stage
from client.secagg import secagg_mod
from client.queries.handler import handle_query
from client.replay import ReplyStore, request_digest
from client.privacy_guard import NodeBudget
from client.training import evaluate as evaluate_model
from client.training import select_device, train_dp
from common import messages as k
from common.config import NodeConfig, TrainPlan, cv_base_run_id, in_fold_run
from common.errors import BudgetExceededError, ConfigError, DataError, VesaliusError, safe_reason
from common.models import build_model
from common.tasks import Task
from common.tasks.federated import (
    federated_task,
    plan_samples,
    spatial_dims,
)
from common.ledger import LedgerEntry, Mechanism
from common.privacy import AccountantState, default_delta, epsilon, planned_epsilon
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


def plan_task(plan: TrainPlan) -> Task:
    """The plan's learning task, when a federation serves it with the plan's model on the
    plan's sample kind (``samples``)."""
    task = federated_task(plan.task, plan.model)
    plan_samples(task, plan.model, plan.samples)
    return task


def _load(node: NodeConfig, plan: TrainPlan) -> NodeData:
    """The node's data at the plan's image size; refuse sizes and labels the node can't serve.

    The labels of every split must fit the plan's task (:meth:`common.tasks.Task.
    check_targets`: classes ``0 .. num-classes - 1``); otherwise a :class:`DataError` whose
    safe reason names the task, never a label value.
    """
    task = plan_task(plan)
    if plan.image_size > node.max_image_size:
        raise ConfigError(
            f"image-size {plan.image_size} > max-image-size {node.max_image_size}",
            safe_reason=f"refused: image-size {plan.image_size} exceeds this node's maximum "
            f"of {node.max_image_size}",
        )
    from client.data.cache import LoadParams, SplitCache, cache_dir

    params = LoadParams(
        task=plan.task,
        num_classes=plan.num_classes,
        samples=plan.samples,
        image_size=plan.image_size,
        require_deidentified=node.require_deidentified,
        seed=0,  # the split is the hospital's, not the run's: fixed so it never moves
    )
    # Each message may run in a fresh process: the preprocessed splits come from the node's
    # own disk cache (next to its ledger) unless a file of the data folder changed.
    data = SplitCache(cache_dir(node.resolved_ledger_dir)).load(
        node.data_dir, params, lambda: load_task_data(node.data_dir, **params.kwargs())
    )
    for split in (data.train, data.val, data.test):
        if len(split):
            labels = split.labels if split.labels.ndim > 1 else split.labels.reshape(-1)
            task.check_targets(labels, plan.num_classes)
    return data


def training_split(node: NodeConfig, plan: TrainPlan, data: NodeData) -> SplitArrays:
    """The patients this node trains on under ``plan`` (its train split, or CV folds)."""
    if plan.cv_mode == "none":
        return data.train
    return cv_splits(data, plan=plan, site_name=node.site_name)[0]


def heldout_split(
    node: NodeConfig, plan: TrainPlan, data: NodeData, split_name: str
) -> SplitArrays:
    """The held-out patients for ``split_name``: "val", "test" or "heldout" (the CV fold)."""
    if split_name == k.SPLIT_VAL:
        return data.val
    if split_name == k.SPLIT_TEST:
        return data.test
    if split_name == k.SPLIT_HELDOUT:
        if plan.cv_mode == "none":
            raise ConfigError(
                "split 'heldout' without cross-validation",
                safe_reason="malformed message: split 'heldout' needs a cv-mode",
            )
        return cv_splits(data, plan=plan, site_name=node.site_name)[1]
    raise ConfigError(
        f"unknown split {split_name!r}",
        safe_reason="malformed message: split must be 'val', 'test' or 'heldout'",
    )


def _finite(state: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def _prior(context: Context) -> AccountantState | None:
    if k.STATE_PRIVACY not in context.state:
        return None
    return AccountantState.from_record(dict(context.state[k.STATE_PRIVACY]))


def build_plan_model(plan: TrainPlan) -> torch.nn.Module:
    """A fresh model of the plan: ``task.num_outputs(num-classes)`` outputs, 1 channel, 2D
    for images and 3D for volumes and series."""
    outputs = plan_task(plan).num_outputs(plan.num_classes)
    return build_model(plan.model, in_channels=1, num_classes=outputs,
                       image_size=plan.image_size, spatial_dims=spatial_dims(plan.samples))


def _model(plan: TrainPlan, arrays: ArrayRecord) -> torch.nn.Module:
    if plan.paradigm == "ensemble-stacker":  # frozen members + head (client.paradigms.ensemble)
        from client.paradigms.ensemble import stacker_model

        return stacker_model(plan, arrays)
    model = build_plan_model(plan)
    try:
        model.load_state_dict(arrays.to_torch_state_dict())
    except RuntimeError:  # e.g. weights of another number of classes than the plan's
        raise ConfigError(
            "model weights do not fit the plan's model",
            safe_reason=f"refused: the weights sent do not fit model {plan.model!r} with "
            f"{plan.task} outputs for {plan.num_classes} classes",
        ) from None
    if plan.model_phase:
        set_phase = getattr(model, "set_phase", None)
        if set_phase is None:
            raise ConfigError(
                f"model {plan.model!r} has no training phases",
                safe_reason=f"refused: model-phase is set but model {plan.model!r} has no phases",
            )
        phase, _, layer = plan.model_phase.partition(":")
        try:
            set_phase(phase, layer=int(layer) if layer else None)
        except ConfigError as exc:  # e.g. a layer the model does not have: say which
            raise ConfigError(str(exc), safe_reason=f"refused: model-phase {plan.model_phase!r}: "
                              f"{exc}") from None
    return model


def _device(node: NodeConfig) -> torch.device:
    if node.torch_threads > 0:
        torch.set_num_threads(node.torch_threads)
    return select_device(None if node.device == "auto" else node.device)


def _run_history(context: Context, budget: NodeBudget | None = None,
                 fingerprint: str = "", plan: TrainPlan | None = None) -> AccountantState:
    """This run's privacy events at this node.

    With a ledger they come from it: every training spend recorded under the plan's run id
    (and fold), so the run's epsilon survives a restarted node and a resumed run, whose
    Flower context starts empty. Without one, from the node's Flower context.
    """
    if budget is not None and plan is not None:
        fold = plan.fold if plan.cv_mode != "none" else None
        run = AccountantState()
        for entry in budget.ledger.entries(fingerprint):
            if entry.release == "train" and entry.run_id == (plan.run_id or "unnamed-run") \
                    and entry.fold == fold and entry.mechanism.is_gaussian:
                run = run.with_event(noise_multiplier=entry.mechanism.noise_multiplier,
                                     sample_rate=entry.mechanism.sample_rate,
                                     steps=entry.mechanism.steps)
        return run
    prior = _prior(context)
    return prior if prior is not None else AccountantState()


def _cv_history(budget: NodeBudget | None, fingerprint: str,
                plan: TrainPlan | None) -> AccountantState | None:
    """A cross-validation's privacy events at this node so far: the training spends of every
    fold of it on this dataset, sub-runs included (its folds' runs are named by
    :func:`common.config.fold_run_id`, their members' and stages' by
    :func:`common.config.in_fold_run`), or None outside a cross-validation or without a ledger.

    A fold's own epsilon (``_run_history``) is not what the cross-validation spent: a patient
    trains in several folds, and the node's ledger composes them all.
    """
    if budget is None or plan is None or plan.cv_mode == "none":
        return None
    base = cv_base_run_id(plan.run_id, plan.fold)
    if base is None:
        return None
    state = AccountantState()
    for entry in budget.ledger.entries(fingerprint):
        if entry.release == "train" and entry.fold is not None and entry.mechanism.is_gaussian \
                and in_fold_run(entry.run_id, base, entry.fold):
            state = state.with_event(noise_multiplier=entry.mechanism.noise_multiplier,
                                     sample_rate=entry.mechanism.sample_rate,
                                     steps=entry.mechanism.steps)
    return state


def _epsilons(state: AccountantState, delta: float, with_prv: bool) -> tuple[float, float]:
    """``(RDP, PRV)`` epsilon of ``state`` (PRV NaN unless ``with_prv``; 0 for no steps)."""
    if not state.total_steps:
        return 0.0, 0.0
    rdp = epsilon(state, delta=delta)
    return rdp, (epsilon(state, delta=delta, accountant="prv") if with_prv else math.nan)


def _privacy_metrics(
    node: NodeConfig, run: AccountantState, delta: float, dataset_epsilon: float,
    *, with_prv: bool = True, cv: AccountantState | None = None,
) -> dict[str, float]:
    """This run's epsilon (RDP, PRV), the dataset's total (ledger), the node's cap and, in a
    cross-validation (``cv``), the cross-validation's epsilon so far (RDP, PRV).

    The PRV epsilon sizes its domain from the RDP curves the RDP epsilon has just cached
    (~0.06 s with the demo's mechanism, ~0.7 s with stock Opacus); the train handler still
    asks for it only in the plan's last round (earlier rounds carry NaN). RDP is always
    computed.
    """
    run_rdp, run_prv = _epsilons(run, delta, with_prv)
    out = {
        k.EPSILON: float(run_rdp),
        k.EPSILON_PRV: float(run_prv),
        k.EPSILON_DATASET: float(dataset_epsilon),
        k.EPSILON_CAP: float(node.epsilon_cap),
    }
    if cv is not None:
        cv_rdp, cv_prv = _epsilons(cv, delta, with_prv)
        out |= {k.EPSILON_CV: float(cv_rdp), k.EPSILON_CV_PRV: float(cv_prv)}
    return out


def _holdout_reply(
    msg: Message, context: Context, node: NodeConfig, arrays: ArrayRecord, delta: float,
    dataset_epsilon: float, budget: NodeBudget | None = None, fingerprint: str = "",
    plan: TrainPlan | None = None,
) -> Message:
    """Leave-one-site-out: the held-out site trains nothing and spends nothing."""
    metrics = MetricRecord(
        {
            k.NUM_EXAMPLES: 0,
            k.UNIT_WEIGHT: 0,  # trains nothing: no weight, even in an unweighted average
            k.TRAIN_LOSS: math.nan,
            **_privacy_metrics(node, _run_history(context, budget, fingerprint, plan), delta,
                               dataset_epsilon, cv=_cv_history(budget, fingerprint, plan)),
            k.DELTA: float(delta),
            k.NOISE_MULTIPLIER: 0.0,
            k.SAMPLE_RATE: 0.0,
            k.STEPS: 0,
        }
    )
    content = RecordDict(
        {k.ARRAYS: arrays, k.METRICS: metrics,
         k.NODE_INFO: _node_info(node, NodeBudget.for_node(node))}
    )
    return Message(content=content, reply_to=msg)


def _charge_round(
    budget: NodeBudget, data: NodeData, plan: TrainPlan, decision: PrivacyDecision,
    history: AccountantState, num_patients: int, server_round: int,
) -> float:
    """Append this round's spend to the ledger (before training); return the dataset's epsilon
    after it, which the trainer must then report."""
    after = planned_epsilon(
        noise_multiplier=decision.noise_multiplier,
        sample_rate=decision.sample_rate,
        steps=decision.steps_per_round,
        delta=decision.delta,
        prior=history,
    )
    budget.charge(
        LedgerEntry(
            fingerprint=data.fingerprint,
            run_id=plan.run_id or "unnamed-run",
            release="train",
            mechanism=Mechanism(
                kind="subsampled-gaussian",
                noise_multiplier=decision.noise_multiplier,
                sample_rate=decision.sample_rate,
                steps=decision.steps_per_round,
            ),
            delta=decision.delta,
            dataset_size=num_patients,
            fold=plan.fold if plan.cv_mode != "none" else None,
            round=server_round,
            epsilon_reported=after,
            params={
                "max_grad_norm": plan.max_grad_norm,
                "local_epochs": plan.local_epochs,
                "batch_size": plan.batch_size,
                "learning_rate": plan.learning_rate,
                "model": plan.model,
                "cv_mode": plan.cv_mode,
                # the paradigm and its options (e.g. fine-tuning's init-sha256, the hash of
                # the weights it starts from), so the ledger says what was trained
                "paradigm": plan.paradigm,
                "paradigm_options": plan.paradigm_options,
            },
        )
    )
    return after


def _refuse_without_heldout(plan: TrainPlan, data: NodeData) -> None:
    """Refuse to train, before any spend, a hospital too small for its held-out splits.

    Without cross-validation the run scores the final model on every node's test split; a node
    without test patients (too few patients for the split) refuses the plan at once, before any
    spend (the coordinator excludes it for the rest of the run, named by its site). A node
    with test patients but an empty validation split still trains: its validation replies say
    it has no validation patients, and the pooled validation comes from the other hospitals.
    """
    if plan.cv_mode == "none" and data.test.num_patients == 0:
        total = data.train.num_patients + data.val.num_patients + data.test.num_patients
        raise BudgetExceededError(
            f"val/test splits of {data.val.num_patients}/{data.test.num_patients} patients",
            safe_reason=f"refused: {total} patient(s) are too few for a validation and a test "
            f"split (validation {data.val.num_patients}, test {data.test.num_patients})",
        )


def handle_train(msg: Message, context: Context, node: NodeConfig) -> Message:
    """Train on the node's data with DP-SGD; see module docstring."""
    config = _config(msg)
    plan = TrainPlan.from_record(dict(config))
    server_round = int(cast(int, config.get(k.SERVER_ROUND, 1)))
    device = _device(node)
    data = _load(node, plan)
    _refuse_without_heldout(plan, data)
    train_split = training_split(node, plan, data)
    arrays = _arrays(msg)
    budget = NodeBudget.for_node(node) if plan.private else None
    history = budget.ledger.history(data.fingerprint) if budget is not None else None
    if plan.cv_mode == "loso" and train_split.num_patients == 0:
        delta = default_delta(max(data.train.num_patients, 1))
        spent = (
            budget.spent(data.fingerprint, prv=False).epsilon_rdp if budget is not None else 0.0
        )
        return _holdout_reply(msg, context, node, arrays, delta, spent, budget,
                              data.fingerprint, plan)
    replies = ReplyStore(node.resolved_ledger_dir) if budget is not None else None
    fold = plan.fold if plan.cv_mode != "none" else None
    digest = request_digest(arrays, dict(config)) if replies is not None else ""
    if replies is not None:
        kept = replies.get(data.fingerprint, plan.run_id, fold, server_round, digest)
        if kept is not None:  # this round was asked before with this very model: resend it
            log.warning("round %d was asked again with the same model (a resumed run): the "
                        "reply already released is sent again, nothing new is spent",
                        server_round)
            state, released = kept
            return Message(content=RecordDict({
                k.ARRAYS: ArrayRecord(state), k.METRICS: MetricRecord(released),
                k.NODE_INFO: _node_info(node, budget)}), reply_to=msg)
    # The paradigm's training step (client.paradigms): its model, dataset and patient count;
    # a bad model, phase or paradigm option fails here, before any spend.
    training = node_training(plan, plan_task(plan), train_split, data, _model(plan, arrays))
    decision = decide(
        plan, node, num_patients=training.num_patients, prior=history,
        server_round=server_round,
    )
    expected = math.inf
    if budget is not None and history is not None:
        # Refused here (BudgetExceededError) before any training step when over the cap.
        expected = _charge_round(
            budget, data, plan, decision, history, training.num_patients, server_round
        )
    result = train_dp(
        training.model,
        training.dataset,
        epochs=plan.local_epochs,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        noise_multiplier=decision.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        delta=decision.delta,
        prior=history,
        private=plan.private,
        device=device,
        # DP noise must not be predictable by the coordinator: never seed it from the plan.
        seed=None if plan.private else plan.seed * 1000 + server_round,
        physical_batch_size=node.physical_batch_size or None,
        **training.losses,
    )
    if plan.private and budget is not None:  # the ledger holds this round's spend already
        run = _run_history(context, budget, data.fingerprint, plan)
        context.state[k.STATE_PRIVACY] = ConfigRecord(dict(run.to_record()))
    elif plan.private:
        run = _run_history(context).with_event(
            noise_multiplier=decision.noise_multiplier,
            sample_rate=result.sample_rate,
            steps=result.steps,
        )
        context.state[k.STATE_PRIVACY] = ConfigRecord(dict(run.to_record()))
    else:
        run = _run_history(context)
        if not math.isclose(result.epsilon, expected, rel_tol=1e-9, abs_tol=1e-9):
            log.error("trainer reported epsilon %.12g, ledger recorded %.12g", result.epsilon,
                      expected)
    if not _finite(result.state_dict):
        raise DataError(
            "training produced non-finite weights",
            safe_reason="local training diverged (non-finite weights); nothing was released",
        )
    if not plan.private:
        # A non-private release (the node consented to baselines) goes on the record too, at
        # level "exact": no DP guarantee, listed for auditors, never composed into the cap.
        budget = NodeBudget.for_node(node)
        _record_exact_release(
            budget, plan, data, release="train", num_patients=training.num_patients,
            server_round=server_round,
            params={"model": plan.model, "private": False, "steps": int(result.steps)},
        )
    privacy = (
        _privacy_metrics(node, run, decision.delta, result.epsilon,
                         with_prv=server_round >= plan.num_rounds,
                         cv=_cv_history(budget, data.fingerprint, plan) if plan.private else None)
        if plan.private
        else {k.EPSILON: math.inf, k.EPSILON_PRV: math.inf, k.EPSILON_DATASET: math.inf,
              k.EPSILON_CAP: float(node.epsilon_cap)}
    )
    metrics = MetricRecord(
        {
            k.NUM_EXAMPLES: result.num_examples,
            k.UNIT_WEIGHT: 1,
            k.TRAIN_LOSS: float(result.train_loss),
            **privacy,
            k.DELTA: float(decision.delta) if plan.private else math.nan,
            k.NOISE_MULTIPLIER: float(decision.noise_multiplier),
            k.SAMPLE_RATE: float(decision.sample_rate),
            k.STEPS: int(result.steps),
        }
    )
    if replies is not None:  # kept: a resumed run asking this round again gets it back
        replies.put(data.fingerprint, plan.run_id, fold, server_round, digest,
                    result.state_dict, dict(metrics))
    content = RecordDict(
        {
            k.ARRAYS: ArrayRecord(result.state_dict),
            k.METRICS: metrics,
            k.NODE_INFO: _node_info(node, budget),
        }
    )
    return Message(content=content, reply_to=msg)


def _node_info(node: NodeConfig, budget: NodeBudget | None) -> ConfigRecord:
    """Site name and, where the node keeps a ledger, its head ``INDEX:HASH``.

    The coordinator writes the head into its report: an anchor outside the hospital that
    ``vesalius audit verify --expect-head`` checks, so removing the ledger's last entries (or
    replacing the file) cannot silently give a dataset its budget back.
    """
    info = ConfigRecord({k.SITE: node.site_name})
    if budget is not None:
        records = budget.ledger.read().records
        if records:
            info[k.LEDGER_HEAD] = f"{records[-1].index}:{records[-1].hash}"
    return info


def handle_evaluate(msg: Message, context: Context, node: NodeConfig) -> Message:
    """Evaluate the received model on a held-out split; see module docstring."""
    config = _config(msg)
    plan = TrainPlan.from_record(dict(config))
    split_name = str(config.get(k.SPLIT, k.SPLIT_VAL))
    if split_name not in (k.SPLIT_VAL, k.SPLIT_TEST, k.SPLIT_HELDOUT):
        raise ConfigError(
            f"unknown split {split_name!r}",
            safe_reason="malformed message: split must be 'val', 'test' or 'heldout'",
        )
    device = _device(node)
    data = _load(node, plan)
    split = heldout_split(node, plan, data, split_name)
    if split.num_patients == 0:
        raise DataError(f"empty {split_name} split",
                        safe_reason=f"the node has no patients in its {split_name} split")
    if split.num_patients < node.min_release_count:
        # Exact metrics of a handful of patients are close to per-patient values.
        raise BudgetExceededError(
            f"{split.num_patients} patients in {split_name} < min-release-count",
            safe_reason=f"refused: {split.num_patients} patient(s) in the {split_name} split, "
            f"fewer than this node's minimum release count ({node.min_release_count})",
        )
    model = _model(plan, _arrays(msg))
    res = evaluate_model(
        model, split.images, split.labels, patient_index=split.patient_index, device=device,
        task=plan_task(plan), num_classes=plan.num_classes,
    )
    if not (np.isfinite(res.scores).all() and math.isfinite(res.loss)):
        raise DataError("non-finite scores", safe_reason="the model produced non-finite scores")
    values: dict[str, int | float | list[int] | list[float]] = {
        k.NUM_EXAMPLES: int(res.num_examples),
        k.UNIT_WEIGHT: 1,  # equal-weight pooling when the run uses hospital-level DP
        k.LOSS: float(res.loss),
        k.ACCURACY: float(res.accuracy),
        k.AUC: float(res.auc),
        **{name: float(value) for name, value in res.extra.items()},
    }
    # Histograms only where the hospital allows them (see NodeConfig.release_histograms); a
    # node that does not simply leaves them out and the coordinator pools what it gets.
    # (Binary only: a multi-class model's pooled AUC comes from its statistics queries.)
    if (bool(config.get(k.WITH_HISTOGRAMS, False)) and node.release_histograms
            and res.binary_scores):
        pos, neg = score_histograms(res.scores, res.labels)
        values[k.HIST_POSITIVE] = [int(v) for v in pos]
        values[k.HIST_NEGATIVE] = [int(v) for v in neg]
    budget = NodeBudget.for_node(node)
    _record_exact_release(
        budget, plan, data, release=f"evaluate:{split_name}", num_patients=split.num_patients,
        params={"metrics": ",".join(sorted(values)), "model": plan.model},
    )
    content = RecordDict(
        {k.METRICS: MetricRecord(values), k.NODE_INFO: _node_info(node, budget)}
    )
    return Message(content=content, reply_to=msg)


def _record_exact_release(
    budget: NodeBudget, plan: TrainPlan, data: NodeData, *, release: str, num_patients: int,
    params: dict[str, str | int | float | bool], server_round: int | None = None,
) -> None:
    """Put a release without DP on the ledger's record before it leaves: level "exact" (a
    Gaussian with no noise, epsilon infinite), listed for auditors, never counted against the
    cap, so that the record holds every release (evaluation metrics, non-private baselines)."""
    budget.ledger.append(
        LedgerEntry(
            fingerprint=data.fingerprint,
            run_id=plan.run_id or "unnamed-run",
            release=release,
            mechanism=Mechanism(kind="gaussian", noise_multiplier=0.0, steps=1),
            delta=default_delta(max(num_patients, 1)),
            dataset_size=num_patients,
            fold=plan.fold if plan.cv_mode != "none" else None,
            round=server_round,
            level="exact",
            params=params,
        )
    )


@contextlib.contextmanager
def _site_named_errors(node: NodeConfig) -> Iterator[None]:
    """Prefix the safe reason of a node error with the site name the node reports anyway.

    An error reply carries no records, so without this the coordinator could only name the
    node by its Flower node id in its report. An unexpected exception becomes a
    :class:`VesaliusError` whose reason is :func:`~common.errors.safe_reason` of it (its type
    only) with the prefix; the original stays chained for the node's local log.
    """
    try:
        yield
    except VesaliusError as exc:
        exc.safe_reason = f"[{node.site_name}] {exc.safe_reason}"
        raise
    except Exception as exc:  # unexpected: still named, still no text of the exception
        raise VesaliusError(
            f"unexpected {type(exc).__name__} while handling a message",
            safe_reason=f"[{node.site_name}] {safe_reason(exc)}",
        ) from exc


def build_client_app(resolve_node: NodeConfigResolver = node_config_from_context) -> ClientApp:
    """Build the ClientApp; ``resolve_node`` supplies the node's settings from its Context."""
    # secagg_mod masks train/evaluate replies that belong to a secure-aggregation session.
    # transport_mod inside the error mod, outside every other: they all see unpacked records
    # capture_mod (outermost; off unless VESALIUS_CAPTURE_DIR is set) keeps a copy of every
    # reply as it leaves, for auditors (client/capture.py).
    client_app = ClientApp(mods=[capture_mod, sanitize_errors_mod, transport_mod, secagg_mod])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        node = resolve_node(context)
        with _site_named_errors(node):
            return handle_train(msg, context, node)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        node = resolve_node(context)
        with _site_named_errors(node):
            return handle_evaluate(msg, context, node)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        node = resolve_node(context)
        with _site_named_errors(node):
            if is_secagg_stage(msg):  # secure-aggregation setup / unmasking (client/secagg.py)
                return handle_secagg_stage(msg, context, node.site_name)
            return handle_query(msg, context, node)

    return client_app


app = build_client_app()

__all__ = [
    "app",
    "build_client_app",
    "build_plan_model",
    "heldout_split",
    "node_config_from_context",
    "plan_task",
    "simulated_nodes",
    "training_split",
]
