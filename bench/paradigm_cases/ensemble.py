"""Single model vs federated deep ensemble at equal total ε (AUC, ECE, error-detection AUROC).

Real BreastMNIST (``vesalius import``, 3 hospitals, IID), ε = 8 per hospital in total:

* ``single model``: one supervised federation at ε = 8;
* ``member 0``: the ensemble's first member alone (ε = 8 / 3);
* ``ensemble``: ``--paradigm ensemble -P members=3`` (each member ε = 8 / 3, averaged);
* ``ensemble + DP stacker`` and ``member 0, MC-dropout``: a second ensemble run with
  ``-P combine=stacker -P uncertainty=both -P dropout=0.2`` (the stacker, a linear head over
  the members' logits trained with DP-SGD on the validation patients, gets 20 % of ε = 8, each
  member 0.8 · 8 / 3; member 0's MC-dropout mean of 10 passes, its entropy for errors).

The ensemble's and member 0's figures are the run's paradigm section (pooled from the
hospitals' histograms); the single model's AUC is its run's pooled inference and its ECE and
error-detection AUROC (predictive entropy; the cnn has no dropout) are computed here from its
final checkpoint on the pooled test patients, with the same binned formulas. ``pooled`` is
the pooled non-private single model's test AUC (``bench/tasks.py``'s baseline). The two
federations keep separate ledgers (each spends the hospitals' whole ε = 8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.paradigm_cases import SEED, bench_row, simulate
from bench.paradigm_cases import num as _num
MEMBERS = 3


def _single_measures(row: Any, root: Path, checkpoint: Path) -> dict[str, float]:
    import torch

    from bench.tasks import _plan
    from client.data.task_data import load_task_data
    from client.queries.ensemble import ensemble_histograms
    from client.training import evaluate
    from common.config import RunConfig
    from common.paradigms.ensemble import UNCERTAINTY_HIST, VARIANT_HIST
    from common.tasks import get_task
    from server.app import initial_model
    from server.paradigms import ensemble_stats as st
    from server.paradigms.ensemble import SCORE_BINS, UNCERTAINTY_BINS

    plan = _plan(row, private=True, seed=SEED, epsilon=8.0)
    model = initial_model(RunConfig(plan=plan))[0]
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    sites = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("site-"))
    scores, labels = [], []
    for d in sites:
        test = load_task_data(d, task=row.task, num_classes=row.num_classes, samples=row.samples,
                              image_size=row.image_size, seed=0).test
        res = evaluate(model, test.images, test.labels, patient_index=test.patient_index,
                       device="cpu", task=get_task(row.task), num_classes=row.num_classes)
        scores.append(res.scores)
        labels.append(res.labels)
    p = np.concatenate(scores)[None, :]
    h = ensemble_histograms(np.vstack([p, p]), np.concatenate(labels), np.array([1.0, 0.0]), p,
                            bins=SCORE_BINS, uncertainty_bins=UNCERTAINTY_BINS)
    return {"auc": st.auc(h[VARIANT_HIST][0]), "ece": st.ece(h[VARIANT_HIST][0]),
            "error_auroc": st.error_auroc(h[UNCERTAINTY_HIST][0])}


def run(work: Path, quick: bool) -> list[dict[str, Any]]:
    """The comparison's rows (see the module docstring)."""
    from bench.tasks import _baseline_dicom, _prepare_dicom

    row = bench_row("breastmnist", quick)
    root = work / "data"
    prepared = _prepare_dicom(row, root, SEED)
    single_doc = simulate(row, root, work / "single", run_id="bench-paradigm-supervised")
    ens_doc = simulate(row, root, work / "ensemble", paradigm="ensemble",
                       run_id="bench-paradigm-ensemble",
                       options={"members": MEMBERS})
    stack_doc = simulate(row, root, work / "ensemble-stacker", paradigm="ensemble",
                         run_id="bench-paradigm-ensemble-stacker",
                         options={"members": MEMBERS, "combine": "stacker",
                                  "uncertainty": "both", "dropout": 0.2})
    pooled = _num(_baseline_dicom(row, root, seed=SEED)["metrics"].get("auc"))
    single = _single_measures(row, root, work / "single" / "run" / "checkpoints" / "final.pt")
    section = ens_doc["paradigm"]
    comp = section["comparison"]
    unc = {(u["model"], u["uncertainty"]): u["error_auroc"] for u in comp["uncertainty"]}
    eps_total = max(r[-3] for r in section["epsilon_per_hospital"]["rows"])  # sum of members
    eps_ledger = max(r[-2] for r in section["epsilon_per_hospital"]["rows"])  # composed
    eps_single = max(_num(s["epsilon"]) for s in single_doc["sites"])
    base = {"comparison": "single model vs ensemble", "data": "BreastMNIST (real)",
            "metric": "auc", "pooled": pooled, "hospitals": 3,
            "how": prepared["how"], "rounds": row.rounds}
    member0, ens = comp["rows"]
    return [*_rows(base, single_doc, single, eps_single, member0, ens, unc, comp, eps_total,
                   eps_ledger), *_stacker_rows(base, stack_doc["paradigm"])]


