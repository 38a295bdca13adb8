"""The coordinator's workflow of ``--paradigm ensemble`` (see :mod:`common.paradigms.ensemble`).

Phases:

1. Members: ``members`` sub-runs of :func:`server.app.run_federation` with the supervised
   plan, seeds ``seed, seed + 1, ...``, run ids ``<run id>-member-<i>``, out dirs
   ``member-<i>`` and target ε ``ε / members`` each (bagging: on a bootstrap resample of the
   hospitals, :mod:`server.paradigms.ensemble_bagging`). Member 0, trained with the run's own
   seed, is the *single model* of the comparison.
   With ``combine=stacker`` the members get ``(1 - stacker-share) ε / members`` and then the
   stacker is trained (:mod:`server.paradigms.ensemble_stacker`, ``stacker-share · ε``).
2. Validation: every hospital answers ``ensemble-scores`` (:mod:`client.queries.ensemble`) on
   its validation patients: the members' pooled AUCs give the weights of
   ``combine=weighted``; the single model's and the ensemble's histograms give the conformal
   thresholds (:mod:`server.paradigms.ensemble_stats`).
3. Test: the same query on the test patients: AUC, accuracy, ECE, conformal coverage and the
   error-detection AUROC of each uncertainty, into ``report.extra["paradigm"]``.

The run's report keeps member 0's rounds, sites, final evaluation and inference (the single
model's), but its Result headline is the ensemble's pooled test AUC (the paradigm section's
``headline``); its paradigm section adds the comparison, the members and each hospital's ε over
all members.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common import messages as k
from common.config import RunConfig
from common.errors import ConfigError
from common.paradigms import get_paradigm, read_options
from common.paradigms.ensemble import (
    MC_DROPOUT,
    MEMBER_HIST,
    QUERY,
    STACKER_HEAD,
    THRESHOLDS,
    UNCERTAINTY_HIST,
    UNCERTAINTY_MEASURES,
    VARIANT_HIST,
    WEIGHTS,
    member_epsilon,
    member_paradigm,
    member_run_id,
)
from common.secagg.params import enabled as secagg_enabled
from server.paradigms import ensemble_stats as st
from server.paradigms.ensemble_bagging import BaggedGrid, bootstrap_hospitals
from server.paradigms.ensemble_stacker import StackerResult, train_stacker
from server.progress import ProgressCallback
from server.report import RunReport
from server.transport import with_transport

log = logging.getLogger(__name__)

__all__ = ["run_ensemble"]

SCORE_BINS = 10_000
UNCERTAINTY_BINS = 10_000
_NODE_WAIT_S = 30.0


def _with_run_id(config: RunConfig) -> RunConfig:
    if config.plan.run_id:
        return config
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
    return dataclasses.replace(config, plan=dataclasses.replace(config.plan, run_id=run_id))


def member_config(config: RunConfig, index: int, members: int, *,
                  min_nodes: int | None = None, stacker_share: float = 0.0) -> RunConfig:
    """The sub-run of member ``index``: supervised plan, own seed, run id, out dir and ε."""
    options = read_options(get_paradigm("ensemble"), config.plan.paradigm_options)
    paradigm, paradigm_options = member_paradigm(float(options["dropout"]))
    plan = dataclasses.replace(
        config.plan, paradigm=paradigm, paradigm_options=paradigm_options,
        seed=config.plan.seed + index,
        run_id=member_run_id(config.plan.run_id, index),
        target_epsilon=member_epsilon(config.plan.target_epsilon, members, stacker_share))
    return dataclasses.replace(
        config, plan=plan, out_dir=str(Path(config.out_dir) / f"member-{index}"),
        resume_from="", min_nodes=config.min_nodes if min_nodes is None else min_nodes)


def _nodes(grid: Grid, config: RunConfig) -> list[int]:
    from server.elm_workflow import _connected_nodes

    return sorted(_connected_nodes(grid, min_nodes=config.min_nodes,
                                   timeout=min(config.round_timeout, _NODE_WAIT_S)))


def _final_arrays(report: RunReport) -> ArrayRecord | None:
    path = Path(report.config.out_dir) / "checkpoints" / "final.pt"
    if report.status not in ("completed", "incomplete") or not path.exists():
        return None
    return ArrayRecord(torch.load(path, map_location="cpu", weights_only=True))


def _query(grid: Grid, node_ids: list[int], config: RunConfig, arrays: list[ArrayRecord],
           split: str, weights: np.ndarray, mc_samples: int,
           stacker: list[float] | None = None, dropout: float = 0.0,
           thresholds: list[float] | None = None) -> dict[str, Any]:
    from server.inference import query_nodes

    cfg = {**config.plan.to_record(), k.SPLIT: split, WEIGHTS: [float(w) for w in weights],
           k.MC_SAMPLES: int(mc_samples), k.VALUE_BINS: SCORE_BINS,
           "uncertainty-bins": UNCERTAINTY_BINS}
    if stacker is not None:
        cfg[STACKER_HEAD] = [float(v) for v in stacker]
    if dropout > 0:
        cfg[MC_DROPOUT] = float(dropout)
    if thresholds is not None:
        cfg[THRESHOLDS] = [float(t) for t in thresholds]
    res = query_nodes(grid, node_ids, QUERY, cfg, timeout=config.round_timeout,
                      records={f"{k.ENSEMBLE_PREFIX}{i}": a for i, a in enumerate(arrays)},
                      required=(MEMBER_HIST, VARIANT_HIST, UNCERTAINTY_HIST))
    if not res.values:
        reasons = "; ".join(f"{f['site']}: {f['reason']}" for f in res.failures)
        raise RuntimeError(f"no hospital answered {QUERY} on {split} ({reasons})")
    pooled = res.pooled((MEMBER_HIST, VARIANT_HIST, UNCERTAINTY_HIST))
    m = len(arrays)
    return {"member": pooled[MEMBER_HIST].reshape(m, 2, SCORE_BINS),
            "variant": pooled[VARIANT_HIST].reshape(3, 2, SCORE_BINS),
            "uncertainty": pooled[UNCERTAINTY_HIST].reshape(3, 2, UNCERTAINTY_BINS),
            "sites": [res.sites[i] for i in res.values], "failures": res.failures,
            "heads": dict(res.heads)}


def _epsilon_rows(members: list[RunReport]) -> tuple[list[str], list[list[Any]]]:
    """Per hospital: each member run's ε, their sum (a bound), the ledger's composed total
    for the hospital's data after the last member (``epsilon_dataset``: every run the node's
    ledger holds on this data) and the node's cap."""
    per_site: dict[str, list[float | None]] = {}
    ledger: dict[str, Any] = {}
    caps: dict[str, Any] = {}
    for i, rep in enumerate(members):
        for row in rep.sites():
            site = str(row["site"])
            per_site.setdefault(site, [None] * len(members))[i] = row["epsilon"]
            caps[site] = row.get("epsilon_cap")
            if row.get("epsilon_dataset") is not None:
                ledger[site] = row["epsilon_dataset"]
    columns = ["hospital", *(f"member {i} ε" for i in range(len(members))),
               "sum of members' ε", "ledger total ε (composed)", "cap"]
    rows = [[site, *eps, float(sum(e for e in eps if e is not None)), ledger.get(site),
             caps.get(site)] for site, eps in sorted(per_site.items())]
    return columns, rows


