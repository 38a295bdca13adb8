"""Federated cross-validation on the coordinator, against an in-process fake Grid."""

from __future__ import annotations

import json
import math
import uuid
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from statsmodels.stats.proportion import proportion_confint

from common import messages as k
from common.config import RunConfig, TrainPlan
from common.errors import ConfigError
from common.stats.histogram import score_histograms
from server.cv import CVSpec, FoldEvent, run_cross_validation, summarise_histograms
from tests.flower_helpers import DirectGrid

torch.set_num_threads(1)


def _delong_direct(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """DeLong et al. (1988) AUC and variance on raw scores, O(n_pos * n_neg)."""
    x, y = scores[labels == 1], scores[labels == 0]
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    auc = float(psi.mean())
    return auc, float(v10.var(ddof=1) / x.size + v01.var(ddof=1) / y.size)


class FakeNode:
    """A node that trains instantly and scores its held-out patients from a seeded RNG."""

    def __init__(self, site: str, *, refuse_fold: int | None = None, release: bool = True,
                 n: int = 40) -> None:
        self.site, self.refuse_fold, self.release, self.n = site, refuse_fold, release, n
        self.received: list[tuple[str, dict[str, Any], ArrayRecord | None]] = []
        self.heldout: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def handle(self, msg: Message) -> RecordDict | Error:
        cfg = dict(msg.content[k.CONFIG])  # type: ignore[arg-type]
        arrays = msg.content.get(k.ARRAYS)
        self.received.append((msg.metadata.message_type, cfg, arrays))  # type: ignore[arg-type]
        info = ConfigRecord({k.SITE: self.site})
        fold = int(cfg[k.FOLD])
        if msg.metadata.message_type == "train":
            if fold == self.refuse_fold:
                # As a real node replies: its refusal code and a site-named reason.
                return Error(code=k.ERROR_CODE_REFUSED,
                             reason=f"[{self.site}] refused: the plan would exceed this node's cap")
            eps = 0.5 * fold + 0.1 * int(cfg[k.SERVER_ROUND])
            metrics = MetricRecord({k.NUM_EXAMPLES: self.n, k.TRAIN_LOSS: 0.5, k.EPSILON: eps,
                                    k.DELTA: 1e-5, k.NOISE_MULTIPLIER: 1.0, k.SAMPLE_RATE: 0.1,
                                    k.STEPS: 4})
            return RecordDict({k.ARRAYS: arrays, k.METRICS: metrics, k.NODE_INFO: info})
        if cfg[k.SPLIT] != k.SPLIT_HELDOUT:  # validation (site discovery)
            return RecordDict({k.METRICS: MetricRecord({k.NUM_EXAMPLES: self.n, k.AUC: 0.5}),
                               k.NODE_INFO: info})
        rng = np.random.default_rng(abs(hash((self.site, fold))) % 2**32)
        y = rng.integers(0, 2, self.n)
        s = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1), 3)  # on the bin edges
        self.heldout[fold] = (s, y)
        values: dict[str, Any] = {k.NUM_EXAMPLES: self.n, k.AUC: float(roc_auc_score(y, s))}
        if self.release and bool(cfg.get(k.WITH_HISTOGRAMS, False)):
            pos, neg = score_histograms(s, y)
            values[k.HIST_POSITIVE], values[k.HIST_NEGATIVE] = pos.tolist(), neg.tolist()
        return RecordDict({k.METRICS: MetricRecord(values), k.NODE_INFO: info})

    def calls(self, kind: str, split: str | None = None) -> list[dict[str, Any]]:
        return [c for t, c, _ in self.received if t == kind and (split is None or c.get(k.SPLIT) == split)]


class FakeGrid(DirectGrid):
    """Delivers every message to a FakeNode at once (like Flower's in-memory grid)."""

    def __init__(self, nodes: dict[int, FakeNode]) -> None:
        self.nodes = nodes
        super().__init__()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            answer = self.nodes[msg.metadata.dst_node_id].handle(msg)
            replies.append(Message(answer, reply_to=msg))
        return replies


