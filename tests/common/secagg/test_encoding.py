"""Fixed-point encoding: ring sizing, exact integers, unbiased rounding, the stated bound."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import ConfigError
from common.secagg.encoding import decode, encode, fractional_bits, quantisation_bound


@pytest.mark.parametrize(("nodes", "bound"), [(2, 1.0), (3, 0.5), (100, 2.0**30), (1000, 1e-3)])
def test_bits_never_let_the_sum_of_extremes_wrap(nodes: int, bound: float) -> None:
    bits = fractional_bits(num_nodes=nodes, value_bound=bound)
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):
        values = np.full(4, sign * bound)
        total = np.zeros(4, dtype=np.uint64)
        for _ in range(nodes):
            total += encode(values, bits, rng)
        assert np.allclose(decode(total, bits), nodes * values,
                           atol=quantisation_bound(nodes, bits), rtol=0)


def test_a_configuration_64_bits_cannot_hold_is_refused() -> None:
    with pytest.raises(ConfigError, match="64-bit ring"):
        fractional_bits(num_nodes=2**20, value_bound=2.0**40)


def test_integers_are_exact_and_need_no_fraction() -> None:
    assert fractional_bits(num_nodes=10, value_bound=2**32, integer=True) == 0
    counts = np.array([0, 1, 7, 2**32], dtype=np.float64)
    encoded = encode(counts, 0, np.random.default_rng(0))
    assert decode(encoded, 0).tolist() == counts.tolist()


def test_stochastic_rounding_is_unbiased_and_keeps_small_values() -> None:
    # 0.3 steps: round-to-nearest would give 0 every time; the mean must stay 0.3 steps.
    bits = 8
    value = 0.3 * 2.0**-bits
    rng = np.random.default_rng(1)
    decoded = decode(encode(np.full(200_000, value), bits, rng), bits)
    assert np.abs(decoded - value).max() < 2.0**-bits
    assert decoded.mean() == pytest.approx(value, rel=0.02)
