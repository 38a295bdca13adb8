"""The coordinator's side of one secure-aggregation session (Bonawitz et al., CCS 2017).

A session turns one masked release (a round's train replies, an evaluation's histograms, any
integer sums) into the sum over the nodes that survived, through the grid:

1. advertise: every participant sends two public keys (``U1`` answer);
2. share: ``U1`` receive each other's keys and send AES-GCM boxes of Shamir shares (``U2``);
3. masked input: the caller sends its own messages with :meth:`SecAggSession.input_config`
   in their config; the node mod masks the replies (``U3`` = masked vectors that arrived);
4. unmask: ``U3`` receive the boxes addressed to them and reveal the shares of survivors'
   self-mask seeds and of dropped nodes' mask keys (``U4`` answer); the coordinator
   recombines them and removes the masks from the sum.

Below ``threshold`` nodes at any stage the session is abandoned and :attr:`record` says at
which stage and who dropped; nothing about any node's vector is learned then.

Beyond :data:`common.secagg.params.SLOW_ABOVE` nodes the session is SecAgg+'s (Bell et al.,
CCS 2020): after the keys are advertised the coordinator draws a random neighbour graph
(:mod:`common.secagg.graph`), each node shares its secrets only within its group (itself and
its :data:`~common.secagg.params.NEIGHBOURS` neighbours, a majority of the group recovers
them) and masks only towards its neighbours; before unmasking the coordinator checks that
the survivors are still connected in that graph, or abandons the session.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import messages as k
from common.secagg import crypto
from common.secagg.graph import connected, neighbourhoods
from common.secagg.layout import Layout
from common.secagg.masking import unmask
from common.secagg.params import group_threshold, neighbour_count
from common.secagg.params import threshold as secagg_threshold
from server.strategies.fedavg import site_of_error

__all__ = ["SecAggSession", "SecureSum", "masked_vectors", "secure_sum"]

log = logging.getLogger(__name__)


class SecAggSession:
    """One session over ``nodes`` (see the module docstring).

    Parameters
    ----------
    grid : Grid
        Where the stage messages go.
    nodes : list of int
        The participants (the nodes the release is asked of).
    session : str
        Unique name within the run (e.g. ``"train-3"``); binds every key and box to it.
    min_survivors : int
        The run config's minimum survivors (0 = default); the threshold is at least this and
        a strict majority (:func:`common.secagg.params.threshold`).
    timeout : float
        Seconds to wait for each stage's replies.
    neighbours : int, optional
        The run config's ``secagg-neighbours`` (0 = default,
        :func:`common.secagg.params.neighbour_count`).
    """

    def __init__(self, grid: Grid, nodes: list[int], session: str, *, min_survivors: int,
                 timeout: float, neighbours: int = 0) -> None:
        self.grid = grid
        self.nodes = sorted(int(n) for n in nodes)
        self.session = session
        self.timeout = timeout
        self.threshold = secagg_threshold(len(self.nodes), min_survivors)
        self.neighbours = neighbour_count(len(self.nodes), neighbours)
        self.sparse = self.neighbours < len(self.nodes) - 1
        # shares that recover one node's secret: the session's threshold when every node
        # shares with every other, a majority of its group in a sparse session
        self.share_threshold = (group_threshold(self.neighbours + 1) if self.sparse
                                else self.threshold)
        self.graph: dict[int, list[int]] = {}
        self.sites: dict[int, str] = {}
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.u2: list[int] = []
        self.boxes: dict[tuple[int, int], bytes] = {}  # (sender, recipient) -> box
        self.record: dict[str, Any] = {"session": session, "participants": len(self.nodes),
                                       "threshold": self.threshold, "status": "running",
                                       "dropped": []}
        if self.sparse:
            self.record.update(neighbours=self.neighbours, share_threshold=self.share_threshold)

    # --- plumbing ---------------------------------------------------------------------------
    def _ask(self, stage: str, configs: Mapping[int, dict[str, Any]]) -> dict[int, ConfigRecord]:
        messages = [
            Message(content=RecordDict({k.CONFIG: ConfigRecord({
                k.SECAGG_STAGE: stage, k.SECAGG_SESSION: self.session, **extra})}),
                message_type=MessageType.QUERY, dst_node_id=node)
            for node, extra in configs.items()
        ]
        answers: dict[int, ConfigRecord] = {}
        for reply in self.grid.send_and_receive(messages=messages, timeout=self.timeout):
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                self.sites.setdefault(node, site_of_error(reply))
                continue
            info, record = reply.content.get(k.NODE_INFO), reply.content.get(k.SECAGG)
            if isinstance(info, ConfigRecord) and k.SITE in info:
                self.sites[node] = str(info[k.SITE])
            if isinstance(record, ConfigRecord) and node in configs:
                answers[node] = record
        return answers

    def site(self, node: int) -> str:
        """The site name a node gave (or ``node-<id>``)."""
        return self.sites.get(node, f"node-{node}")

    def _survive(self, stage: str, before: list[int], after: list[int]) -> bool:
        gone = [n for n in before if n not in after]
        self.record["dropped"] += [{"site": self.site(n), "node_id": n, "stage": stage}
                                   for n in gone]
        self.record["survivors"] = len(after)
        if len(after) >= self.threshold:
            return True
        self.record.update(status="abandoned", stage=stage, reason=(
            f"secure aggregation abandoned at {stage}: {len(after)} of {len(self.nodes)} "
            f"node(s) left, fewer than the minimum of {self.threshold} survivors"))
        log.warning("%s: %s", self.session, self.record["reason"])
        return False

    # --- stages -----------------------------------------------------------------------------
    def setup(self) -> bool:
        """Advertise keys and share secrets; False when the session was abandoned."""
        if not self._survive("start", self.nodes, self.nodes):
            return False
        ads = self._ask("advertise", {n: {k.SECAGG_THRESHOLD: self.share_threshold}
                                      for n in self.nodes})
        for node, rec in ads.items():
            c_pk, s_pk = rec.get(k.SECAGG_C_PK), rec.get(k.SECAGG_S_PK)
            if isinstance(c_pk, bytes) and isinstance(s_pk, bytes):
                self.keys[node] = (c_pk, s_pk)
        u1 = sorted(self.keys)
        if not self._survive("key advertisement", self.nodes, u1):
            return False
        self.graph = neighbourhoods(u1, self.neighbours)
        shared = self._ask("share", {n: self._roster(n) for n in u1})
        for node, rec in shared.items():
            dest = [int(d) for d in cast(list[int], rec.get(k.SECAGG_DEST) or [])]
            boxes = list(cast(list[bytes], rec.get(k.SECAGG_BOXES) or []))
            if sorted(dest) != self.graph[node] or len(boxes) != len(dest):
                continue  # a malformed answer counts as a dropout
            self.boxes.update({(node, d): box for d, box in zip(dest, boxes)})
            self.u2.append(node)
        self.u2.sort()
        return self._survive("key sharing", u1, self.u2)

    def _roster(self, node: int) -> dict[str, Any]:
        """The share stage's config for ``node``: its group (itself and its neighbours) and
        their public keys."""
        group = sorted([node, *self.graph[node]])
        return {k.SECAGG_NODES: group, k.SECAGG_C_PKS: [self.keys[n][0] for n in group],
                k.SECAGG_S_PKS: [self.keys[n][1] for n in group]}

    def input_config(self, layout: Layout) -> dict[str, Any]:
        """Config entries that make a node mask its reply in this session."""
        return {k.SECAGG_SESSION: self.session, k.SECAGG_NODES: list(self.u2),
                **layout.to_config()}

    def finish(self, masked: Mapping[int, np.ndarray]) -> np.ndarray | None:
        """The unmasked sum of the survivors' vectors (uint64), or None when abandoned."""
        u3 = sorted(n for n in masked if n in self.u2)
        if not self._survive("masked input", self.u2, u3):
            return None
        dropped = [n for n in self.u2 if n not in u3]
        if not connected(u3, self.graph):
            # the survivors' masks would cancel within each part: each part's sum would show
            self.record.update(status="abandoned", stage="masked input", reason=(
                "secure aggregation abandoned at masked input: the surviving hospitals no "
                "longer form one connected group of neighbours, so partial sums could show"))
            log.warning("%s: %s", self.session, self.record["reason"])
            return None
        configs = {}
        for node in u3:
            senders = [s for s in self.u2 if (s, node) in self.boxes]
            configs[node] = {k.SECAGG_SURVIVORS: u3, k.SECAGG_DROPPED: dropped,
                             k.SECAGG_SENDERS: senders,
                             k.SECAGG_BOXES: [self.boxes[(s, node)] for s in senders]}
        answers = self._ask("unmask", configs)
        u4 = sorted(answers)
        if not self._survive("unmasking", u3, u4):
            return None
        shares: dict[int, list[bytes]] = {n: [] for n in self.u2}
        for rec in answers.values():
            owners = cast(list[int], rec.get(k.SECAGG_OWNERS) or [])
            for owner, piece in zip(owners, cast(list[bytes], rec.get(k.SECAGG_SHARES) or [])):
                if int(owner) in shares:
                    shares[int(owner)].append(piece)
        short = [n for n, got in shares.items() if len(got) < self.share_threshold]
        if short:
            self.record.update(status="abandoned", stage="unmasking", reason=(
                f"secure aggregation abandoned at unmasking: too few shares for "
                f"{', '.join(self.site(n) for n in short)}"))
            return None
        recovered = {n: crypto.combine(shares[n][: self.share_threshold]) for n in self.u2}
        total = np.zeros_like(next(iter(masked.values())), dtype=np.uint64)
        for node in u3:
            total += np.asarray(masked[node], dtype=np.uint64)
        out = unmask(total, self_seeds={n: recovered[n] for n in u3},
                     dropped_privates={n: crypto.keypair_from_secret(recovered[n]).private
                                       for n in dropped},
                     survivor_publics={n: self.keys[n][1] for n in u3}, session=self.session,
                     neighbours=self.graph)
        self.record.update(status="ok", survivors=len(u3))
        return out


