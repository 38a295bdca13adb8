"""Masks: what the coordinator sees of one node is uniform; the survivors' sum unmasks exactly.

The uniformity tests are the statistical part of the issue's claim: the coordinator's view of
one node's masked vector is indistinguishable from uniform over Z_{2^64}, whatever the input.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import stats

from common.secagg import crypto
from common.secagg.encoding import decode, encode, fractional_bits, quantisation_bound
from common.secagg.masking import mask, unmask

SESSION = "train-1"


def _federation(n: int) -> tuple[dict[int, crypto.KeyPair], dict[int, bytes]]:
    keys = {i: crypto.new_keypair() for i in range(1, n + 1)}
    seeds = {i: os.urandom(32) for i in keys}
    return keys, seeds


def _masked(node: int, values: np.ndarray, keys: dict[int, crypto.KeyPair],
            seeds: dict[int, bytes], members: list[int]) -> np.ndarray:
    return mask(values, node=node, self_seed=seeds[node], mask_private=keys[node].private,
                peer_publics={j: keys[j].public for j in members}, session=SESSION)


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector >> np.uint64(11)).astype(np.float64) / 2.0**53  # top 53 bits in [0, 1)


def test_one_masked_vector_is_uniform_over_the_ring() -> None:
    keys, seeds = _federation(3)
    constant = np.full(20_000, 2**40, dtype=np.uint64)  # a very non-uniform input
    view = _masked(1, constant, keys, seeds, [1, 2, 3])
    assert stats.kstest(_unit(view), "uniform").pvalue > 1e-3
    # the low bits too: a chi-square on the lowest byte
    counts = np.bincount((view & np.uint64(0xFF)).astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_masked_vectors_of_very_different_inputs_are_indistinguishable() -> None:
    keys, seeds = _federation(3)
    zeros = np.zeros(20_000, dtype=np.uint64)
    bits = fractional_bits(num_nodes=3, value_bound=1.0)
    ones = encode(np.ones(20_000), bits, np.random.default_rng(0))
    a = _masked(1, zeros, keys, seeds, [1, 2, 3])
    keys2, seeds2 = _federation(3)  # a fresh session's keys for the other input
    b = _masked(1, ones, keys2, seeds2, [1, 2, 3])
    assert stats.ks_2samp(_unit(a), _unit(b)).pvalue > 1e-3


@pytest.mark.parametrize("dropped", [[], [2], [2, 4]])
def test_the_survivors_sum_unmasks_to_their_plain_sum(dropped: list[int]) -> None:
    n, bits = 5, fractional_bits(num_nodes=5, value_bound=10.0)
    keys, seeds = _federation(n)
    rng = np.random.default_rng(3)
    values = {i: rng.uniform(-10, 10, size=1000) for i in keys}
    members = list(keys)
    survivors = [i for i in members if i not in dropped]
    total = np.zeros(1000, dtype=np.uint64)
    for i in survivors:
        total += _masked(i, encode(values[i], bits, rng), keys, seeds, members)
    clear = unmask(total, self_seeds={i: seeds[i] for i in survivors},
                   dropped_privates={j: keys[j].private for j in dropped},
                   survivor_publics={i: keys[i].public for i in survivors}, session=SESSION)
    expected = np.sum([values[i] for i in survivors], axis=0)
    assert np.abs(decode(clear, bits) - expected).max() <= quantisation_bound(len(survivors), bits)


def test_masks_of_another_session_do_not_cancel() -> None:
    keys, seeds = _federation(2)
    zero = np.zeros(8, dtype=np.uint64)
    total = _masked(1, zero, keys, seeds, [1, 2]) + mask(
        zero, node=2, self_seed=seeds[2], mask_private=keys[2].private,
        peer_publics={1: keys[1].public}, session="train-2")
    clear = unmask(total, self_seeds=seeds, dropped_privates={},
                   survivor_publics={i: keys[i].public for i in keys}, session=SESSION)
    assert clear.any()
