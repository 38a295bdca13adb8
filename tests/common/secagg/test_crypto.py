"""The composed primitives: seeds agree, boxes authenticate, shares need the threshold."""

from __future__ import annotations

import os

import pytest

from common.errors import ConfigError
from common.secagg import crypto
from common.secagg.params import default_min_survivors, enabled, threshold


def test_both_sides_derive_the_same_seed_and_sessions_differ() -> None:
    a, b = crypto.new_keypair(), crypto.new_keypair()
    assert crypto.pairwise_seed(a.private, b.public, "s") == crypto.pairwise_seed(b.private, a.public, "s")
    assert crypto.pairwise_seed(a.private, b.public, "s") != crypto.pairwise_seed(a.private, b.public, "t")


def test_a_box_opens_only_for_its_session_sender_and_recipient() -> None:
    a, b = crypto.new_keypair(), crypto.new_keypair()
    box = crypto.seal_box(a.private, b.public, "s", 1, 2, b"share")
    assert crypto.open_box(b.private, a.public, "s", 1, 2, box) == b"share"
    for session, sender, recipient in (("t", 1, 2), ("s", 3, 2), ("s", 1, 3)):
        with pytest.raises(ConfigError):
            crypto.open_box(b.private, a.public, session, sender, recipient, box)
    tampered = box[:-1] + bytes([box[-1] ^ 1])
    with pytest.raises(ConfigError):
        crypto.open_box(b.private, a.public, "s", 1, 2, tampered)


def test_any_threshold_shares_recover_the_secret() -> None:
    secret = crypto.new_secret()
    assert len(secret) == crypto.SECRET_BYTES == 16
    shares = crypto.share(secret, threshold=3, num_shares=5)
    assert crypto.combine([shares[4], shares[0], shares[2]]) == secret
    assert crypto.combine(shares[1:4]) == secret
    try:  # fewer than the threshold: an error or another value, never the secret
        assert crypto.combine(shares[:2]) != secret
    except ConfigError:
        pass


def test_expand_is_deterministic_per_seed() -> None:
    seed = os.urandom(32)
    assert (crypto.expand(seed, 100) == crypto.expand(seed, 100)).all()
    assert (crypto.expand(seed, 100) != crypto.expand(os.urandom(32), 100)).any()


@pytest.mark.parametrize(("n", "expected"), [(2, 2), (3, 3), (4, 3), (5, 4), (9, 6), (12, 8)])
def test_default_minimum_survivors(n: int, expected: int) -> None:
    assert default_min_survivors(n) == expected
    assert threshold(n, 0) >= expected


def test_threshold_is_a_majority_even_when_the_minimum_is_lowered() -> None:
    assert threshold(3, 2) == 2 and threshold(10, 2) == 6
    assert threshold(1, 0) == 2  # one node alone is never aggregated "securely"


def test_modes() -> None:
    assert enabled("auto", 3) and not enabled("auto", 2) and enabled("on", 2)
    assert not enabled("off", 10)
    with pytest.raises(ConfigError, match="secure-aggregation"):
        enabled("maybe", 3)


def test_many_hospitals_are_warned_and_the_run_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from common.secagg.params import SLOW_ABOVE, scale_warning
    from common.config import RunConfig
    from server.cv import secure_enabled

    assert scale_warning(SLOW_ABOVE) is None and scale_warning(3) is None
    text = scale_warning(100)
    assert text is not None and "100 hospitals" in text and "--secure-aggregation off" in text
    assert "40 randomly drawn neighbours (SecAgg+)" in text and "21 of its group of 41" in text
    assert "(with full sharing: 67 of 100)" in text

    class Grid:  # the connected nodes, as Flower's Grid lists them
        def __init__(self, n: int) -> None:
            self.n = n

        def get_node_ids(self) -> list[int]:
            return list(range(self.n))

    config = RunConfig(secure_aggregation="auto")
    with caplog.at_level("WARNING"):
        assert secure_enabled(Grid(10), config)  # type: ignore[arg-type]
        assert "randomly drawn neighbours" not in caplog.text
        assert secure_enabled(Grid(SLOW_ABOVE + 1), config)  # type: ignore[arg-type]
        assert f"secure aggregation with {SLOW_ABOVE + 1} hospitals" in caplog.text


def test_shares_are_pycryptodomes_shamir_and_flowers_helpers_agree() -> None:
    # one GF(2^128) element per share; Flower's helpers (three padded elements) recover the
    # same secret from the same threshold, so only the encoding is ours
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

    secret = crypto.new_secret()
    shares = crypto.share(secret, threshold=4, num_shares=7)
    assert all(len(piece) == 20 for piece in shares)
    assert crypto.combine(shares[3:]) == secret
    assert combine_shares(create_shares(secret, 4, 7)[:4]) == secret
    with pytest.raises(ConfigError):
        crypto.share(os.urandom(32), threshold=2, num_shares=3)
    with pytest.raises(ConfigError):
        crypto.combine([shares[0][:-1], shares[1]])


def test_the_mask_key_is_derived_from_its_secret() -> None:
    secret = crypto.new_secret()
    a, b = crypto.keypair_from_secret(secret), crypto.keypair_from_secret(secret)
    assert a.private == b.private and a.public == b.public and len(a.private) == 32
    assert crypto.keypair_from_secret(crypto.new_secret()).public != a.public
    other = crypto.new_keypair()
    assert crypto.pairwise_seed(a.private, other.public, "s") == crypto.pairwise_seed(
        other.private, a.public, "s")
    with pytest.raises(ConfigError):
        crypto.keypair_from_secret(b"short")