def masked_vectors(replies: Iterable[Message], layout: Layout) -> dict[int, np.ndarray]:
    """Node id -> its masked vector, for the replies that carry one of the layout's length."""
    out = {}
    for msg in replies:
        record = None if msg.has_error() else msg.content.get(k.SECAGG_MASKED)
        if isinstance(record, ArrayRecord) and k.SECAGG_VECTOR in record:
            vector = record[k.SECAGG_VECTOR].numpy()
            if vector.dtype == np.uint64 and vector.shape == (layout.length,):
                out[int(msg.metadata.src_node_id)] = vector
    return out


def with_session(messages: Iterable[Message], session: SecAggSession, layout: Layout
                 ) -> list[Message]:
    """Copies of ``messages`` to the session's nodes, their config extended with the session.

    Flower's strategies share one RecordDict between the messages of a round: each copy gets
    its own content and config.
    """
    out = []
    for msg in messages:
        node = int(msg.metadata.dst_node_id)
        if node not in session.u2:
            continue
        config = ConfigRecord({**dict(cast(ConfigRecord, msg.content[k.CONFIG])),
                               **session.input_config(layout)})
        content = RecordDict({key: value for key, value in msg.content.items()
                              if key != k.CONFIG})
        content[k.CONFIG] = config
        out.append(Message(content=content, message_type=msg.metadata.message_type,
                           dst_node_id=node))
    return out


