"""Cross-validation of ``--paradigm ensemble`` (``vesalius federation cv --paradigm ensemble``).

The paradigm's ``fold`` hook (:func:`run_ensemble_fold`, :func:`server.cv.fold_runner`) trains
and evaluates one fold:

1. the ``members`` members, each :func:`server.cv.train_rounds` on the fold's training nodes
   and, at each node, the fold's training patients only, with the run workflow's sub-run
   (:func:`server.paradigms.ensemble.member_config`: seed ``seed + i``, target ε
   ``ε / members``, supervised plan or ``ensemble-member`` with ``-P dropout``), under run id
   ``<fold run id>-member-<i>`` (so every node's ledger records each member per fold) in
   ``fold-<k>/member-<i>/``, from the fold's seeded initial model for that seed
   (:func:`server.cv.fold_initial_arrays`);
2. the *ensemble*'s held-out evaluation: one ``ensemble-scores`` query
   (:mod:`client.queries.ensemble`) on the fold's held-out part with all members and equal
   weights. Its pooled histogram of the averaged probabilities is the fold's held-out
   histogram (:attr:`server.cv.FoldOutcome.histograms`), summarised by
   :func:`server.cv.summarise_histograms` and pooled across folds by
   :meth:`server.cv.CVResult.pooled` like any fold's. The query bins scores on
   :data:`CV_SCORE_BINS` equal bins (not the cv's fine score bins, which the ensemble query
   does not compute): every fold uses the same bins, so the folds pool.

Only ``combine=average`` with ``method=seeds`` runs in cross-validation (see
:func:`check_cv_options`): ``weighted`` and ``stacker`` learn the combination on validation
patients, which a fold does not have (its validation patients train), and bagging is not
implemented for folds. The uncertainty measures, conformal sets and MC-dropout of
``federation run --paradigm ensemble`` are not computed in folds. A fold's ε per hospital
adds its members' spends (basic composition, an upper bound of the fold's target ε).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common import messages as k
from common.config import RunConfig
from common.errors import ConfigError
from common.paradigms import get_paradigm, read_options
from common.paradigms.ensemble import MEMBER_HIST, QUERY, UNCERTAINTY_HIST, VARIANT_HIST, WEIGHTS
from server.report import RunReport

__all__ = ["CV_SCORE_BINS", "check_cv_options", "run_ensemble_fold"]

#: Equal score bins of the fold's ensemble histograms (not 10 000: that many bins would be
#: read as the cv's fine score edges by :func:`server.cv.histogram_edges`).
CV_SCORE_BINS = 5000
_UNCERTAINTY_BINS = 10  # the query always releases them; a fold does not use them
_REQUIRED = (k.NUM_EXAMPLES, MEMBER_HIST, VARIANT_HIST, UNCERTAINTY_HIST)


def check_cv_options(options: Mapping[str, Any]) -> None:
    """Refuse the ensemble options a cross-validation fold cannot run (a :class:`ConfigError`
    naming why and what to run instead)."""
    if options["combine"] != "average":
        raise ConfigError(
            f"-P combine={options['combine']} is not available in federation cv: it learns "
            "the combination on the hospitals' validation patients, and a fold has none (its "
            "validation patients train); use -P combine=average, or run "
            "`vesalius federation run --paradigm ensemble` for weighted or stacker")
    if options["method"] != "seeds":
        raise ConfigError(
            "-P method=bagging is not available in federation cv yet (bootstrap draws of the "
            "fold's training hospitals are not implemented for folds); use -P method=seeds, "
            "or run `vesalius federation run --paradigm ensemble -P method=bagging`")


def run_ensemble_fold(
    grid: Grid, config: RunConfig, outcome: Any, *, train_nodes: Sequence[int] | None,
    heldout_nodes: Sequence[int] | None, progress: Any, num_folds: int, secure: bool = False,
) -> Any:
    """One cross-validation fold of ``--paradigm ensemble`` (see the module docstring), with
    :func:`server.cv.run_fold`'s signature; node failures are recorded, never raised."""
    from server.cv import fold_guard, fold_initial_arrays, train_rounds
    from server.paradigms.ensemble import member_config

    options = read_options(get_paradigm("ensemble"), config.plan.paradigm_options)
    check_cv_options(options)  # a ConfigError stops the whole cross-validation
    m = int(options["members"])
    subs = [member_config(config, i, m) for i in range(m)]
    members = [RunReport(config=sub) for sub in subs]
    fold_report = RunReport(config=config)
    reports = [*members, fold_report]
    out_dir = Path(config.out_dir)
    with fold_guard(outcome, reports, out_dir, sites=lambda: composed_sites(members)):
        arrays: list[ArrayRecord] = []
        for i, (sub, rep) in enumerate(zip(subs, members)):
            trained = train_rounds(grid, sub, outcome, rep,
                                   initial=fold_initial_arrays(sub, outcome.fold),
                                   train_nodes=train_nodes, num_folds=num_folds, secure=secure,
                                   progress=progress if i == m - 1 else None)
            if trained is None:
                outcome.reason = f"ensemble member {i}: {outcome.reason}"
                break
            arrays.append(trained)
        outcome.rounds = [entry for rep in members for entry in rep.rounds]
        outcome.sites = composed_sites(members)
        outcome.notes.extend(_notes(config, outcome.fold, subs))
        if len(arrays) == m:
            _evaluate_ensemble(grid, arrays, config, outcome, heldout_nodes=heldout_nodes,
                               secure=secure)
        fold_report.extra["paradigm"] = _fold_section(config, options, members, outcome)
    return outcome


