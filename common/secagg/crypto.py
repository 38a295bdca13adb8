"""The cryptography of secure aggregation, composed from vetted primitives only.

* Key agreement: X25519 (``cryptography``), one pair for the share boxes and one for masks.
  The mask pair's private key is derived by HKDF-SHA256 from a 16-byte secret
  (:func:`keypair_from_secret`), which is what the node secret-shares.
* Seeds and box keys: HKDF-SHA256 of the X25519 shared secret, bound to the session.
* Share boxes: AES-256-GCM with a random 96-bit nonce; the additional data names the session,
  the sender and the recipient, so a box cannot be replayed in another session or redirected.
* Mask generator: AES-CTR keystream under the seed (a PRG), read as ``uint64``: AES-256 for
  the 32-byte pairwise seeds, AES-128 for the 16-byte self-mask seeds.
* Threshold secret sharing: pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir`` in
  GF(2^128), the library Flower's own Shamir helpers wrap (it is installed with the pinned
  ``flwr``). The shared secrets are 16 bytes (:data:`SECRET_BYTES`, 128 bits, X25519's
  security level), exactly one field element: Flower's helpers pad a secret to whole 16-byte
  blocks plus one (a 32-byte secret becomes three elements) and start a thread pool per call,
  and pycryptodome's arithmetic is pure Python, so sharing one element instead of three cut
  each session's sharing and recovery about threefold (``bench/RESULTS.md``).
"""

from __future__ import annotations

import functools
import os
import struct

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from Crypto.Protocol.SecretSharing import Shamir

from common.errors import ConfigError

__all__ = [
    "KeyPair",
    "combine",
    "expand",
    "keypair_from_secret",
    "new_keypair",
    "new_secret",
    "open_box",
    "pairwise_seed",
    "seal_box",
    "share",
]

SEED_BYTES = 32
SECRET_BYTES = 16
"""Size of the secrets a node shares: its self-mask seed and its mask key's secret."""
_NONCE_BYTES = 12
_RAW = serialization.Encoding.Raw


class KeyPair:
    """An X25519 key pair, kept as raw bytes so that it fits a Flower ConfigRecord."""

    def __init__(self, private: bytes) -> None:
        self.private = private
        key = X25519PrivateKey.from_private_bytes(private)
        self.public = key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def new_keypair() -> KeyPair:
    """A fresh X25519 key pair."""
    raw = X25519PrivateKey.generate().private_bytes(
        _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return KeyPair(raw)


def new_secret() -> bytes:
    """A fresh 16-byte secret from OS entropy (a self-mask seed or a mask key's secret)."""
    return os.urandom(SECRET_BYTES)


def keypair_from_secret(secret: bytes) -> KeyPair:
    """The X25519 key pair whose private key is HKDF-SHA256 of a 16-byte ``secret``.

    Whoever recovers the secret (the coordinator, for a node that dropped) derives the same
    private key, so only the 16 bytes need sharing.
    """
    if len(secret) != SECRET_BYTES:
        raise ConfigError("malformed mask-key secret",
                          safe_reason="secure aggregation: a recovered secret is malformed")
    private = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"vesalius-secagg|mask-key").derive(secret)
    return KeyPair(private)


@functools.lru_cache(maxsize=4)
def _private_key(private: bytes) -> X25519PrivateKey:
    """The key object of raw private bytes; a node agrees with each of its peers under the
    same one or two keys, and loading the key was 40 % of each agreement's time."""
    return X25519PrivateKey.from_private_bytes(private)


def _agree(private: bytes, peer_public: bytes, purpose: bytes, session: str) -> bytes:
    try:
        shared = _private_key(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError:
        raise ConfigError("malformed X25519 key",
                          safe_reason="secure aggregation: a peer's public key is malformed") from None
    return HKDF(
        algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None,
        info=b"vesalius-secagg|" + purpose + b"|" + session.encode(),
    ).derive(shared)


def pairwise_seed(private: bytes, peer_public: bytes, session: str) -> bytes:
    """The mask seed two nodes share (either side computes it from its own private key)."""
    return _agree(private, peer_public, b"mask", session)


def _aad(session: str, sender: int, recipient: int) -> bytes:
    return session.encode() + struct.pack(">QQ", sender, recipient)


def seal_box(private: bytes, peer_public: bytes, session: str, sender: int, recipient: int,
             plaintext: bytes) -> bytes:
    """AES-GCM box from ``sender`` to ``recipient`` under their agreed key (nonce prefixed)."""
    key = _agree(private, peer_public, b"box", session)
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(session, sender, recipient))


def open_box(private: bytes, peer_public: bytes, session: str, sender: int, recipient: int,
             box: bytes) -> bytes:
    """Open a box :func:`seal_box` made; refuse one that was altered or redirected."""
    from cryptography.exceptions import InvalidTag

    key = _agree(private, peer_public, b"box", session)
    try:
        return AESGCM(key).decrypt(box[:_NONCE_BYTES], box[_NONCE_BYTES:],
                                   _aad(session, sender, recipient))
    except (InvalidTag, ValueError):
        raise ConfigError("share box failed authentication",
                          safe_reason="secure aggregation: a share box failed authentication") from None


def expand(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random ring elements (uint64) from a 16- or 32-byte seed (AES-CTR)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def share(secret: bytes, *, threshold: int, num_shares: int) -> list[bytes]:
    """``num_shares`` Shamir shares of a 16-byte ``secret``; any ``threshold`` of them
    recover it. Each share is its 4-byte index (little-endian, from 1) and 16 bytes."""
    if len(secret) != SECRET_BYTES:
        raise ConfigError(f"a shared secret must be {SECRET_BYTES} bytes")
    return [index.to_bytes(4, "little") + value
            for index, value in Shamir.split(threshold, num_shares, secret, ssss=False)]


def combine(shares: list[bytes]) -> bytes:
    """The secret behind ``shares`` (at least the threshold of them, all distinct)."""
    try:
        if any(len(piece) != 4 + SECRET_BYTES for piece in shares):
            raise ValueError("malformed share")
        return bytes(Shamir.combine([(int.from_bytes(piece[:4], "little"), piece[4:])
                                     for piece in shares], ssss=False))
    except ValueError:
        raise ConfigError("shares do not combine",
                          safe_reason="secure aggregation: the shares do not recover a secret") from None
