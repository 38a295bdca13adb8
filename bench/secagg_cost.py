"""Crypto cost of secure aggregation per node and at the coordinator (no network).

Usage: ``python bench/secagg_cost.py [--nodes 3] [--params 100000 1000000]``. For each model
size it times, per node: key generation (advertise), Shamir shares + AES-GCM boxes (share),
fixed-point encoding + self and pairwise masks (masked input), opening the boxes (unmask);
and at the coordinator: recombining the shares and removing the masks with one dropout.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common.secagg import crypto
from common.secagg.encoding import encode, fractional_bits
from common.secagg.masking import mask, unmask


def _timed(fn, *args, **kw):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - start


def run(nodes: int, params: int, repeats: int = 3) -> dict[str, float]:
    """The fastest of ``repeats`` runs of each stage (the machine is shared)."""
    rows = [_run_once(nodes, params) for _ in range(repeats)]
    return {key: min(row[key] for row in rows) for key in rows[0]}


def _run_once(nodes: int, params: int) -> dict[str, float]:
    session, t = "train-1", max(nodes // 2 + 1, 2)
    ids = list(range(1, nodes + 1))
    secrets = {i: crypto.new_secret() for i in ids}
    keys, t_keys = _timed(lambda: {i: (crypto.new_keypair(), crypto.keypair_from_secret(secrets[i]))
                                   for i in ids})
    seeds = {i: crypto.new_secret() for i in ids}

    def share_one(i: int) -> None:
        b = crypto.share(seeds[i], threshold=t, num_shares=nodes)
        s = crypto.share(secrets[i], threshold=t, num_shares=nodes)
        for j in ids:
            if j != i:
                crypto.seal_box(keys[i][0].private, keys[j][0].public, session, i, j, b[j - 1] + s[j - 1])

    _, t_share = _timed(share_one, 1)
    bits = fractional_bits(num_nodes=nodes, value_bound=2.0**30)
    rng = np.random.default_rng(0)
    values = rng.normal(size=params)
    publics = {j: keys[j][1].public for j in ids}
    masked = {}
    t_mask = 0.0
    for i in ids:
        vec, dt = _timed(lambda i=i: mask(encode(values, bits, rng), node=i, self_seed=seeds[i],
                                          mask_private=keys[i][1].private, peer_publics=publics,
                                          session=session))
        masked[i] = vec
        t_mask = dt if i == 1 else t_mask
    survivors = ids[:-1]
    total = np.sum([masked[i] for i in survivors], axis=0, dtype=np.uint64)
    _, t_unmask = _timed(lambda: unmask(total, self_seeds={i: seeds[i] for i in survivors},
                                        dropped_privates={ids[-1]: keys[ids[-1]][1].private},
                                        survivor_publics={i: publics[i] for i in survivors},
                                        session=session))
    return {"keys_ms": 1000 * t_keys / nodes, "share_ms": 1000 * t_share,
            "mask_ms": 1000 * t_mask, "coordinator_unmask_ms": 1000 * t_unmask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    for params in args.params:
        row = run(args.nodes, params)
        print(f"{args.nodes} nodes, {params:>9,} parameters: "
              + ", ".join(f"{key} {value:.1f}" for key, value in row.items()))


if __name__ == "__main__":
    main()
