"""The node's ``query`` handler: answer a statistics query with released sums only.

Flow for one QUERY message (no statistic is computed before step 4):

1. Parse the config record: query name (``query``), the run's plan, the held-out split
   (``val``, ``test`` or ``heldout`` for a cross-validation fold) and the query's parameters.
2. Look the query up in the registry (:mod:`client.queries.registry`) and let it declare its
   statistics (keys, shapes, sensitivities).
3. Load the data (the clinical table, or the images of the held-out split: loaded, not yet
   scored) for its fingerprint and patient count, and authorise the release
   (:meth:`client.release.ReleaseGuard.authorize`): a noised release over the node's epsilon
   cap, or an exact release with fewer patients than ``min-release-count``, is refused here.
4. Compute the sums and release them through the guard (noise and ledger charge, or small-cell
   suppression), then reply with a MetricRecord of sums and the node's site name. Inside a
   secure-aggregation session the released values are re-encoded as exact integers for
   masking (:mod:`client.queries.secure_release`).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

import client.queries  # noqa: F401  (registers every query family)
from client.data.tabular import TabularData, load_tabular
from client.queries.registry import QueryRequest, get_query
from client.queries.scoring import HeldOutImages
from client.queries.secure_release import encode_for_secure_sum, is_secure_release
from client.release import ReleaseGuard, file_fingerprint
from common import messages as k
from common.config import NodeConfig, TrainPlan
from common.errors import ConfigError, DataError

__all__ = ["HeldOutImages", "handle_query"]

SPLITS = (k.SPLIT_VAL, k.SPLIT_TEST, k.SPLIT_HELDOUT, k.SPLIT_TRAIN)


def _request(msg: Message, node: NodeConfig) -> QueryRequest:
    config = msg.content.get(k.CONFIG)
    if not isinstance(config, ConfigRecord):
        raise ConfigError("query without config record", safe_reason="malformed message: no config")
    name = config.get(k.QUERY)
    if not isinstance(name, str) or not name:
        raise ConfigError("query message without a query name",
                          safe_reason="malformed query: no 'query' name")
    split = str(config.get(k.SPLIT, k.SPLIT_VAL))
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}",
                          safe_reason=f"malformed query: split must be one of {', '.join(SPLITS)}")
    plan = TrainPlan.from_record(dict(config))
    return QueryRequest(name=name, node=node, plan=plan, split=split, config=config,
                        content=msg.content)


def _tabular(req: QueryRequest) -> tuple[TabularData, str]:
    path = req.node.tabular_path
    data = load_tabular(path)  # refuses a node without tabular-path
    return data, file_fingerprint(path or "")


def _images(req: QueryRequest) -> tuple[HeldOutImages, str]:
    # Imported here: client.app imports this module (the ClientApp wires the handler).
    from client import app as client_app

    node, plan = req.node, req.plan
    data = client_app._load(node, plan)
    split = (client_app.training_split(node, plan, data) if req.split == k.SPLIT_TRAIN
             else client_app.heldout_split(node, plan, data, req.split))
    if split.num_patients == 0:
        raise DataError(f"empty {req.split} split",
                        safe_reason=f"the node has no patients in its {req.split} split")
    return HeldOutImages(split=split, device=client_app._device(node)), data.fingerprint


def handle_query(msg: Message, context: Context, node: NodeConfig) -> Message:
    """Answer a statistics query (see the module docstring); reply with sums only."""
    del context  # statistics queries keep no per-run state on the node
    req = _request(msg, node)
    query = get_query(req.name)
    if query.source == "images" and req.split not in query.splits:
        raise ConfigError(
            f"query {req.name!r} on split {req.split!r}",
            safe_reason=f"malformed query: {req.name!r} uses split {' or '.join(query.splits)}",
        )
    statistics = query.statistics(req)
    data: Any
    if query.source == "tabular":
        data, fingerprint = _tabular(req)
        num_patients = data.num_patients
    else:
        data, fingerprint = _images(req)
        num_patients = int(data.split.num_patients)
    guard = ReleaseGuard(
        node=node, query=req.name, statistics=statistics, num_patients=num_patients,
        fingerprint=fingerprint, run_id=req.plan.run_id,
        fold=req.plan.fold if req.plan.cv_mode != "none" else None,
        noise_multiplier=query.noise_multiplier(req, num_patients),
    )
    guard.authorize()
    released = guard.release(query.compute(req, data))
    values: dict[str, Any] = dict(released.values)
    values[k.NOISED] = int(released.noised)
    values[k.SUPPRESSED_CELLS] = int(released.suppressed_cells)
    if released.epsilon_after is not None:
        values[k.EPSILON] = float(released.epsilon_after)
    if is_secure_release(req.config):  # masked next by client.secagg.secagg_mod
        values = encode_for_secure_sum(values, req.config)
    from client import app as client_app
    from client.privacy_guard import NodeBudget

    # Site name and the ledger head after this release (the coordinator keeps it as an anchor).
    info = client_app._node_info(node, NodeBudget.for_node(node))
    content = RecordDict({k.METRICS: MetricRecord(values), k.NODE_INFO: info})
    return Message(content=content, reply_to=msg)