def composed_sites(members: Sequence[RunReport]) -> list[dict[str, Any]]:
    """Every site that trained for any member (the first member's row for it), its ε the
    sum of the ε it reported over the members (basic composition: the fold's spend is at most
    this; a member that did not train at a site spent nothing there); None where no member
    reported one."""
    rows: dict[str, dict[str, Any]] = {}
    spent: dict[str, list[float]] = {}
    for rep in members:
        for row in rep.sites():
            rows.setdefault(row["site"], dict(row))
            if row.get("epsilon") is not None:
                spent.setdefault(row["site"], []).append(float(row["epsilon"]))
    for site, row in rows.items():
        row["epsilon"] = sum(spent[site]) if site in spent else None
    return list(rows.values())


def _query(grid: Grid, arrays: list[ArrayRecord], config: RunConfig) -> Any:
    from server.inference import query_nodes

    m = len(arrays)
    cfg = {**config.plan.to_record(), k.SPLIT: k.SPLIT_HELDOUT, WEIGHTS: [1.0 / m] * m,
           k.MC_SAMPLES: 1, k.VALUE_BINS: CV_SCORE_BINS, "uncertainty-bins": _UNCERTAINTY_BINS}
    return query_nodes(grid, list(grid.get_node_ids()), QUERY, cfg,
                       timeout=config.round_timeout, required=_REQUIRED,
                       records={f"{k.ENSEMBLE_PREFIX}{i}": a for i, a in enumerate(arrays)})


