"""Scratch vs federated self-supervised pretraining + transfer, at the same ε per arm.

Real BreastMNIST (``vesalius import``, 3 hospitals, IID), one ``--paradigm transfer`` run with
``-P pretrain-rounds=R`` (rotation pretext, as many pretraining rounds as fine-tuning rounds,
no layer frozen): the transfer arm pretrains at ε/2 and fine-tunes at ε/2, the scratch arm
trains the same supervised federation from the seed at ε; ε = 8 per arm. Both arms train the
same patients, so each hospital's ledger holds both (about 2ε; the nodes' cap is set to
allow it, and ``ledger_total`` says what it holds). ``federated`` is the arm's pooled test AUC
(the report's paradigm table); ``pooled`` the pooled non-private baseline of the same data
(``bench/tasks.py``'s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.paradigm_cases import SEED, bench_row, simulate
from bench.paradigm_cases import num as _num


def run(work: Path, quick: bool) -> list[dict[str, Any]]:
    """The comparison's rows (see the module docstring)."""
    from bench.tasks import EPSILON, _baseline_dicom, _prepare_dicom

    row = bench_row("breastmnist", quick)
    root = work / "data"
    prepared = _prepare_dicom(row, root, SEED)
    options = {"pretrain-rounds": row.rounds, "pretext": "rotation", "freeze": "none"}
    # both arms train the same patients: each hospital's cap allows the two (about 2 ε)
    doc = simulate(row, root, work / "transfer", paradigm="transfer", options=options,
                   epsilon_cap=2 * EPSILON + 0.5)
    pooled = _num(_baseline_dicom(row, root, seed=SEED)["metrics"].get("auc"))
    arms, privacy = doc["paradigm"]["tables"][:2]
    totals = [_num(r[-1]) for r in privacy["rows"]]
    variants = {"transfer": f"self-supervised ({row.rounds} rounds, ε={EPSILON / 2:g}) + "
                            f"transfer (ε={EPSILON / 2:g})",
                "scratch": f"scratch (ε={EPSILON:g})"}
    out = []
    for arm in arms["rows"]:
        out.append({
            "comparison": "scratch vs self-supervised + transfer", "data": "BreastMNIST (real)",
            "metric": "auc", "variant": variants[arm[0]], "federated": _num(arm[1]),
            "pooled": pooled, "pooled_on": "every training label (non-private)",
            "epsilon_max": max(_num(e) for e in arm[2:]), "ledger_total_max": max(totals),
            "hospitals": 3, "how": prepared["how"], "rounds": row.rounds})
    return out
