"""The node's Ed25519 signing key (``cryptography``; no hand-written crypto).

The private key lives in ``node-key.pem`` (PKCS#8 PEM, unencrypted, mode 0600, in a folder
of mode 0700 when this module creates it) and the public key beside it in ``node-key.pub``
(SubjectPublicKeyInfo PEM) for auditors. A key is made at first use and never overwritten.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.ledger.errors import LedgerError

__all__ = [
    "key_id",
    "load_or_create_private_key",
    "load_private_key",
    "load_public_key",
    "public_key_path",
    "sign",
    "verify_signature",
]

log = logging.getLogger(__name__)


def public_key_path(key_path: Path) -> Path:
    """``node-key.pem`` -> ``node-key.pub``."""
    return key_path.with_suffix(".pub")


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of SHA-256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(key_path: Path) -> Ed25519PrivateKey:
    """Load the node's private key.

    Raises
    ------
    LedgerError
        If the file is missing or is not an Ed25519 private key.
    """
    try:
        data = key_path.read_bytes()
    except FileNotFoundError:
        raise LedgerError(f"no node key at {key_path}; it is made at the node's first release")
    except OSError as exc:
        raise LedgerError(f"cannot read node key {key_path}: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise LedgerError(f"{key_path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{key_path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_or_create_private_key(key_path: Path) -> Ed25519PrivateKey:
    """Load the key, or make one (0600) if none exists; never overwrite an existing file.

    The key is written whole to a private temporary file and hard-linked into place, so a
    crash never leaves a partial key and two processes racing to make one end up sharing the
    one that won (``O_CREAT | O_EXCL`` where the filesystem has no hard links). The public key file is (re)written when it is missing.
    """
    if not key_path.exists():
        _make_private_dir(key_path.parent)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Write a complete key to a private temporary file, then hard-link it into place:
        # the link either appears whole or not at all (a crash never leaves a partial PEM),
        # and it fails if another process made the key first (then we use theirs).
        fd, tmp_name = tempfile.mkstemp(dir=key_path.parent, prefix=".node-key-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp_name, 0o600)
            try:
                os.link(tmp_name, key_path)
            except FileExistsError:
                pass  # another process made it first: use theirs
            except OSError:
                # No hard links on this filesystem (some SMB/FUSE mounts): exclusive create
                # and write instead (a crash in between can leave a partial key to remove).
                _create_exclusive(key_path, pem)
            else:
                _fsync_dir(key_path.parent)
                log.info("made a new node signing key at %s", key_path)
        finally:
            os.unlink(tmp_name)
    key = load_private_key(key_path)
    pub_path = public_key_path(key_path)
    if not pub_path.exists():
        tmp = pub_path.with_suffix(".pub.tmp")
        tmp.write_bytes(_public_pem(key.public_key()))
        os.replace(tmp, pub_path)
    return key


def _create_exclusive(key_path: Path, pem: bytes) -> None:
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process made it first: use theirs
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    log.info("made a new node signing key at %s", key_path)


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _make_private_dir(folder: Path) -> None:
    if folder.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)


def load_public_key(source: Path | bytes) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file or PEM bytes.

    A private-key PEM is accepted too (its public half is used).

    Raises
    ------
    LedgerError
        If the source is missing or not an Ed25519 key.
    """
    if isinstance(source, Path):
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise LedgerError(f"cannot read public key {source}: {exc}") from exc
    else:
        data = source
    try:
        if b"PRIVATE KEY" in data:
            private = serialization.load_pem_private_key(data, password=None)
            key: object = private.public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise LedgerError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"the public key is a {type(key).__name__}, not Ed25519")
    return key


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """PEM of the public half of ``key``."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return _public_pem(pub)


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    """Base64 Ed25519 signature of ``data``."""
    return base64.b64encode(key.sign(data)).decode("ascii")


def verify_signature(key: Ed25519PublicKey, data: bytes, signature: str) -> bool:
    """True when ``signature`` (base64) is a valid signature of ``data`` by ``key``."""
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
        # base64 ignores the unused low bits of the last character: demand the canonical
        # encoding, so that no edited character of the signature goes unseen.
        if base64.b64encode(raw).decode("ascii") != signature:
            return False
        key.verify(raw, data)
    except (InvalidSignature, ValueError, UnicodeEncodeError):
        return False
    return True