def _config(tmp_path: Path, secure_aggregation: str = "off", **plan: Any) -> RunConfig:
    # The fake nodes do not speak the secure-aggregation protocol: off unless a test asks.
    base = {"num_rounds": 2, "image_size": 16, "seed": 3, "run_id": "study"}
    return RunConfig(plan=TrainPlan(**{**base, **plan}), out_dir=str(tmp_path), min_nodes=2,
                     secure_aggregation=secure_aggregation)


def test_kfold_plans_folds_fresh_weights_and_report_after_every_fold(tmp_path: Path) -> None:
    # Prepare
    nodes = {11: FakeNode("site-a"), 12: FakeNode("site-b")}
    seen_on_disk: list[int] = []

    def progress(event: FoldEvent) -> None:
        if event.stage == "evaluated":  # the report already holds this fold
            doc = json.loads((tmp_path / "report.json").read_text())
            seen_on_disk.append(len(doc["inference"]["cv"]["folds"]))
            assert doc["inference"]["cv"]["folds"][-1]["fold"] == event.fold

    # Execute
    result = run_cross_validation(FakeGrid(nodes), _config(tmp_path), num_folds=3,
                                  leave_one_site_out=False, progress=progress)
    # Assert
    assert seen_on_disk == [1, 2, 3] and result.status == "completed"
    for node in nodes.values():
        trains = node.calls("train")
        assert [(c[k.FOLD], c[k.SERVER_ROUND]) for c in trains] == [
            (f, r) for f in range(3) for r in (1, 2)]
        assert {c[k.CV_MODE] for c in trains} == {"kfold"} and {c[k.NUM_FOLDS] for c in trains} == {3}
        assert {c[k.SEED] for c in trains} == {3}  # one fold assignment for all folds
        assert [c[k.RUN_ID] for c in trains[::2]] == ["study-fold-0", "study-fold-1", "study-fold-2"]
        assert [c[k.FOLD] for c in node.calls("evaluate", k.SPLIT_HELDOUT)] == [0, 1, 2]
        assert not node.calls("evaluate", k.SPLIT_VAL)  # no per-round validation in CV
    # Every fold starts from fresh weights, different per fold and reproducible.
    first = [a for t, c, a in nodes[11].received if t == "train" and c[k.SERVER_ROUND] == 1]
    states = [a.to_torch_state_dict() for a in first if a is not None]
    assert len(states) == 3
    key = next(iter(states[0]))
    assert not torch.equal(states[0][key], states[1][key])
    again = run_cross_validation(FakeGrid({1: FakeNode("x"), 2: FakeNode("y")}),
                                 _config(tmp_path / "again"), num_folds=3, leave_one_site_out=False)
    assert again.status == "completed"
    for fold in range(3):
        saved = torch.load(tmp_path / f"fold-{fold}" / "checkpoints" / "final.pt")
        assert torch.equal(saved[key], states[fold][key])  # fake nodes return weights unchanged
        assert (tmp_path / f"fold-{fold}" / "report.json").exists()


