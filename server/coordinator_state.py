"""The coordinator's state folder: how its SuperLink was started, and the hospitals it admits.

``vesalius coordinator`` keeps everything in one folder (default ``$VESALIUS_HOME/coordinator``,
i.e. ``~/.vesalius/coordinator``), owner-only (0700):

``superlink.db``
    Flower's own SuperLink state (runs, registered SuperNodes); it persists across restarts.
``superlink.log``
    The SuperLink's log file.
``certs/``
    The default place of ``ca.crt``, ``server.crt`` and ``server.key``.
``flwr-home/config.toml``
    A Flower CLI connection named ``vesalius`` to this SuperLink, so ``flwr ls``, ``flwr log``
    and ``flwr supernode ...`` work with ``FLWR_HOME=<state dir>/flwr-home``.
``coordinator.json``
    How the SuperLink was last started (:class:`LinkSettings`).
``nodes.json``
    Site name <-> public-key fingerprint <-> Flower node id of every hospital registered here,
    revoked ones included (:class:`NodeRecord`): Flower itself keeps no site name, and a
    refused key can then be named.

Nothing here is patient data: public keys, node ids, site names and settings.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.node_keys import fingerprint
from common.errors import ConfigError

__all__ = [
    "NIST_CURVES",
    "LinkSettings",
    "NodeRecord",
    "NodeRegistry",
    "StatePaths",
    "default_state_dir",
    "fingerprint_of_pem",
    "load_links",
    "load_nodes",
    "now_iso",
    "read_public_key",
    "save_links",
    "save_nodes",
]

#: The NIST curves Flower's ``flwr supernode register`` accepts.
NIST_CURVES = frozenset({"secp192r1", "secp224r1", "secp256r1", "secp384r1", "secp521r1"})


def default_state_dir() -> Path:
    """``$VESALIUS_HOME/coordinator`` (default ``~/.vesalius/coordinator``)."""
    home = os.environ.get("VESALIUS_HOME")
    return (Path(home) if home else Path.home() / ".vesalius").expanduser() / "coordinator"


@dataclass(frozen=True)
class StatePaths:
    """The files of one coordinator state folder."""

    root: Path

    @property
    def database(self) -> Path:
        """Flower's SuperLink database (``--database``)."""
        return self.root / "superlink.db"

    @property
    def log_file(self) -> Path:
        """The SuperLink's log file (``--log-file``)."""
        return self.root / "superlink.log"

    @property
    def certificates(self) -> Path:
        """Default folder of ``ca.crt``, ``server.crt``, ``server.key``."""
        return self.root / "certs"

    @property
    def flwr_home(self) -> Path:
        """``FLWR_HOME`` holding the ``vesalius`` connection to this SuperLink."""
        return self.root / "flwr-home"

    @property
    def links(self) -> Path:
        """``coordinator.json``: how the SuperLink was last started."""
        return self.root / "coordinator.json"

    @property
    def nodes(self) -> Path:
        """``nodes.json``: the registered hospitals."""
        return self.root / "nodes.json"

    def create(self) -> None:
        """Make the folder (owner-only) if it does not exist."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create the coordinator's --state-dir: {exc.strerror}",
                              safe_reason="the state folder could not be created") from None


@dataclass(frozen=True)
class LinkSettings:
    """How the coordinator's SuperLink was started (``coordinator.json``).

    Attributes
    ----------
    address : str
        ``HOST:PORT`` the Flower CLI reaches it at from this machine.
    tls : bool
        Whether it serves TLS (``False`` only with ``--insecure``).
    node_auth : bool
        Whether only registered SuperNodes are admitted (``--enable-supernode-auth``).
    ca_cert : str
        The CA certificate (absolute path) the connection trusts; ``""`` without TLS.
    """

    address: str
    tls: bool
    node_auth: bool
    ca_cert: str = ""


@dataclass(frozen=True)
class NodeRecord:
    """One hospital admitted by this coordinator.

    Attributes
    ----------
    site : str
        The name the operator registered it under.
    fingerprint : str
        ``SHA256:...`` of its public key (as ``ssh-keygen -l`` and ``vesalius node keys`` print).
    node_id : str
        Flower's node id (a decimal string: it does not fit a JSON double).
    public_key : str
        The OpenSSH public-key line.
    registered_at : str
        ISO time (UTC) of the registration.
    revoked_at : str
        ISO time of ``vesalius coordinator unregister``; ``""`` while admitted.
    """

    site: str
    fingerprint: str
    node_id: str
    public_key: str
    registered_at: str
    revoked_at: str = ""

    @property
    def active(self) -> bool:
        """Whether the node is still admitted."""
        return not self.revoked_at

    def revoked(self) -> NodeRecord:
        """This record marked revoked now."""
        return replace(self, revoked_at=now_iso())


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _atomic_write(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise ConfigError(f"the coordinator's {what} cannot be read; restore it from a backup "
                          "or remove it to start afresh",
                          safe_reason="coordinator state unreadable") from None


def save_links(paths: StatePaths, settings: LinkSettings) -> None:
    """Write ``coordinator.json``."""
    _atomic_write(paths.links, asdict(settings))


def load_links(paths: StatePaths) -> LinkSettings:
    """How the coordinator's SuperLink was started.

    Raises
    ------
    ConfigError
        No coordinator was ever started with this state folder.
    """
    doc = _read_json(paths.links, "coordinator.json")
    if doc is None:
        raise ConfigError("no coordinator was started with this --state-dir: run `vesalius "
                          "coordinator start` (with the same --state-dir) first",
                          safe_reason="no coordinator state")
    try:
        return LinkSettings(address=str(doc["address"]), tls=bool(doc["tls"]),
                            node_auth=bool(doc["node_auth"]), ca_cert=str(doc.get("ca_cert", "")))
    except (KeyError, TypeError):
        raise ConfigError("the coordinator's coordinator.json is incomplete; start the "
                          "coordinator again to rewrite it",
                          safe_reason="coordinator state unreadable") from None


@dataclass
class NodeRegistry:
    """The hospitals registered with this coordinator (``nodes.json``), revoked ones kept."""

    records: list[NodeRecord] = field(default_factory=list)

    def active(self, site: str) -> NodeRecord | None:
        """The admitted node registered as ``site`` (the latest), if any."""
        return next((r for r in reversed(self.records) if r.site == site and r.active), None)

    def by_fingerprint(self, value: str) -> NodeRecord | None:
        """The latest record of the key with this fingerprint, if any."""
        found = [r for r in self.records if r.fingerprint == value]
        return found[-1] if found else None

    def by_node_id(self, node_id: str) -> NodeRecord | None:
        """The latest record of a Flower node id, if any."""
        found = [r for r in self.records if r.node_id == str(node_id)]
        return found[-1] if found else None


def load_nodes(paths: StatePaths) -> NodeRegistry:
    """Read ``nodes.json`` (an empty registry when there is none)."""
    doc = _read_json(paths.nodes, "nodes.json")
    if doc is None:
        return NodeRegistry()
    try:
        return NodeRegistry([NodeRecord(**row) for row in doc["nodes"]])
    except (KeyError, TypeError):
        raise ConfigError("the coordinator's nodes.json is not in the expected form; restore it "
                          "from a backup", safe_reason="coordinator state unreadable") from None


def save_nodes(paths: StatePaths, registry: NodeRegistry) -> None:
    """Write ``nodes.json`` atomically."""
    _atomic_write(paths.nodes, {"nodes": [asdict(r) for r in registry.records]})


def read_public_key(path: Path) -> tuple[str, str]:
    """The OpenSSH line and fingerprint of a hospital's public key file.

    Only what ``flwr supernode register`` accepts passes: an elliptic-curve key on a NIST
    curve in OpenSSH format (``vesalius node keys`` makes one: ``node-key.pub``).

    Raises
    ------
    ConfigError
        The file is missing, unreadable or not such a key (one sentence, no path).
    """
    try:
        data = path.expanduser().read_bytes()
    except OSError:
        raise ConfigError("the --public-key file cannot be read: give the hospital's "
                          "node-key.pub (made by `vesalius node keys`)",
                          safe_reason="public key unreadable") from None
    line = data.strip().splitlines()[0] if data.strip() else b""
    try:
        key = serialization.load_ssh_public_key(line)
    except (ValueError, UnsupportedAlgorithm, IndexError):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise ConfigError("the --public-key file is not an OpenSSH elliptic-curve public key "
                          "on a NIST curve: give the hospital's node-key.pub made by `vesalius "
                          "node keys` (never its private node-key)",
                          safe_reason="not a node public key")
    public = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode("ascii"), fingerprint(public)


def fingerprint_of_pem(pem: bytes) -> str | None:
    """``SHA256:...`` of a PEM public key (as the SuperLink logs a refused one); None if unreadable."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    return fingerprint(key.public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH))
