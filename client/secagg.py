"""The node's side of secure aggregation: setup stages and the mod that masks replies.

Stages (query messages whose config names a ``secagg-stage``; :func:`handle_stage`):

advertise
    Make two fresh X25519 key pairs for the session (share boxes, masks; the mask pair's
    private key is derived from a fresh 16-byte secret); reply with the public halves.
share
    Given the public keys of this node's group (every participant, or in a sparse SecAgg+
    session itself and its neighbours), draw the 16-byte self-mask seed ``b_i``, split
    ``b_i`` and the mask key's secret into Shamir shares (threshold from the coordinator,
    checked to be a majority of the group), and reply with one AES-GCM box per other member
    of the group.
unmask
    Given who sent a masked vector (survivors) and who did not (dropped), open the boxes
    addressed to this node and reveal, per peer, the share of ``b_j`` (survivor) or of its
    mask key (dropped), never both, and only once per session.

Masked release (:func:`secagg_mod`): a train or evaluate message whose config names a
session runs the handler, then replaces the reply's model update, example counts, weighted
metrics and integer sums by one masked ``uint64`` vector (:mod:`common.secagg.layout`). What
stays in the clear: the node's own privacy accounting (epsilon, delta, noise multiplier) and
site name. Privacy caveat: a node's delta and noise multiplier are derived from its patient
count, so they can hint at the count that the masked vector hides.
Everything is kept in ``Context.state`` (it outlives a ClientApp process between messages).
"""

from __future__ import annotations

import math
import struct
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable

from common import messages as k
from common.errors import ConfigError, DataError
from common.secagg import crypto
from common.secagg.encoding import encode
from common.secagg.layout import MAX_COUNT, MAX_EXAMPLES, MAX_METRIC, Layout
from common.secagg.masking import mask

__all__ = ["handle_stage", "is_stage", "secagg_mod"]

STAGES = ("advertise", "share", "unmask")


def _refuse(why: str) -> ConfigError:
    return ConfigError(why, safe_reason=f"secure aggregation: {why}")


def is_stage(msg: Message) -> bool:
    """Whether ``msg`` is a secure-aggregation setup or unmasking request."""
    config = msg.content.get(k.CONFIG)
    return isinstance(config, ConfigRecord) and k.SECAGG_STAGE in config


def _state(context: Context, session: str) -> ConfigRecord:
    state = context.state.get(k.STATE_SECAGG)
    if not isinstance(state, ConfigRecord) or state.get(k.SECAGG_SESSION) != session:
        raise _refuse(f"no setup for session {session!r} on this node")
    return state


def handle_stage(msg: Message, context: Context, site: str) -> Message:
    """Answer one setup or unmasking stage (see the module docstring)."""
    config = cast(ConfigRecord, msg.content[k.CONFIG])
    stage, session = str(config[k.SECAGG_STAGE]), str(config.get(k.SECAGG_SESSION, ""))
    if stage not in STAGES or not session:
        raise _refuse(f"unknown stage {stage!r}")
    me = int(msg.metadata.dst_node_id)
    if stage == "advertise":
        out = _advertise(context, session, int(config[k.SECAGG_THRESHOLD]))
    elif stage == "share":
        out = _share(config, context, session, me)
    else:
        out = _unmask(config, context, session, me)
    content = RecordDict({k.SECAGG: ConfigRecord(out), k.NODE_INFO: ConfigRecord({k.SITE: site})})
    return Message(content=content, reply_to=msg)


def _advertise(context: Context, session: str, threshold: int) -> dict[str, Any]:
    s_secret = crypto.new_secret()
    box, masks = crypto.new_keypair(), crypto.keypair_from_secret(s_secret)
    context.state[k.STATE_SECAGG] = ConfigRecord({
        k.SECAGG_SESSION: session, k.SECAGG_THRESHOLD: threshold,
        # the mask key is kept as its 16-byte secret (what is shared); the key derives from it
        "c-sk": box.private, "s-secret": s_secret, k.SECAGG_C_PK: box.public,
        k.SECAGG_S_PK: masks.public,
    })
    return {k.SECAGG_C_PK: box.public, k.SECAGG_S_PK: masks.public}


