"""The run report: ``report.json`` (machine-readable) and ``summary.txt`` (for people).

``report.json`` layout::

    {
      "rounds": [{"round": 1, "metrics": {"auc": ..., "accuracy": ..., "loss": ...,
                                          "train-loss": ...},
                  "sites": [{"site": ..., "auc": ..., "epsilon": ...}], "errors": [...]}],
      "sites":  [{"site": ..., "num_examples": ..., "epsilon": ..., "delta": ...,
                  "noise_multiplier": ..., "sample_rate": ...}],
      "final":  {"split": "test", "auc_pooled": ..., "metrics": {...}, "sites": [...]},
      "privacy": {"unit": "patient", "mechanism": ..., "accountant": "rdp", ...},
      "excluded": [{"node_id": ..., "site": ... (when the node named itself), "reason": ...}],
      "config": {...run config...},
      "status": "completed" | "failed", "reason": ...
    }

Metrics are those released by the nodes (aggregates only); the report holds no patient data.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import messages as k
from common.config import RunConfig
from server.strategies.fedavg import RoundLog, SiteReply

REPORT_JSON = "report.json"
SUMMARY_TXT = "summary.txt"


def _clean(value: float) -> float | None:
    """JSON-safe number: NaN (undefined) and infinity (no DP guarantee) become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_safe(value: Any) -> Any:
    """Strict-JSON form of a nested section: non-finite numbers become null, numpy to Python."""
    if isinstance(value, dict):
        return {str(key): json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return json_safe(value.tolist())  # numpy arrays and scalars
    if isinstance(value, float):
        return _clean(value)
    return value


def _site_row(reply: SiteReply) -> dict[str, Any]:
    row: dict[str, Any] = {"site": reply.site}
    row.update({key: _clean(v) for key, v in reply.metrics.items()})
    return row


def round_dict(entry: RoundLog) -> dict[str, Any]:
    """One round of ``report.json``'s ``rounds`` (also the deployment's round summary line)."""
    metrics = {key: _clean(v) for key, v in entry.evaluate_metrics.items()}
    if k.TRAIN_LOSS in entry.train_metrics:
        metrics[k.TRAIN_LOSS] = _clean(entry.train_metrics[k.TRAIN_LOSS])
    metrics.pop(k.NUM_EXAMPLES, None)
    return {
        "round": entry.round,
        "metrics": metrics,
        "sites": [_site_row(r) for r in entry.evaluate],
        "train": [_site_row(r) for r in entry.train],
        "errors": entry.errors,
        "refusals": entry.refusals,
        "status": entry.status,
        **({"failure": entry.failure} if entry.failure else {}),
    }


def dropped_lines(rows: Any) -> list[str]:
    """One line per hospital that stopped answering: when, and whether it came back."""
    lines = []
    for row in rows:
        back = (f"; answered again in round {row['rejoined_round']}"
                if row.get("rejoined_round") else "")
        lines.append(f"dropped {row['site']} in round {row['round']} ({row['phase']}) at "
                     f"{row['at']}: {row['reason']}{back}")
    return lines


def _multiclass_lines(extra: dict[str, Any]) -> list[str]:
    """A multi-class run's pooled macro AUC, accuracy and balanced accuracy."""
    inference = extra.get("inference")
    section = inference.get("multiclass") if isinstance(inference, dict) else None
    if not isinstance(section, dict):
        return []
    lines = []
    macro = (section.get("auc") or {}).get("macro") if isinstance(section.get("auc"), dict) else None
    for label, est in (("pooled test macro one-vs-rest AUC", macro),
                       ("test accuracy at the most probable class", section.get("accuracy")),
                       ("test balanced accuracy", section.get("balanced_accuracy"))):
        if isinstance(est, dict) and est.get("value") is not None:
            lines.append(f"{label}: {float(est['value']):.3f}")
    return lines


def _task_lines(extra: dict[str, Any]) -> list[str]:
    """A task's own summary lines (:mod:`server.report_tasks`), when it has a view."""
    from server.report_tasks import task_view

    inference = extra.get("inference")
    view = task_view(inference.get("task")) if isinstance(inference, dict) else None
    if view is None or not isinstance(inference, dict):
        return []
    try:
        return list(view.summary(inference))
    except Exception as exc:  # noqa: BLE001 - a summary line must never lose the report
        return [f"(the {view.key} summary could not be written: {type(exc).__name__})"]


def _operating_point_lines(extra: dict[str, Any]) -> list[str]:
    """The operating point and the test metrics at it, for ``summary.txt``."""
    inference = extra.get("inference")
    point = inference.get("operating_point") if isinstance(inference, dict) else None
    if not isinstance(point, dict) or point.get("calibrated_threshold") is None:
        return []
    lines = [f"operating point (chosen on {point.get('chosen_on', 'validation')}, "
             f"{point.get('method')}): calibrated probability >= "
             f"{float(point['calibrated_threshold']):.4f}"]
    metrics = inference.get("metrics") or {}
    for name in ("sensitivity", "specificity"):
        est = metrics.get(name)
        if isinstance(est, dict) and est.get("value") is not None:
            lines.append(f"test {name} at it: {float(est['value']):.3f}")
    return lines


@dataclass
class RunReport:
    """Accumulates what a run learned; written atomically after every round."""

    config: RunConfig
    rounds: list[RoundLog] = field(default_factory=list)
    final: RoundLog | None = None
    status: str = "running"
    reason: str = ""
    excluded: dict[int, str] = field(default_factory=dict)  # node id -> reason it refused
    #: site -> when it stopped answering (round, phase, UTC time, reason; rejoined_round)
    dropped: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # further sections (e.g. "inference")
    hospital_dp: Callable[[], Any] | None = None  # hospital-level DP spend so far, when on

    def sites(self) -> list[dict[str, Any]]:
        """Latest train release of each node: patients, epsilon spent, delta, noise.

        Nodes are told apart by node id; a site name shared by several nodes is suffixed with
        the node id so that no hospital's spend hides behind another's.
        """
        latest: dict[int, SiteReply] = {}
        for entry in self.rounds:
            for reply in entry.train:
                latest[reply.node_id] = reply
        heads: dict[int, str] = {}
        for entry in [*self.rounds, *([self.final] if self.final is not None else [])]:
            for reply in [*entry.train, *entry.evaluate]:
                if reply.ledger_head:
                    heads[reply.node_id] = reply.ledger_head
        # The final statistics queries come last: their heads anchor the nodes' last releases.
        inference = self.extra.get("inference")
        if isinstance(inference, dict):
            heads.update({int(n): str(h) for n, h in inference.get("ledger_heads", {}).items()})
        names = [reply.site for reply in latest.values()]
        rows = []
        for node_id, reply in latest.items():
            m = reply.metrics
            label = reply.site if names.count(reply.site) == 1 else f"{reply.site}#{node_id}"
            # a cross-validation's folds: the cross-validation's epsilon so far (server.cv)
            cv = ({"epsilon_cv": _clean(m[k.EPSILON_CV]),
                   "epsilon_cv_prv": _clean(m.get(k.EPSILON_CV_PRV, math.nan))}
                  if k.EPSILON_CV in m else {})
            rows.append(
                {
                    "site": label,
                    # None: hidden from the coordinator by secure aggregation
                    "num_examples": (int(m[k.NUM_EXAMPLES]) if k.NUM_EXAMPLES in m else None),
                    "epsilon": _clean(m.get(k.EPSILON, math.inf)),
                    "epsilon_prv": _clean(m.get(k.EPSILON_PRV, math.nan)),
                    "epsilon_dataset": _clean(m.get(k.EPSILON_DATASET, math.nan)),
                    "epsilon_cap": _clean(m.get(k.EPSILON_CAP, math.nan)),
                    "delta": _clean(m.get(k.DELTA, math.nan)),
                    "noise_multiplier": _clean(m.get(k.NOISE_MULTIPLIER, math.nan)),
                    "sample_rate": _clean(m.get(k.SAMPLE_RATE, math.nan)),
                    # Audit anchor: `vesalius audit verify --expect-head` at the hospital.
                    "ledger_head": heads.get(node_id, ""),
                    **cv,
                }
            )
        return sorted(rows, key=lambda row: str(row["site"]))

    def site_names(self) -> dict[int, str]:
        """Node id -> the site name it gave (in a reply, or as its error reasons' prefix).

        Lets people read ``excluded`` by hospital rather than by Flower node id; a node that
        never named itself is absent.
        """
        names: dict[int, str] = {}
        for entry in self.rounds:
            for row in [*entry.refusals, *entry.errors]:
                site, node_id = str(row.get("site", "")), row.get("node_id")
                if isinstance(node_id, int) and site and site != f"node-{node_id}":
                    names.setdefault(node_id, site)
            for reply in [*entry.train, *entry.evaluate]:
                if reply.site and reply.site != f"node-{reply.node_id}":
                    names[reply.node_id] = reply.site
        return names

    def _excluded_rows(self) -> list[dict[str, Any]]:
        """``excluded``: node id, the site name where the node gave one, and its reason."""
        names = self.site_names()
        rows = []
        for node_id, reason in sorted(self.excluded.items()):
            row: dict[str, Any] = {"node_id": node_id, "reason": reason}
            if names.get(node_id):
                row["site"] = names[node_id]
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The JSON document described in the module docstring."""
        rounds = [round_dict(entry) for entry in self.rounds]
        plan = self.config.plan
        out: dict[str, Any] = {
            "status": self.status,
            "reason": self.reason,
            "rounds": rounds,
            "sites": self.sites(),
            "privacy": {
                "unit": "patient (not image): one record per patient in DP-SGD",
                "guarantee": "patient-level (epsilon, delta)-DP at each hospital, for its "
                "own patients" if plan.private else "none (non-private baseline)",
                "mechanism": "DP-SGD (Opacus), Poisson sampling of patients, one record per "
                "patient" if plan.private else "none (non-private baseline)",
                "accountants": "RDP (epsilon) and PRV (epsilon_prv), both Opacus; each "
                "site's delta is in its row",
                "target_epsilon": plan.target_epsilon if plan.private else None,
                "max_grad_norm": plan.max_grad_norm if plan.private else None,
                "scope": "epsilon: this run, all rounds; epsilon_dataset: the dataset's total "
                "over every run and fold in the node's signed ledger, which the node's cap "
                "(epsilon_cap) bounds",
                "hospital_level": (self.hospital_dp().to_dict()
                                   if self.hospital_dp is not None else None),
                "not_covered": "exact releases (validation metrics every round; test "
                "statistics unless the node sets stats-noise-multiplier) carry no DP "
                "guarantee: they are on each node's ledger at level 'exact', refused below "
                "its minimum release count, with small cells suppressed",
            },
            "run_id": plan.run_id,
            "excluded": self._excluded_rows(),
            "dropped": [json_safe(row) for row in self.dropped.values()],
            "config": self.config.to_dict(),
        }
        if self.final is not None:
            fm = {key: _clean(v) for key, v in self.final.evaluate_metrics.items()}
            out["final"] = {
                "split": k.SPLIT_TEST,
                "auc_pooled": fm.get(k.AUC_POOLED),
                "metrics": fm,
                "sites": [_site_row(r) for r in self.final.evaluate],
                "errors": self.final.errors,
            }
        out.update({key: json_safe(value) for key, value in self.extra.items()})
        return out

    def summary(self) -> str:
        """A plain-text summary for people."""
        lines = [f"Vesalius run: {self.status}" + (f" ({self.reason})" if self.reason else "")]
        lines.append("round  val-AUC  val-acc  val-loss  train-loss")
        for entry in self.rounds:
            m = entry.evaluate_metrics
            lines.append(
                f"{entry.round:>5}  {m.get(k.AUC, math.nan):7.3f}  "
                f"{m.get(k.ACCURACY, math.nan):7.3f}  {m.get(k.LOSS, math.nan):8.4f}  "
                f"{entry.train_metrics.get(k.TRAIN_LOSS, math.nan):10.4f}"
            )
            for err in entry.errors:
                lines.append(f"       ! {err['site']} ({err['phase']}): {err['reason']}")
            if entry.status == "failed":
                lines.append(f"       ! round {entry.round} failed: {entry.failure}")
        names = self.site_names()
        for node_id, why in sorted(self.excluded.items()):
            lines.append(f"excluded {names.get(node_id) or f'node {node_id}'}: {why}")
        lines.extend(dropped_lines(self.dropped.values()))
        lines.append("site          patients  epsilon    delta")
        for row in self.sites():
            eps, delta = row["epsilon"], row["delta"]
            lines.append(
                f"{row['site']:<12}  "
                f"{'hidden' if row['num_examples'] is None else row['num_examples']:>8}  "
                f"{'none' if eps is None else format(eps, '7.3f')}  "
                f"{'-' if delta is None else format(delta, '.1e')}"
            )
        from server.report_paradigm import paradigm_headline_text

        headline = paradigm_headline_text(self.extra.get("paradigm"))
        if headline is not None:
            lines.append(headline)
        elif self.final is not None:
            fm = self.final.evaluate_metrics
            if k.AUC_POOLED in fm:
                lines.append(f"final test AUC (pooled over sites): {fm[k.AUC_POOLED]:.3f}")
            elif k.AUC in fm:
                lines.append(f"final test AUC (mean of sites, weighted): {fm[k.AUC]:.3f}")
        lines.extend(_multiclass_lines(self.extra))
        lines.extend(_task_lines(self.extra))
        lines.extend(_operating_point_lines(self.extra))
        from server.report_secagg import secagg_lines

        lines.extend(secagg_lines(self.extra))
        from server.report_paradigm import paradigm_lines

        lines.extend(paradigm_lines(self.extra.get("paradigm")))
        return "\n".join(lines)

    def write(self, out_dir: Path) -> Path:
        """Write ``report.json`` and ``summary.txt`` atomically; return the JSON path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / REPORT_JSON, json.dumps(self.to_dict(), indent=2, allow_nan=False))
        atomic_write(out_dir / SUMMARY_TXT, self.summary() + "\n")
        return out_dir / REPORT_JSON


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
