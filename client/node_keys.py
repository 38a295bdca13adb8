"""A hospital node's key pair for SuperNode authentication (``vesalius node keys``).

With node authentication on, the coordinator admits only SuperNodes whose public key it has
registered (Flower's CLI-managed SuperNode authentication: ``flower-superlink
--enable-supernode-auth`` and ``flwr supernode register``); each SuperNode signs its
requests with its private key (``flower-supernode --auth-supernode-private-key``, which
``vesalius node start --auth-private-key`` passes on). Flower reads the private key with
``cryptography``'s ``load_ssh_private_key`` and requires an elliptic-curve key on a NIST
curve in OpenSSH format for the public one; this module makes exactly that, a SECP384R1 pair
(the curve of Flower's own guide), with the ``cryptography`` package: no primitive of our own.

The private key is written owner-only (0600) with ``O_EXCL``, so an existing key is never
replaced by accident: a hospital that loses its key must say so (``force``) and register the
new public key again. Only the public key and its fingerprint ever leave the hospital.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import ConfigError

__all__ = ["PRIVATE_KEY_NAME", "PUBLIC_KEY_NAME", "NodeKeys", "fingerprint", "make_node_keys"]

PRIVATE_KEY_NAME = "node-key"
"""File name of the private key (OpenSSH format, owner-only)."""
PUBLIC_KEY_NAME = "node-key.pub"
"""File name of the public key (one OpenSSH line), the one the coordinator registers."""


@dataclass(frozen=True)
class NodeKeys:
    """Where a node's key pair was written, and the public key's fingerprint."""

    private_key: Path
    public_key: Path
    fingerprint: str


def fingerprint(public_line: bytes) -> str:
    """``SHA256:<base64>`` of the key blob of one OpenSSH public-key line (as ``ssh-keygen
    -l`` prints it), so a hospital and the coordinator can compare keys by voice or mail."""
    blob = base64.b64decode(public_line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _write(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(path, flags, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # O_CREAT's mode is masked by the umask; replace keeps the old mode


def make_node_keys(out_dir: str | Path, *, comment: str = "vesalius-node",
                   force: bool = False) -> NodeKeys:
    """Create ``out_dir/node-key`` (0600) and ``out_dir/node-key.pub`` (0644).

    Raises
    ------
    ConfigError
        A key file already exists and ``force`` is not set (it is never overwritten
        silently), or the folder cannot be written.
    """
    folder = Path(out_dir).expanduser()
    private_path, public_path = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    existing = [p.name for p in (private_path, public_path) if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{', '.join(existing)} already exist(s) in the --out folder; a node key is never "
            "replaced silently: keep it, or give --force to make a new pair (the coordinator "
            "must then register the new public key)",
            safe_reason="refused: the node key already exists")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        line = public + b" " + comment.replace(" ", "-").encode("ascii", "replace") + b"\n"
        _write(private_path, private, 0o600, replace=force)
        _write(public_path, line, 0o644, replace=force)
    except OSError as exc:
        raise ConfigError(f"cannot write the node key: {exc.strerror}",
                          safe_reason="the node key could not be written") from None
    return NodeKeys(private_key=private_path.resolve(), public_key=public_path.resolve(),
                    fingerprint=fingerprint(line))
