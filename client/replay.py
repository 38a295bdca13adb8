"""A node's last training replies, kept so that a round asked again is answered again, not re-run.

When the coordinator dies after a node trained a round, the resumed run asks for that round
again with the same global model (the last checkpoint). Training again would draw fresh DP
noise: a second release of the same round, charged again to the hospital's budget. Sending
back the reply already released costs nothing more — it is the same output — so the node
keeps each training reply (model weights and the numbers it released, never patient data)
under the round's key and a digest of everything the round's input holds (the plan and the
received weights). A request whose digest matches is answered from here; anything else
(another model, another plan) trains and is charged as usual.

Replies live beside the node's ledger (``<ledger dir>/replies``), owner-only, written
atomically, as ``.npz`` without pickles; a damaged file is ignored (the round then trains).
Only the last few rounds of a run are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

log = logging.getLogger(__name__)

KEEP_PER_RUN = 3
_META = "__meta__"


def request_digest(arrays: ArrayRecord, plan_record: Mapping[str, object]) -> str:
    """SHA-256 over the plan (sorted keys) and every received tensor (name, dtype, shape, bytes).

    Secure-aggregation session keys (``secagg-*``) are left out: a resumed run opens a new
    session, and the resent reply is masked afresh for it by the node's secure-aggregation mod.
    """
    h = hashlib.sha256()
    plan = {str(k): str(v) for k, v in plan_record.items() if not str(k).startswith("secagg")}
    h.update(json.dumps(plan, sort_keys=True).encode())
    for name, tensor in arrays.to_torch_state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ReplyStore:
    """Training replies of one node, by (dataset, run, fold, round)."""

    def __init__(self, ledger_dir: Path) -> None:
        self.root = ledger_dir / "replies"

    def _path(self, fingerprint: str, run_id: str, fold: int | None, server_round: int) -> Path:
        name = hashlib.sha256(f"{fingerprint}|{run_id}|{fold}".encode()).hexdigest()[:24]
        return self.root / f"{name}-r{server_round}.npz"

    def get(self, fingerprint: str, run_id: str, fold: int | None, server_round: int,
            digest: str) -> tuple[dict[str, torch.Tensor], dict[str, float | int]] | None:
        """The reply released for this round and input, or None."""
        path = self._path(fingerprint, run_id, fold, server_round)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(bytes(npz[_META]).decode())
                if meta.get("digest") != digest:
                    return None
                state = {name: torch.from_numpy(np.array(npz[f"t{i}"]))
                         for i, name in enumerate(meta["names"])}
            return state, dict(meta["metrics"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("a stored training reply could not be read; the round trains again")
            return None

    def put(self, fingerprint: str, run_id: str, fold: int | None, server_round: int,
            digest: str, state: Mapping[str, torch.Tensor],
            metrics: Mapping[str, float | int]) -> None:
        """Keep a reply that was released (best effort: a failure only costs a re-run)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
            names = list(state)
            meta = {"digest": digest, "names": names,
                    "metrics": {k: (float(v) if isinstance(v, float) else int(v))
                                for k, v in metrics.items() if isinstance(v, (int, float))}}
            arrays = {f"t{i}": state[name].detach().cpu().numpy() for i, name in enumerate(names)}
            arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
            path = self._path(fingerprint, run_id, fold, server_round)
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
            self._prune(path, server_round)
        except OSError as exc:
            log.warning("could not keep the training reply (%s); a repeated round would train "
                        "again", type(exc).__name__)

    def _prune(self, path: Path, server_round: int) -> None:
        prefix = path.name.rsplit("-r", 1)[0]
        for old in self.root.glob(f"{prefix}-r*.npz"):
            try:
                r = int(old.stem.rsplit("-r", 1)[1])
            except ValueError:
                continue
            if r <= server_round - KEEP_PER_RUN:
                old.unlink(missing_ok=True)