@dataclass
class SecureSum:
    """What :func:`secure_sum` learned: the sums (None when abandoned) and how it went."""

    sums: dict[str, np.ndarray] | None
    contributors: int
    record: dict[str, Any]
    replies: list[Message] = field(default_factory=list)


def secure_sum(grid: Grid, messages: Sequence[Message], *, int_keys: Sequence[str],
               int_lengths: Sequence[int], min_survivors: int = 0, timeout: float = 600.0,
               neighbours: int = 0) -> SecureSum:
    """Ask ``messages`` (train, evaluate or statistics queries) and sum integer metrics securely.

    The nodes' replies carry the integer metrics ``int_keys`` (lengths ``int_lengths``:
    counts, histograms) masked; the coordinator learns only their sum over the survivors,
    and ``contributors``, how many of them filled all the keys (a node that leaves one out
    adds zeros). The other metrics of the replies stay as the nodes sent them (``replies``).
    """
    nodes = [int(m.metadata.dst_node_id) for m in messages]
    session = SecAggSession(grid, nodes, f"sum-{secrets.token_hex(6)}",
                            min_survivors=min_survivors, timeout=timeout, neighbours=neighbours)
    if not session.setup():
        return SecureSum(None, 0, session.record)
    layout = Layout.plan(num_nodes=len(session.u2), model_length=0, dp_clip=0.0,
                         int_keys=int_keys, int_lengths=int_lengths)
    replies = list(grid.send_and_receive(messages=with_session(messages, session, layout),
                                         timeout=timeout))
    total = session.finish(masked_vectors(replies, layout))
    if total is None:
        return SecureSum(None, 0, session.record, replies)
    _, _, sums, contributors = layout.split(total)
    return SecureSum(sums, contributors, session.record, replies)