def _share(config: ConfigRecord, context: Context, session: str, me: int) -> dict[str, Any]:
    state = _state(context, session)
    if "b" in state:
        raise _refuse("secrets were already shared in this session")
    nodes = [int(n) for n in cast(list[int], config[k.SECAGG_NODES])]
    c_pks = list(cast(list[bytes], config[k.SECAGG_C_PKS]))
    s_pks = list(cast(list[bytes], config[k.SECAGG_S_PKS]))
    threshold = int(cast(int, state[k.SECAGG_THRESHOLD]))
    if len(set(nodes)) != len(nodes) or not len(nodes) == len(c_pks) == len(s_pks):
        raise _refuse("malformed participant list")
    if me not in nodes or (c_pks[nodes.index(me)], s_pks[nodes.index(me)]) != (
            state[k.SECAGG_C_PK], state[k.SECAGG_S_PK]):
        raise _refuse("the participant list does not hold this node's keys")
    if len(nodes) < threshold:
        raise _refuse(f"{len(nodes)} participants, fewer than the threshold {threshold}")
    if threshold < max(2, len(nodes) // 2 + 1):  # a minority could then recover its secrets
        raise _refuse(f"threshold {threshold} is not a majority of {len(nodes)} participants")
    seed = crypto.new_secret()
    b_shares = crypto.share(seed, threshold=threshold, num_shares=len(nodes))
    s_shares = crypto.share(cast(bytes, state["s-secret"]), threshold=threshold,
                            num_shares=len(nodes))
    dest, boxes = [], []
    for idx, peer in enumerate(nodes):
        plain = struct.pack(">H", len(b_shares[idx])) + b_shares[idx] + s_shares[idx]
        if peer == me:
            state["own-b"], state["own-s"] = b_shares[idx], s_shares[idx]
            continue
        dest.append(peer)
        boxes.append(crypto.seal_box(cast(bytes, state["c-sk"]), c_pks[idx], session, me, peer,
                                     plain))
    state.update({"b": seed, k.SECAGG_NODES: nodes, k.SECAGG_C_PKS: c_pks,
                  k.SECAGG_S_PKS: s_pks})
    return {k.SECAGG_DEST: dest, k.SECAGG_BOXES: boxes}


def _unmask(config: ConfigRecord, context: Context, session: str, me: int) -> dict[str, Any]:
    state = _state(context, session)
    if "answered" in state:
        raise _refuse("this session was already unmasked")
    if "u2" not in state:
        raise _refuse("this node sent no masked vector in this session")
    survivors = {int(n) for n in cast(list[int], config[k.SECAGG_SURVIVORS])}
    dropped = {int(n) for n in cast(list[int], config.get(k.SECAGG_DROPPED) or [])}
    u2 = {int(n) for n in cast(list[int], state["u2"])}
    if survivors & dropped or survivors | dropped != u2 or me not in survivors:
        raise _refuse("survivors and dropped nodes do not partition the session's nodes")
    nodes = [int(n) for n in cast(list[int], state[k.SECAGG_NODES])]  # this node's group
    if len(survivors & set(nodes)) < int(cast(int, state[k.SECAGG_THRESHOLD])):
        raise _refuse("fewer survivors in this node's group than the threshold")
    state["answered"] = 1  # before anything is revealed: one answer per session
    c_pks = cast(list[bytes], state[k.SECAGG_C_PKS])
    owners: list[int] = [me]
    shares: list[bytes] = [cast(bytes, state["own-b"])]
    senders = [int(n) for n in cast(list[int], config.get(k.SECAGG_SENDERS) or [])]
    boxes = list(cast(list[bytes], config.get(k.SECAGG_BOXES) or []))
    for sender, box in zip(senders, boxes):
        if sender not in u2 or sender not in nodes or sender == me or sender in owners:
            continue
        plain = crypto.open_box(cast(bytes, state["c-sk"]), c_pks[nodes.index(sender)],
                                session, sender, me, box)
        size = struct.unpack(">H", plain[:2])[0]
        b_share, s_share = plain[2: 2 + size], plain[2 + size:]
        owners.append(sender)
        shares.append(b_share if sender in survivors else s_share)
    return {k.SECAGG_OWNERS: owners, k.SECAGG_SHARES: shares}


# --- the masked release -------------------------------------------------------------------

def _model_segment(layout: Layout, sent: ArrayRecord, trained: ArrayRecord,
                   num_examples: int) -> np.ndarray:
    update = np.concatenate([
        (np.asarray(trained[key].numpy(), dtype=np.float64)
         - np.asarray(sent[key].numpy(), dtype=np.float64)).ravel()
        for key in sent.keys()
    ]) if len(sent) else np.zeros(0)
    if not np.isfinite(update).all():
        raise DataError("non-finite update", safe_reason="secure aggregation: the model update "
                        "is not finite; nothing was released")
    if layout.dp_clip > 0:  # hospital-level DP: clip here, the coordinator never sees it alone
        norm = float(np.linalg.norm(update))
        return update * min(1.0, layout.dp_clip / norm) if norm > 0 else update
    weighted = update * float(num_examples)
    if np.abs(weighted).max(initial=0.0) > layout.model_bound:
        raise DataError("update beyond the ring's bound", safe_reason="secure aggregation: the "
                        "model update exceeds the value bound of the ring; nothing was released")
    return weighted


def _vector(layout: Layout, msg: Message, reply: Message, rng: np.random.Generator) -> np.ndarray:
    metrics = reply.content.get(k.METRICS)
    values: dict[str, Any] = dict(metrics) if isinstance(metrics, MetricRecord) else {}
    num_examples = int(values.get(k.NUM_EXAMPLES, 0))
    if not 0 <= num_examples <= MAX_EXAMPLES:
        raise DataError("too many examples", safe_reason="secure aggregation: the example count "
                        "exceeds the ring's bound; nothing was released")
    parts = []
    if layout.model_length:
        sent, trained = msg.content.get(k.ARRAYS), reply.content.get(k.ARRAYS)
        if not isinstance(sent, ArrayRecord) or not isinstance(trained, ArrayRecord):
            raise _refuse("a masked train reply needs the model")
        parts.append(encode(_model_segment(layout, sent, trained, num_examples),
                            layout.model_bits, rng))
    floats = []
    for key in layout.weighted_keys:
        value = float(values.get(key, 0.0))
        value = 0.0 if not math.isfinite(value) else value
        floats.append(num_examples * max(-MAX_METRIC, min(MAX_METRIC, value)))
    parts.append(encode(np.asarray(floats, dtype=np.float64), layout.float_bits, rng))
    ints, complete = [], 1
    for key, size in zip(layout.int_keys, layout.int_lengths):
        raw = values.get(key)
        cell = np.atleast_1d(np.asarray(raw if raw is not None else np.zeros(size), dtype=np.int64))
        if raw is None or cell.shape != (size,):
            complete, cell = 0, np.zeros(size, dtype=np.int64)
        if (cell < 0).any() or (cell > MAX_COUNT).any():
            raise DataError("count beyond bound", safe_reason="secure aggregation: a count "
                            "exceeds the ring's bound; nothing was released")
        ints.append(cell)
    if not complete:
        ints = [np.zeros(size, dtype=np.int64) for size in layout.int_lengths]
    ints.append(np.asarray([complete], dtype=np.int64))
    parts.append(np.concatenate(ints).view(np.uint64))
    return np.concatenate(parts)


def masked_reply(msg: Message, reply: Message, context: Context) -> Message:
    """``reply`` with its summed quantities replaced by this node's masked vector."""
    config = cast(ConfigRecord, msg.content[k.CONFIG])
    session = str(config[k.SECAGG_SESSION])
    state = _state(context, session)
    if "b" not in state or "u2" in state:
        raise _refuse("no shared secrets for this release, or it was already sent")
    u2 = [int(n) for n in cast(list[int], config[k.SECAGG_NODES])]
    nodes = [int(n) for n in cast(list[int], state[k.SECAGG_NODES])]  # this node's group
    me = int(msg.metadata.dst_node_id)
    group_left = set(u2) & set(nodes)  # in a sparse session u2 also names non-neighbours
    if me not in u2 or len(group_left) < int(cast(int, state[k.SECAGG_THRESHOLD])):
        raise _refuse("the masking set leaves too few of this node's group")
    sent = msg.content.get(k.ARRAYS)
    model_length = (sum(int(np.prod(a.shape)) for a in sent.values())
                    if isinstance(sent, ArrayRecord) and msg.metadata.message_type == MessageType.TRAIN
                    else 0)
    layout = Layout.from_config(config, model_length)
    vector = _vector(layout, msg, reply, np.random.default_rng())
    s_pks = cast(list[bytes], state[k.SECAGG_S_PKS])
    peers = {n: s_pks[nodes.index(n)] for n in sorted(group_left)}
    masked = mask(vector, node=me, self_seed=cast(bytes, state["b"]),
                  mask_private=crypto.keypair_from_secret(cast(bytes, state["s-secret"])).private,
                  peer_publics=peers, session=session)
    state["u2"] = u2
    hidden = {*layout.weighted_keys, *layout.int_keys}
    if model_length:  # a train reply: its example count, and what reveals it, go masked
        hidden |= {k.NUM_EXAMPLES, k.UNIT_WEIGHT, k.SAMPLE_RATE, k.STEPS}
    metrics = reply.content.get(k.METRICS)
    clear = MetricRecord({key: v for key, v in metrics.items() if key not in hidden}
                         if isinstance(metrics, MetricRecord) else {})
    content = RecordDict({k.METRICS: clear,
                          k.SECAGG_MASKED: ArrayRecord({k.SECAGG_VECTOR: Array(masked)})})
    info = reply.content.get(k.NODE_INFO)
    if isinstance(info, ConfigRecord):
        content[k.NODE_INFO] = info
    return Message(content=content, reply_to=msg)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: mask the reply of a train, evaluate or statistics query naming a session.

    Place it inside :func:`client.mods.sanitize_errors_mod` (which turns its refusals into
    safe error replies). Messages without a session pass through unchanged.
    """
    reply = call_next(msg, context)
    config = msg.content.get(k.CONFIG)
    if (msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE,
                                          MessageType.QUERY)
            or not isinstance(config, ConfigRecord) or k.SECAGG_SESSION not in config
            or k.SECAGG_STAGE in config or reply.has_error()):
        return reply
    return masked_reply(msg, reply, context)