def _stacker_rows(base: dict[str, Any], section: dict[str, Any]) -> list[dict[str, Any]]:
    """The stacker's and member 0's MC-dropout rows of the second ensemble run."""
    comp = section["comparison"]
    unc = {(u["model"], u["uncertainty"]): u["error_auroc"] for u in comp["uncertainty"]}
    _, ens, mc = comp["rows"]
    eps_total = max(r[-3] for r in section["epsilon_per_hospital"]["rows"])
    stacker = section["stacker"]
    return [
        {**base, "variant": f"ensemble of {MEMBERS} + DP stacker "
         f"(stacker ε={stacker['target_epsilon']:.2f})",
         "federated": _num(ens["auc"]), "ece": _num(ens["ece"]),
         "error_auroc": _num(unc[(ens["model"], "ensemble disagreement (variance)")]),
         "uncertainty": "disagreement", "coverage": ens["coverage"],
         "stacker_head": stacker["head"], "epsilon_per_hospital": eps_total},
        {**base, "variant": "member 0, MC-dropout mean (dropout 0.2)",
         "federated": _num(mc["auc"]), "ece": _num(mc["ece"]),
         "error_auroc": _num(unc[(mc["model"], "single MC-dropout entropy")]),
         "uncertainty": "MC-dropout entropy", "coverage": mc["coverage"],
         "epsilon_per_hospital": section["members"][0]["target_epsilon"]},
    ]


def _rows(base: dict[str, Any], single_doc: dict[str, Any], single: dict[str, float],
          eps_single: float, member0: dict[str, Any], ens: dict[str, Any],
          unc: dict[tuple[str, str], Any], comp: dict[str, Any], eps_total: float,
          eps_ledger: float) -> list[dict[str, Any]]:
    """The single model's, member 0's and the averaged ensemble's rows."""
    from bench.tasks import EPSILON, _dig

    return [
        {**base, "variant": f"single model (ε={EPSILON:g})",
         "federated": _num(_dig(single_doc.get("inference") or {}, "metrics.auc")),
         "auc_binned": single["auc"], "ece": single["ece"],
         "error_auroc": single["error_auroc"], "uncertainty": "predictive entropy",
         "epsilon_per_hospital": eps_single},
        {**base, "variant": f"member 0 alone (ε={EPSILON / MEMBERS:.2f})",
         "federated": _num(member0["auc"]), "ece": _num(member0["ece"]),
         "error_auroc": _num(unc[(member0["model"], "single predictive entropy")]),
         "uncertainty": "predictive entropy", "coverage": member0["coverage"],
         "epsilon_per_hospital": eps_total / MEMBERS},
        {**base, "variant": f"ensemble of {MEMBERS} (ε={EPSILON / MEMBERS:.2f} each)",
         "federated": _num(ens["auc"]), "ece": _num(ens["ece"]),
         "error_auroc": _num(unc[(ens["model"], "ensemble disagreement (variance)")]),
         "error_auroc_entropy": _num(unc[(ens["model"], "ensemble predictive entropy")]),
         "uncertainty": "disagreement", "coverage": ens["coverage"],
         "target_coverage": comp["target_coverage"], "epsilon_per_hospital": eps_total,
         "epsilon_ledger_composed": eps_ledger},
    ]
