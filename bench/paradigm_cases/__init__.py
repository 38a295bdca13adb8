"""The comparisons of ``bench/paradigms.py``: one module per paradigm family.

Each module defines ``run(work: pathlib.Path, quick: bool) -> list[dict]``: its rows, each with
``comparison`` (e.g. "scratch vs self-supervised + transfer"), ``data`` (which real set of
``../shared/data``), ``variant``, ``metric``, ``federated`` (the federated DP value, 3 hospitals,
ε ≤ 8), ``pooled`` (the pooled non-private baseline of the same run) and any extra measures
(``ece``, ``error_auroc``, ...). ``bench/paradigms.py`` imports every module here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

SEED = 0
"""Seed of every comparison's data split, initial models and sampling (DP noise is never seeded)."""


def bench_row(name: str, quick: bool) -> Any:
    """``bench/tasks.py``'s row ``name`` (its quick variant with ``quick``)."""
    from bench.tasks import QUICK, ROWS

    row = next(r for r in ROWS if r.name == name)
    return dataclasses.replace(row, **QUICK[row.name]) if quick else row


def num(value: Any) -> float:
    """A finite number (a report metric ``{"value": ...}`` unwrapped), else NaN."""
    if isinstance(value, dict):
        value = value.get("value")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def simulate(row: Any, root: Path, work: Path, *, paradigm: str = "supervised",
             options: dict[str, Any] | None = None, epsilon_cap: float | None = None,
             run_id: str = "", **plan_changes: Any) -> dict[str, Any]:
    """One DP federation (ε = 8 per hospital, secure aggregation off) of ``row`` over
    ``root``'s ``site-*`` hospitals under ``paradigm``; its report as a dictionary.

    Each hospital has its own ledger under ``work/ledgers`` (cap ``epsilon_cap``, default the
    run's ε); ``plan_changes`` replace fields of the plan (e.g. ``augment``, ``model``).
    """
    from bench.tasks import EPSILON, _plan
    from common.config import NodeConfig, RunConfig
    from common.paradigms import canonical_options
    from server.simulation import run_simulation

    sites = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("site-"))
    cap = EPSILON if epsilon_cap is None else epsilon_cap
    nodes = [NodeConfig(data_dir=d, epsilon_cap=cap, site_name=d.name,
                        release_histograms=True, min_release_count=1, torch_threads=1,
                        device="cpu", ledger_dir=work / "ledgers" / d.name) for d in sites]
    plan = dataclasses.replace(_plan(row, private=True, seed=SEED, epsilon=EPSILON),
                               paradigm=paradigm, paradigm_options=canonical_options(options or {}),
                               run_id=run_id or f"bench-{work.name}", **plan_changes)
    config = RunConfig(plan=plan, out_dir=str(work / "run"), min_nodes=len(nodes),
                       secure_aggregation="off")
    doc = run_simulation(config, nodes, num_cpus=2).to_dict()
    if doc.get("status") != "completed":
        raise RuntimeError(f"{work.name} federation {doc.get('status')}: {doc.get('reason')}")
    return doc