def test_fold_and_pooled_auc_cis_equal_direct_computation_on_pooled_scores(tmp_path: Path) -> None:
    nodes = {1: FakeNode("a", n=60), 2: FakeNode("b", n=45)}
    run_cross_validation(FakeGrid(nodes), _config(tmp_path, num_rounds=1), num_folds=2,
                         leave_one_site_out=False)
    doc = json.loads((tmp_path / "report.json").read_text())
    cv = doc["inference"]["cv"]
    z = norm.ppf(0.975)
    all_s, all_y, fold_aucs = [], [], []
    for row in cv["folds"]:
        s = np.concatenate([n.heldout[row["fold"]][0] for n in nodes.values()])
        y = np.concatenate([n.heldout[row["fold"]][1] for n in nodes.values()])
        auc, var = _delong_direct(s, y)
        assert row["auc"]["value"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert row["auc"]["lower"] == pytest.approx(auc - z * math.sqrt(var), abs=1e-9)
        assert row["auc"]["upper"] == pytest.approx(auc + z * math.sqrt(var), abs=1e-9)
        assert row["n"] == 105 and cv["fold_details"][row["fold"]]["n_pos"] == int(y.sum())
        assert set(row["epsilon_by_site"]) == {"a", "b"}
        assert row["epsilon_by_site"]["a"] == pytest.approx(0.5 * row["fold"] + 0.1)
        all_s.append(s), all_y.append(y), fold_aucs.append(auc)
    s, y = np.concatenate(all_s), np.concatenate(all_y)
    auc, var = _delong_direct(s, y)
    pooled = cv["pooled"]
    assert pooled["auc"]["value"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pooled["auc"]["lower"] == pytest.approx(auc - z * math.sqrt(var), abs=1e-9)
    assert pooled["auc"]["upper"] == pytest.approx(auc + z * math.sqrt(var), abs=1e-9)
    assert pooled["auc_mean"] == pytest.approx(np.mean(fold_aucs))
    assert pooled["auc_sd"] == pytest.approx(np.std(fold_aucs, ddof=1))
    pred = s >= 0.5
    acc_lo, acc_hi = proportion_confint(int((pred == y).sum()), y.size, method="wilson")
    assert pooled["accuracy"]["value"] == pytest.approx(np.mean(pred == y))
    assert pooled["accuracy"]["lower"] == pytest.approx(acc_lo)
    assert pooled["accuracy"]["upper"] == pytest.approx(acc_hi)
    sens = int((pred & (y == 1)).sum()) / int(y.sum())
    assert pooled["sensitivity"]["value"] == pytest.approx(sens)


def test_refusing_node_is_listed_per_fold_and_the_run_goes_on(tmp_path: Path) -> None:
    nodes = {1: FakeNode("good"), 2: FakeNode("tight", refuse_fold=1)}
    result = run_cross_validation(FakeGrid(nodes), _config(tmp_path), num_folds=2,
                                  leave_one_site_out=False)
    cv = json.loads((tmp_path / "report.json").read_text())["inference"]["cv"]
    folds, details = cv["folds"], cv["fold_details"]
    assert details[0]["errors"] == [] and folds[0]["issues"] == 0
    refusals = [e for e in details[1]["errors"] if e["phase"] == "train"]
    # Refused in round 1, then excluded from the rest of that fold (on-refusal = exclude).
    assert [(e["site"], e["round"]) for e in refusals] == [("tight", 1)]
    assert all("refused" in e["reason"] for e in refusals)
    assert set(folds[1]["epsilon_by_site"]) == {"good"}
    assert [f.status for f in result.folds] == ["completed", "completed"]


def test_on_refusal_stop_ends_the_cross_validation(tmp_path: Path) -> None:
    nodes = {1: FakeNode("good"), 2: FakeNode("tight", refuse_fold=0)}
    cfg = _config(tmp_path)
    cfg = RunConfig(plan=cfg.plan, out_dir=cfg.out_dir, on_refusal="stop")
    result = run_cross_validation(FakeGrid(nodes), cfg, num_folds=3, leave_one_site_out=False)
    assert result.status == "stopped" and len(result.folds) == 1
    assert "refused" in result.reason


def test_node_without_histograms_makes_the_fold_incomplete_not_a_crash(tmp_path: Path) -> None:
    nodes = {1: FakeNode("a"), 2: FakeNode("b", release=False)}
    result = run_cross_validation(FakeGrid(nodes), _config(tmp_path, num_rounds=1), num_folds=2,
                                  leave_one_site_out=False)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert result.status == "failed" and doc["status"] == "failed"
    cv = doc["inference"]["cv"]
    assert all(f["status"] == "incomplete" and f["auc"] is None for f in cv["folds"])
    assert cv["pooled"]["auc"] is None and "histograms" in cv["fold_details"][0]["reason"]
    assert {s["site"] for s in cv["fold_details"][0]["heldout_by_site"]} == {"a", "b"}


def test_leave_one_site_out_folds_are_sites_and_heldout_site_does_not_train(tmp_path: Path) -> None:
    nodes = {5: FakeNode("site-c"), 6: FakeNode("site-a"), 7: FakeNode("site-b")}
    result = run_cross_validation(FakeGrid(nodes), _config(tmp_path, num_rounds=1),
                                  num_folds=None, leave_one_site_out=True)
    doc = json.loads((tmp_path / "report.json").read_text())
    cv = doc["inference"]["cv"]
    assert cv["mode"] == "loso" and cv["num_folds"] == 3 and result.status == "completed"
    assert [f["held_out"] for f in cv["folds"]] == ["site-a", "site-b", "site-c"]
    for fold, node in enumerate([nodes[6], nodes[7], nodes[5]]):
        assert fold not in {c[k.FOLD] for c in node.calls("train")}  # held out: never trains
        assert [c[k.FOLD] for c in node.calls("evaluate", k.SPLIT_HELDOUT)] == [fold]
        row, detail = cv["folds"][fold], cv["fold_details"][fold]
        s, y = node.heldout[fold]
        assert row["auc"]["value"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert [site["site"] for site in detail["heldout_by_site"]] == [row["held_out"]]
        assert row["held_out"] not in row["epsilon_by_site"] and len(row["epsilon_by_site"]) == 2
    meta = doc["inference"]["meta"]["auc"]  # DerSimonian-Laird over the held-out sites
    assert meta["k"] == 3 and [m["site"] for m in meta["sites"]] == ["site-a", "site-b", "site-c"]
    assert [m["estimate"] for m in meta["sites"]] == [f["auc"]["value"] for f in cv["folds"]]
    trains = nodes[5].calls("train")
    assert {(c[k.CV_MODE], c[k.HOLDOUT_SITE]) for c in trains} == {("loso", "site-a"), ("loso", "site-b")}
    # Every hospital's latest spend over the folds, by name (each trained in two of three folds)
    last = {f["held_out"]: f["epsilon_by_site"] for f in cv["folds"]}
    assert [s["site"] for s in doc["sites"]] == ["site-a", "site-b", "site-c"]
    assert {s["site"]: s["epsilon"] for s in doc["sites"]} == {
        "site-a": last["site-c"]["site-a"], "site-b": last["site-c"]["site-b"],
        "site-c": last["site-b"]["site-c"]}


def test_spec_parsing_and_validation() -> None:
    assert CVSpec.from_user_config({k.CV_FOLDS: 5}).mode == "kfold"
    assert CVSpec.from_user_config({k.CV_LEAVE_ONE_SITE_OUT: "true"}).mode == "loso"
    assert not CVSpec.from_user_config({}).enabled
    with pytest.raises(ConfigError, match="either"):
        CVSpec(num_folds=3, leave_one_site_out=True)
    with pytest.raises(ConfigError, match=">= 2"):
        CVSpec(num_folds=1)


def test_summary_of_one_class_has_no_auc_but_keeps_counts() -> None:
    out = summarise_histograms([0] * 999 + [3], [0] * 1000)
    assert out["auc"] is None and out["n"] == 3 and out["sensitivity"]["value"] == 1.0
    assert out["specificity"] is None  # no negative patient: undefined, not 0


def _assert_auc_matches_pooled(auc: dict[str, Any], s: np.ndarray, y: np.ndarray) -> None:
    from common.stats.bins import bin_index, fine_score_edges

    binned = bin_index(s, fine_score_edges()).astype(float)
    value, var = _delong_direct(binned, y)
    z = norm.ppf(0.975)
    assert auc["value"] == pytest.approx(value, abs=1e-12)
    assert auc["lower"] == pytest.approx(max(0.0, value - z * math.sqrt(var)), abs=1e-9)
    assert auc["upper"] == pytest.approx(min(1.0, value + z * math.sqrt(var)), abs=1e-9)
    # Ties within a fine bin count 1/2: at most the share of positive/negative pairs in one bin.
    pairs_in_bin = sum(int(((binned == b) & (y == 1)).sum()) * int(((binned == b) & (y == 0)).sum())
                       for b in np.unique(binned))
    bound = 0.5 * pairs_in_bin / (int(y.sum()) * int((y == 0).sum())) + 1e-12
    assert abs(auc["value"] - roc_auc_score(y, s)) <= bound


@pytest.fixture(scope="module")
def two_hospitals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("cvfed")
    synthesize_federation(root, n_sites=2, patients_per_site=20, image_size=16, seed=4)
    return root


@pytest.mark.slow
def test_real_nodes_in_process_fold_auc_and_ci_equal_direct_delong_on_pooled_scores(
    tmp_path: Path, two_hospitals: Path
) -> None:
    """The real ClientApp (train, statistics queries) behind an in-process grid, no Ray.

    After one DP round the scores crowd together, so the reference is DeLong on the pooled
    scores binned on the shared fine edges (what the nodes release); the raw-score AUC of
    scikit-learn is checked too, within the binning's tie error.
    """
    from client.data import load_node_data
    from client.data.folds import cv_splits
    from client.training import evaluate
    from common.config import NodeConfig
    from common.models import build_model
    from tests.client.queries.fake_grid import InProcessGrid

    # Prepare
    nodes = {
        21 + i: NodeConfig(data_dir=two_hospitals / f"site-{i + 1}", site_name=f"site-{i + 1}",
                           epsilon_cap=8.0, release_histograms=True, min_release_count=0,
                           ledger_dir=tmp_path / f"ledger-{i}", device="cpu")
        for i in range(2)
    }
    config = _config(tmp_path / "out", num_rounds=1, batch_size=8, image_size=16,
                     target_epsilon=4.0)
    # Execute
    result = run_cross_validation(InProcessGrid(nodes), config, num_folds=2,
                                  leave_one_site_out=False)
    # Assert
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    cv = doc["inference"]["cv"]
    assert result.status == "completed", cv["fold_details"]
    assert all(d["source"].startswith("statistics query") for d in cv["fold_details"])
    assert all(d["errors"] == [] for d in cv["fold_details"])
    for detail in cv["fold_details"]:  # per-site held-out AUCs from each site's histograms
        assert sorted(site["site"] for site in detail["heldout_by_site"]) == ["site-1", "site-2"]
        assert sum(site["n"] for site in detail["heldout_by_site"]) == 20
    pooled_s, pooled_y = [], []
    for row in cv["folds"]:
        model = build_model("cnn", in_channels=1, num_classes=2, image_size=16)
        model.load_state_dict(torch.load(tmp_path / "out" / f"fold-{row['fold']}" / "checkpoints"
                                         / "final.pt"))
        plan = TrainPlan(**{**{"num_rounds": 1, "image_size": 16, "seed": 3},
                            "cv_mode": "kfold", "fold": row["fold"], "num_folds": 2})
        scores, labels = [], []
        for node in nodes.values():
            data = load_node_data(node.data_dir, image_size=16, seed=0)
            held = cv_splits(data, plan=plan, site_name=node.site_name)[1]
            res = evaluate(model, held.images, held.labels, patient_index=held.patient_index,
                           device="cpu")
            scores.append(res.scores), labels.append(res.labels)
        s, y = np.concatenate(scores), np.concatenate(labels)
        assert row["n"] == y.size
        _assert_auc_matches_pooled(row["auc"], s, y)
        assert all(0 < eps <= 8.0 for eps in row["epsilon_by_site"].values())
        pooled_s.append(s), pooled_y.append(y)
    s, y = np.concatenate(pooled_s), np.concatenate(pooled_y)
    assert cv["pooled"]["n"] == 40 and y.size == 40  # every patient held out exactly once
    _assert_auc_matches_pooled(cv["pooled"]["auc"], s, y)
    assert (tmp_path / "out" / "report.html").exists()


@pytest.fixture(scope="module")
def three_hospitals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("cvfed3")
    synthesize_federation(root, n_sites=3, patients_per_site=20, image_size=16, seed=4)
    return root


@pytest.mark.slow
def test_secure_cross_validation_trains_masked_and_sums_heldout_statistics(
    tmp_path: Path, three_hospitals: Path
) -> None:
    """Secure aggregation on: SecureFedAvg trains every fold (train replies carry only masked
    vectors) and the held-out statistics are summed securely; the fold and pooled AUCs still
    equal DeLong on the pooled binned scores; per-site held-out values are hidden."""
    from client.data import load_node_data
    from client.data.folds import cv_splits
    from client.training import evaluate
    from common.config import NodeConfig
    from common.models import build_model
    from server.inference_secure import HIDDEN
    from tests.client.queries.fake_grid import InProcessGrid

    # Prepare
    nodes = {
        31 + i: NodeConfig(data_dir=three_hospitals / f"site-{i + 1}", site_name=f"site-{i + 1}",
                           epsilon_cap=8.0, release_histograms=True, min_release_count=0,
                           ledger_dir=tmp_path / f"ledger-{i}", device="cpu")
        for i in range(3)
    }
    config = _config(tmp_path / "out", secure_aggregation="on", num_rounds=1, batch_size=8,
                     image_size=16, target_epsilon=4.0)
    grid = InProcessGrid(nodes)
    # Execute
    result = run_cross_validation(grid, config, num_folds=2, leave_one_site_out=False)
    # Assert
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    cv = doc["inference"]["cv"]
    assert result.status == "completed", cv["fold_details"]
    assert doc["secure_aggregation"]["enabled"] and doc["secure_aggregation"][
        "heldout_summed_folds"] == [0, 1]
    for reply in grid.replies:  # nothing a hospital trained or released left in the clear
        if reply.metadata.message_type == "train" and not reply.has_error():
            assert k.SECAGG_MASKED in reply.content and k.ARRAYS not in reply.content
        metrics = reply.content.get(k.METRICS) if not reply.has_error() else None
        assert not set(metrics or {}) & {k.HIST_POSITIVE, k.TP, k.NUM_EXAMPLES}
    for detail in cv["fold_details"]:
        assert detail["heldout_by_site"] == HIDDEN and detail["errors"] == []
        assert detail["source"].startswith("statistics query")
    pooled_s, pooled_y = [], []
    for row in cv["folds"]:
        model = build_model("cnn", in_channels=1, num_classes=2, image_size=16)
        model.load_state_dict(torch.load(tmp_path / "out" / f"fold-{row['fold']}" / "checkpoints"
                                         / "final.pt"))
        plan = TrainPlan(**{**{"num_rounds": 1, "image_size": 16, "seed": 3},
                            "cv_mode": "kfold", "fold": row["fold"], "num_folds": 2})
        scores, labels = [], []
        for node in nodes.values():
            data = load_node_data(node.data_dir, image_size=16, seed=0)
            held = cv_splits(data, plan=plan, site_name=node.site_name)[1]
            res = evaluate(model, held.images, held.labels, patient_index=held.patient_index,
                           device="cpu")
            scores.append(res.scores), labels.append(res.labels)
        s, y = np.concatenate(scores), np.concatenate(labels)
        assert row["n"] == y.size
        _assert_auc_matches_pooled(row["auc"], s, y)
        pooled_s.append(s), pooled_y.append(y)
    s, y = np.concatenate(pooled_s), np.concatenate(pooled_y)
    assert cv["pooled"]["n"] == 60
    _assert_auc_matches_pooled(cv["pooled"]["auc"], s, y)


class QueryNode(FakeNode):
    """Answers the 'metrics' statistics query on its validation and held-out patients (seeded
    scores on the histogram edges), with the confusion counts at the threshold asked."""

    def __init__(self, site: str, *, shift: float) -> None:
        super().__init__(site, n=60)
        self.shift = shift  # a fold model's scores, uncalibrated: all of one side of 0.5
        self.validation: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def handle(self, msg: Message) -> RecordDict | Error:
        cfg = dict(msg.content[k.CONFIG])  # type: ignore[arg-type]
        if msg.metadata.message_type != "query" or cfg.get(k.QUERY) != "metrics":
            return super().handle(msg)
        fold, split = int(cfg[k.FOLD]), str(cfg[k.SPLIT])
        # seeded by a stable digest (str hashes differ between processes)
        rng = np.random.default_rng(zlib.crc32(f"{self.site}/{fold}/{split}".encode()))
        y = rng.integers(0, 2, self.n)
        s = np.round(np.clip(rng.normal(self.shift + 0.15 * y, 0.06), 0, 0.49), 3)
        (self.validation if split == k.SPLIT_VAL else self.heldout)[fold] = (s, y)
        t = float(cfg[k.THRESHOLD])
        pos, neg = score_histograms(s, y)
        pred = s >= t
        values = {k.NUM_EXAMPLES: self.n, k.TP: int(np.sum(pred & (y == 1))),
                  k.FP: int(np.sum(pred & (y == 0))), k.TN: int(np.sum(~pred & (y == 0))),
                  k.FN: int(np.sum(~pred & (y == 1))),
                  k.HIST_POSITIVE: pos.tolist(), k.HIST_NEGATIVE: neg.tolist()}
        return RecordDict({k.METRICS: MetricRecord(values),
                           k.NODE_INFO: ConfigRecord({k.SITE: self.site})})


def test_each_fold_thresholds_at_youden_on_its_validation_patients_not_at_half(tmp_path: Path) -> None:
    # Every score below 0.5 (as a DP-SGD model's raw scores can be): at 0.5 sensitivity is
    # 0. The threshold is chosen on the validation patients; the held-out metrics are at it.
    from sklearn.metrics import roc_curve

    nodes = {11: QueryNode("site-a", shift=0.2), 12: QueryNode("site-b", shift=0.22)}
    result = run_cross_validation(FakeGrid(nodes), _config(tmp_path), num_folds=2,
                                  leave_one_site_out=False)
    cv = result.to_dict()["inference"]["cv"]
    total = {c: 0 for c in ("tp", "fp", "tn", "fn")}
    for fold, (row, detail) in enumerate(zip(cv["folds"], cv["fold_details"], strict=True)):
        s = np.concatenate([n.validation[fold][0] for n in nodes.values()])
        y = np.concatenate([n.validation[fold][1] for n in nodes.values()])
        fpr, tpr, thresholds = roc_curve(y, s)
        best = thresholds[np.argmax(tpr - fpr)]  # sklearn's Youden threshold: a validation score
        point = detail["operating_point"]
        assert point["chosen_on"] == "validation" and point["method"] == "youden"
        below = s[s < best].max()  # the chosen threshold sits between the same two scores
        assert below < point["threshold"] <= best + 1e-9
        assert point["validation"]["youden_j"] == pytest.approx(np.max(tpr - fpr))
        hs = np.concatenate([n.heldout[fold][0] for n in nodes.values()])
        hy = np.concatenate([n.heldout[fold][1] for n in nodes.values()])
        pred = hs >= point["threshold"]
        counts = {"tp": int(np.sum(pred & (hy == 1))), "fp": int(np.sum(pred & (hy == 0))),
                  "tn": int(np.sum(~pred & (hy == 0))), "fn": int(np.sum(~pred & (hy == 1)))}
        assert detail["confusion"] == counts
        assert row["sensitivity"]["value"] == pytest.approx(counts["tp"] / (counts["tp"] + counts["fn"]))
        assert row["sensitivity"]["value"] > 0.5  # at 0.5 it would be 0
        assert np.all(hs < 0.5)
        for c in total:
            total[c] += counts[c]
    pooled = cv["pooled"]
    assert pooled["confusion"] == total
    lo, hi = proportion_confint(total["tp"], total["tp"] + total["fn"], alpha=0.05, method="wilson")
    assert pooled["sensitivity"]["value"] == pytest.approx(total["tp"] / (total["tp"] + total["fn"]))
    assert (pooled["sensitivity"]["lower"], pooled["sensitivity"]["upper"]) == pytest.approx((lo, hi))