def _comparison(val: dict[str, Any], test: dict[str, Any], alpha: float,
                combine: str, uncertainty: str, passes: int,
                thresholds: list[float]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Single model vs ensemble (vs MC-dropout) rows (test patients) and the uncertainty rows
    of the ``uncertainty`` option (disagreement, mc-dropout or both); accuracy and errors at
    each model's ``thresholds`` (single, ensemble, MC-dropout mean)."""
    mc = uncertainty in ("mc-dropout", "both")
    names = ["single member (member 0)", f"ensemble ({combine})",
             f"member 0, MC-dropout mean of {passes} passes"]
    measures = [u for u in range(len(UNCERTAINTY_MEASURES))
                if u == 0 or uncertainty != "mc-dropout"]
    rows = []
    for v, name in enumerate(names if mc else names[:2]):
        qhat = st.conformal_qhat(val["variant"][v], alpha=alpha)
        cov = st.coverage(test["variant"][v], qhat) if math.isfinite(qhat) else None
        rows.append({"model": name, "auc": st.auc(test["variant"][v]),
                     "threshold": thresholds[v],
                     "accuracy": st.accuracy(test["variant"][v], thresholds[v]),
                     "ece": st.ece(test["variant"][v]),
                     "qhat": qhat if math.isfinite(qhat) else None,
                     "coverage": None if cov is None else cov["coverage"]["value"],
                     "mean_set_size": None if cov is None else cov["mean_set_size"]})
    labels = [UNCERTAINTY_MEASURES[0] if mc else "single predictive entropy",
              *UNCERTAINTY_MEASURES[1:]]  # without passes: member 0's own entropy
    unc = [{"model": names[(2 if mc else 0) if u == 0 else 1], "uncertainty": labels[u],
            "error_auroc": st.error_auroc(test["uncertainty"][u]),
            "errors": int(np.rint(test["uncertainty"][u][0]).sum())}
           for u in measures]
    return rows, {"rows": unc}


def run_ensemble(grid: Grid, config: RunConfig, *, on_round: Any = None,
                 on_progress: ProgressCallback | None = None) -> RunReport:
    """Train the members, evaluate the ensemble, and return (and write) the run's report."""
    from server.app import run_federation
    from server.report_html import write_report_html

    options = read_options(get_paradigm("ensemble"), config.plan.paradigm_options)
    m, method = int(options["members"]), str(options["method"])
    share = float(options["stacker-share"]) if options["combine"] == "stacker" else 0.0
    if config.resume_from:
        raise ConfigError("an ensemble run cannot be resumed; start it again (its members' "
                          "ledger entries stay on every hospital's ledger)")
    config = _with_run_id(config)
    out = Path(config.out_dir)
    grid = with_transport(grid, on_progress)
    node_ids = _nodes(grid, config)
    if method == "bagging" and secagg_enabled(config.secure_aggregation,
                                              max(len(node_ids), config.min_nodes)):
        raise ConfigError("bagging weights each hospital by the times it was drawn, which "
                          "secure aggregation cannot see; run it with --secure-aggregation off "
                          "or use -P method=seeds")
    if options["combine"] == "stacker" and secagg_enabled(
            config.secure_aggregation, max(len(node_ids), config.min_nodes)):
        raise ConfigError("the stacker's rounds average each hospital's DP-SGD head in the "
                          "clear, not under secure aggregation; run it with "
                          "--secure-aggregation off or use -P combine=average or weighted")
    members: list[RunReport] = []
    draws: list[dict[int, int] | None] = []
    for i in range(m):
        if method == "bagging":
            drawn = bootstrap_hospitals(node_ids, seed=config.plan.seed + i)
            sub = member_config(config, i, m, min_nodes=min(config.min_nodes, len(drawn)),
                                stacker_share=share)
            member_grid: Grid = BaggedGrid(grid, drawn)
        else:
            drawn, sub = None, member_config(config, i, m, stacker_share=share)
            member_grid = grid
        log.info("ensemble member %d/%d: run %s", i + 1, m, sub.plan.run_id)
        draws.append(drawn)
        members.append(run_federation(member_grid, sub, on_round=on_round))
    report = RunReport(config=config)
    single = members[0]
    report.rounds, report.final = list(single.rounds), single.final
    report.excluded, report.dropped = single.excluded, single.dropped
    for key in ("inference", "model_selection", "secure_aggregation"):
        if key in single.extra:
            report.extra[key] = single.extra[key]
    section = _section(grid, node_ids, config, options, members, draws)
    report.extra["paradigm"] = section
    report.status = "completed" if section.get("status") == "completed" else "incomplete"
    report.reason = "" if report.status == "completed" else str(section.get("reason", ""))
    report.write(out)
    write_report_html(report.to_dict(), out / "report.html")
    return report


def _section(grid: Grid, node_ids: list[int], config: RunConfig, options: dict[str, Any],
             members: list[RunReport], draws: list[dict[int, int] | None]) -> dict[str, Any]:
    m, combine = len(members), str(options["combine"])
    share = float(options["stacker-share"]) if combine == "stacker" else 0.0
    eps_member = member_epsilon(config.plan.target_epsilon, m, share)
    columns, eps_rows = _epsilon_rows(members)
    section: dict[str, Any] = {
        "name": "ensemble", "summary": get_paradigm("ensemble").summary,
        "options": dict(options),
        "scope": (f"the Result's headline is the ensemble's pooled test AUC ({m} members, "
                  f"combine={combine}); the Privacy, Training and Performance sections are "
                  f"member 0's alone (one of {m} members, trained at ε = {eps_member:.3f}). "
                  "The single member's figures, the ensemble's other test metrics and each "
                  "hospital's ε over all members (its ledger total) are in the tables of the "
                  "Learning paradigm section."),
        "notes": [
            f"{m} members; each member's target ε = "
            + (f"(1 - {share:g}) ε / {m}" if share else f"ε / {m}") + f" = {eps_member:.3f} "
            f"(run ε {config.plan.target_epsilon:g}): every hospital's total over the members "
            "is at most one single-model run's ε (table 'ε per hospital': each member's ε "
            "as the hospital reported it, their sum, and the lower total the hospital's "
            "ledger composed after the last member).",
            "The rounds, sites, final evaluation and inference of this report are member 0's "
            "(the single model, trained with the run's seed); each member's own report is in "
            "member-<i>/report.json.",
        ],
        "tables": [], "members": [], "epsilon_per_hospital": {"columns": columns,
                                                              "rows": eps_rows}}
    arrays = [_final_arrays(rep) for rep in members]
    for i, rep in enumerate(members):
        section["members"].append({
            "member": i, "run_id": rep.config.plan.run_id, "seed": rep.config.plan.seed,
            "status": rep.status, "target_epsilon": rep.config.plan.target_epsilon,
            "hospitals_drawn": None if draws[i] is None else {
                rep.site_names().get(n, f"node-{n}"): t for n, t in draws[i].items()}})
    if any(a is None for a in arrays):
        bad = [i for i, a in enumerate(arrays) if a is None]
        section.update(status="failed", reason=f"member(s) {bad} have no final model")
        return section
    uncertainty, dropout = str(options["uncertainty"]), float(options["dropout"])
    mc = int(options["mc-samples"]) if uncertainty != "disagreement" else 1
    try:
        equal = np.full(m, 1.0 / m)
        if combine == "stacker":
            stacker = train_stacker(grid, config, node_ids, arrays, share=share,
                                    rounds=int(options["stacker-rounds"]))
            _stacker_section(section, stacker, columns, eps_rows)
        head = section["stacker"]["head"] if combine == "stacker" else None
        val = _query(grid, node_ids, config, arrays, k.SPLIT_VAL, equal, mc, head, dropout)
        weights = st.member_weights(val["member"]) if combine == "weighted" else equal
        if combine == "weighted":
            val = _query(grid, node_ids, config, arrays, k.SPLIT_VAL, weights, mc, None,
                         dropout)
        # Each model's operating threshold, chosen on the validation patients (Youden's J):
        # DP-trained models are often badly calibrated, and at 0.5 one may call every patient
        # negative, so that its "errors" are simply the positives.
        thresholds = [st.youden_threshold(val["variant"][v]) for v in range(3)]
        test = _query(grid, node_ids, config, arrays, k.SPLIT_TEST, weights, mc, head,
                      dropout, thresholds)
    except Exception as exc:  # noqa: BLE001 - the members' reports are already written
        log.warning("ensemble evaluation failed: %s", exc)
        section.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
        return section
    for i, row in enumerate(section["members"]):
        row.update(val_auc=st.auc(val["member"][i]), test_auc=st.auc(test["member"][i]),
                   weight=float(weights[i]))
    rows, unc = _comparison(val, test, float(options["alpha"]), combine, uncertainty, mc,
                            thresholds)
    alpha = float(options["alpha"])
    section["comparison"] = {"rows": rows, "uncertainty": unc["rows"], "alpha": alpha,
                             "target_coverage": 1 - alpha, "weights": [float(w) for w in weights],
                             "test_sites": test["sites"], "failures": val["failures"]
                             + test["failures"], "ledger_heads": test["heads"]}
    if uncertainty != "disagreement":
        section["notes"].append(
            f"MC-dropout: {mc} stochastic passes of member 0 at every hospital with "
            + (f"dropout {dropout:g} before its last linear layer (as in its training)"
               if dropout > 0 else f"the dropout layers of {config.plan.model!r}")
            + "; their mean is a model of its own (its AUC, ECE and prediction sets in the "
            "first table), its predictive entropy flags its errors.")
    section["notes"].append(
        f"Conformal prediction sets at target coverage {1 - alpha:.2f} (α = {alpha:g}), "
        f"calibrated on the validation patients; scores known to 1/{SCORE_BINS}, "
        "nonconformity rounded up. Accuracy and errors are at each model's operating "
        "threshold, the score that maximises sensitivity + specificity (Youden's J) on the "
        "validation patients (column 'threshold'), not at 0.5: DP-trained models are often "
        "badly calibrated.")
    section["tables"] = [
        {"title": "Single member vs ensemble (test patients, pooled over hospitals)"
                  + (" and MC-dropout" if uncertainty != "disagreement" else ""),
         "columns": ["model", "AUC", "threshold", "accuracy", "ECE",
                     f"coverage (target {1 - alpha:.2f})", "mean set size"],
         "rows": [[r["model"], r["auc"], r["threshold"], r["accuracy"], r["ece"],
                   r["coverage"], r["mean_set_size"]] for r in rows]},
        {"title": "Uncertainty for detecting errors (test patients)",
         "columns": ["model", "uncertainty", "error-detection AUROC", "errors"],
         "rows": [[u["model"], u["uncertainty"], u["error_auroc"], u["errors"]]
                  for u in unc["rows"]]},
        {"title": "Members", "columns": ["member", "seed", "status", "target ε", "val AUC",
                                         "test AUC", "weight"],
         "rows": [[r["member"], r["seed"], r["status"], r["target_epsilon"], r["val_auc"],
                   r["test_auc"], r["weight"]] for r in section["members"]]},
        {"title": "ε per hospital (all members" + (" and the stacker)" if combine == "stacker"
                                                   else ")"), "columns": columns,
         "rows": eps_rows},
    ]
    if combine == "stacker":
        st_ = section["stacker"]
        section["tables"].insert(3, {
            "title": "Stacker (DP-SGD on the validation patients)",
            "columns": ["term", "weight"],
            "rows": [*[[f"member {i} logit", w] for i, w in enumerate(st_["weights"])],
                     ["bias", st_["bias"]]]})
    section["headline"] = _headline(test, m, combine)
    section.update(status="completed", reason="")
    return section


def _headline(test: dict[str, Any], members: int, combine: str) -> dict[str, Any]:
    """The Result's headline: the ensemble's pooled test AUC with its DeLong interval."""
    est = st.auc_estimate(test["variant"][1])
    return {"metric": "AUC", **est,
            "what": f"Pooled test AUC of the ensemble ({members} members, {combine})",
            "source": ("every hospital scored its own test patients with every member, "
                       "combined the members' probabilities and released only per-class "
                       f"counts of the ensemble's scores on {SCORE_BINS:,} fixed bins; the "
                       "counts were added over hospitals and the AUC computed from the sum, "
                       "with DeLong's interval on the binned scores (placement values follow "
                       "from the pooled counts)."),
            "sites": len(test["sites"])}


def _stacker_section(section: dict[str, Any], stacker: StackerResult, columns: list[str],
                     eps_rows: list[list[Any]]) -> None:
    """The stacker's head, rounds and ε into the section; its ε into the per-hospital rows."""
    section["stacker"] = {"weights": stacker.weights, "bias": stacker.bias,
                          "head": stacker.head, "run_id": stacker.run_id,
                          "target_epsilon": stacker.target_epsilon, "rounds": stacker.rounds,
                          "epsilon": stacker.epsilon, "failures": stacker.failures}
    columns.insert(-3, "stacker ε")
    for row in eps_rows:
        site = row[0]
        eps = stacker.epsilon.get(site)
        row.insert(-3, eps)
        known = eps is not None and math.isfinite(eps)
        row[-3] = float(row[-3] + (eps if known else 0.0))  # the sum now counts the stacker
        if stacker.epsilon_dataset.get(site) is not None and math.isfinite(
                stacker.epsilon_dataset[site]):
            row[-2] = stacker.epsilon_dataset[site]  # the ledger's total after the stacker
    section["notes"].append(
        f"Stacker: a linear head over the {len(stacker.weights)} frozen members' logits, "
        f"trained federated with DP-SGD ({len(stacker.rounds)} round(s)) on every hospital's "
        f"validation patients (never its test patients), run id {stacker.run_id}, target "
        f"ε = {stacker.target_epsilon:.3f}: the run's ε is split as the stacker's share for "
        "the stacker and the rest equally among the members, so a hospital's total stays "
        "within one run's ε (table 'ε per hospital'). The validation figures that weight or "
        "calibrate the ensemble (conformal threshold) then come from the stacker's own "
        "training patients; the test figures do not.")