def _class_hist(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble's ``(positive, negative)`` counts from a released ``VARIANT_HIST``."""
    variant = np.maximum(np.rint(np.asarray(values, dtype=np.float64)), 0).astype(np.int64)
    ens = variant.reshape(3, 2, CV_SCORE_BINS)[1]
    return ens[0], ens[1]


def _evaluate_ensemble(grid: Grid, arrays: list[ArrayRecord], config: RunConfig,
                       outcome: Any, *, heldout_nodes: Sequence[int] | None,
                       secure: bool) -> None:
    """The ensemble's held-out statistics of the fold into ``outcome`` (status, histograms,
    summary in :func:`server.cv._evaluate_fold`'s format)."""
    from server.cv import NodeSubsetGrid, summarise_histograms

    eval_grid = grid if heldout_nodes is None else NodeSubsetGrid(grid, heldout_nodes)
    outcome.secure_heldout = False  # ensemble-scores is not covered by secure aggregation
    res = _query(eval_grid, arrays, config)
    outcome.query_failures = list(res.failures)
    failed = "; ".join(sorted({f"{f.get('site')}: {f.get('reason')}" for f in res.failures}))
    if not res.values:
        outcome.status = "incomplete"
        outcome.reason = f"no node answered {QUERY} on its held-out patients ({failed})"
        return
    m = len(arrays)
    pooled = res.pooled(_REQUIRED)
    pos, neg = _class_hist(pooled[VARIANT_HIST])
    outcome.histograms = (pos, neg)
    summary = summarise_histograms(pos, neg)
    sites = [{"site": res.sites[nid],
              **{key: s[key] for key in ("n", "auc")}}
             for nid in res.values
             for s in [summarise_histograms(*_class_hist(res.values[nid][VARIANT_HIST]))]]
    members = np.maximum(np.rint(np.asarray(pooled[MEMBER_HIST], dtype=np.float64)), 0)
    member_aucs = [summarise_histograms(*h.astype(np.int64))["auc"]
                   for h in members.reshape(m, 2, CV_SCORE_BINS)]
    noised = any(bool(res.values[i].get(k.NOISED, 0)) for i in res.values)
    outcome.summary = {
        "source": f"statistics query '{QUERY}' (the ensemble's averaged probabilities)",
        "source_note": f"failed: {failed}" if failed else None, **summary,
        "extra": {"auc_sites": sites, "noised": noised, "suppressed_cells": 0,
                  "member_auc": [a["value"] if a else None for a in member_aucs]}}
    outcome.status = "completed" if summary.get("auc") else "incomplete"
    if outcome.status == "incomplete":
        outcome.reason = "held-out AUC undefined (one class absent from the pooled patients)"
    aucs = ", ".join(f"{a['value']:.3f}" if a else "undefined" for a in member_aucs)
    outcome.notes.append(f"fold {outcome.fold}: the members' own held-out AUCs {aucs}; the "
                         "fold's AUC is the ensemble's")
    if secure:
        outcome.notes.append(
            f"secure aggregation summed the members' training updates; the {QUERY} query is "
            "not covered by it: each hospital's held-out histograms reached the coordinator "
            "in the clear (as in `federation run --paradigm ensemble`)")


def _notes(config: RunConfig, fold: int, subs: Sequence[RunConfig]) -> list[str]:
    m = len(subs)
    eps = config.plan.target_epsilon
    return [
        f"each fold trains {m} members on the fold's training patients (seeds seed, ..., "
        f"seed + {m - 1}; target ε = ε / {m} = {eps / m:.3f} each; run ids "
        "<fold run id>-member-<i>, on every hospital's ledger) and holds out the same "
        "patients for all of them",
        "the held-out figures of every fold are the ensemble's (combine=average: each "
        "held-out patient's members' probabilities averaged at its hospital), released as "
        f"per-class counts on {CV_SCORE_BINS:,} equal score bins (ties within a bin count "
        "1/2), not a single member's",
        f"a fold's ε per hospital adds its {m} members' spends (basic composition, an upper "
        f"bound, at most the target ε {eps:g}); the uncertainty, conformal and MC-dropout "
        "figures of `federation run --paradigm ensemble` are not computed in folds",
        f"fold {fold}: members {', '.join(s.plan.run_id for s in subs)}",
    ]


def _fold_section(config: RunConfig, options: Mapping[str, Any], members: Sequence[RunReport],
                  outcome: Any) -> dict[str, Any]:
    """The fold report's paradigm section: the members and the ensemble's held-out AUC."""
    auc = (outcome.summary.get("auc") or {}).get("value")
    rows = [[i, rep.config.plan.run_id, rep.config.plan.seed, rep.config.plan.target_epsilon,
             len(rep.rounds)] for i, rep in enumerate(members)]
    return {"name": "ensemble", "summary": get_paradigm("ensemble").summary,
            "options": dict(options), "notes": list(outcome.notes),
            "tables": [{"title": f"Members of fold {outcome.fold} (held-out AUC of the "
                                 f"ensemble: {auc if auc is None else round(auc, 4)})",
                        "columns": ["member", "run id", "seed", "target ε", "rounds"],
                        "rows": rows}],
            "status": outcome.status, "reason": outcome.reason}
