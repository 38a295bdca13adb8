"""The ensemble's pooled measures from the hospitals' histograms equal the same measures on
the pooled patients (scikit-learn / SciPy / NumPy) within the binning error; bagging's grid
hides undrawn hospitals and weighs drawn ones by their draws."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Message, MessageType, Metadata, MetricRecord, RecordDict
from scipy.special import expit
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, roc_auc_score

from client.queries.ensemble import ensemble_histograms
from common import messages as k
from common.paradigms.ensemble import MEMBER_HIST, UNCERTAINTY_HIST, VARIANT_HIST
from common.stats.conformal import coverage_counts
from server.paradigms import ensemble_stats as st
from server.paradigms.ensemble_bagging import BaggedGrid, bootstrap_hospitals
from tests.flower_helpers import DirectGrid

BINS, UBINS = 1000, 200


def _hospital(rng: np.random.Generator, n: int, members: int) -> dict[str, np.ndarray]:
    y = rng.integers(0, 2, n)
    signal = 1.2 * (2 * y - 1) + rng.normal(0, 1.0, n)
    probs = expit(signal + rng.normal(0, 0.6, (members, n)))
    mc = expit(signal + rng.normal(0, 0.3, (5, n)))
    return {"y": y, "p": probs, "mc": mc}


@pytest.fixture(scope="module")
def pooled() -> dict[str, object]:
    # Prepare: three hospitals, three members, unequal weights
    rng = np.random.default_rng(7)
    weights = np.array([0.5, 0.3, 0.2])
    sites = [_hospital(rng, n, 3) for n in (150, 220, 90)]
    hists = [ensemble_histograms(s["p"], s["y"], weights, s["mc"], bins=BINS,
                                 uncertainty_bins=UBINS) for s in sites]
    summed = {key: sum(h[key] for h in hists) for key in hists[0]}
    y = np.concatenate([s["y"] for s in sites])
    p = np.concatenate([s["p"] for s in sites], axis=1)
    mc = np.concatenate([s["mc"] for s in sites], axis=1)
    return {"h": summed, "y": y, "p": p, "mc": mc, "w": weights}


def _ece(y: np.ndarray, p: np.ndarray) -> float:
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    counts = np.bincount(np.clip((p * 10).astype(int), 0, 9), minlength=10)
    counts = counts[counts > 0]
    return float(np.sum(counts / len(y) * np.abs(prob_true - prob_pred)))


def test_pooled_auc_accuracy_and_ece_equal_sklearn_on_the_pooled_patients(pooled) -> None:
    h, y, p, w = pooled["h"], pooled["y"], pooled["p"], pooled["w"]
    ens = w @ p
    for v, scores in enumerate((p[0], ens)):
        hist = h[VARIANT_HIST][v]
        assert st.auc(hist) == pytest.approx(roc_auc_score(y, scores), abs=2e-3)
        assert st.accuracy(hist) == pytest.approx(accuracy_score(y, scores >= 0.5), abs=1e-12)
        assert st.ece(hist) == pytest.approx(_ece(y, scores), abs=1e-3)
    for i in range(p.shape[0]):
        assert st.auc(h[MEMBER_HIST][i]) == pytest.approx(roc_auc_score(y, p[i]), abs=2e-3)


def test_the_headline_interval_is_delong_on_the_pooled_binned_scores(pooled) -> None:
    from common.stats.auc import local_delong

    # Prepare: the ensemble's pooled scores, binned as the hospitals bin them
    h, y, p, w = pooled["h"], pooled["y"], pooled["p"], pooled["w"]
    ens = w @ p
    # Execute
    est = st.auc_estimate(h[VARIANT_HIST][1])
    # Assert: the statistics library's DeLong on the pooled patients, on the same bins
    ref = local_delong(ens, y, edges=np.linspace(0.0, 1.0, BINS + 1))
    assert est["value"] == pytest.approx(ref.auc, abs=1e-12)
    assert est["se"] == pytest.approx(math.sqrt(ref.var), rel=1e-9)
    assert est["lower"] < est["value"] < est["upper"] and est["n"] == len(y)
    assert st.auc_estimate(np.array([[1, 0], [0, 5]]))["lower"] is None


def test_error_detection_auroc_equals_sklearn_on_the_pooled_uncertainties(pooled) -> None:
    h, y, p, w, mc = pooled["h"], pooled["y"], pooled["p"], pooled["w"], pooled["mc"]
    ens = w @ p

    def entropy(q: np.ndarray) -> np.ndarray:
        return -(q * np.log2(q) + (1 - q) * np.log2(1 - q))

    variance = 4 * (w @ (p - ens) ** 2)
    cases = [(entropy(mc.mean(axis=0)), (mc.mean(axis=0) >= 0.5) != y),
             (variance, (ens >= 0.5) != y), (entropy(ens), (ens >= 0.5) != y)]
    for u, (values, wrong) in enumerate(cases):
        expected = roc_auc_score(wrong, values)
        assert st.error_auroc(h[UNCERTAINTY_HIST][u]) == pytest.approx(expected, abs=0.01)
        assert h[UNCERTAINTY_HIST][u][0].sum() == wrong.sum()


def test_conformal_threshold_and_coverage_match_the_pooled_scores(pooled) -> None:
    y, p, w = pooled["y"], pooled["p"], pooled["w"]
    ens = w @ p
    half = len(y) // 2  # first half calibrates, second half is "test" (same histograms code)
    cal = ensemble_histograms(p[:, :half], y[:half], w, p[:1, :half], bins=BINS)[VARIANT_HIST][1]
    test = ensemble_histograms(p[:, half:], y[half:], w, p[:1, half:], bins=BINS)[VARIANT_HIST][1]
    alpha = 0.1
    qhat = st.conformal_qhat(cal, alpha=alpha)
    scores = np.sort(np.where(y[:half] == 1, 1 - ens[:half], ens[:half]))
    kth = scores[math.ceil((half + 1) * (1 - alpha)) - 1]
    assert kth <= qhat <= kth + 1.0 / BINS + 1e-9
    got = st.coverage(test, qhat)
    ref = coverage_counts(ens[half:], y[half:], qhat)
    n = len(y) - half
    boundary = np.sum(np.abs(np.concatenate([ens[half:], 1 - ens[half:]]) - qhat) < 1.0 / BINS)
    assert got["coverage"]["value"] == pytest.approx(ref["covered"] / n, abs=boundary / n + 1e-12)
    assert sum(got["set_sizes"].values()) == n


def test_the_mc_dropout_mean_is_a_model_of_its_own_with_sklearn_figures(pooled) -> None:
    # Prepare: member 0's mean over its MC-dropout passes, per pooled patient
    h, y, mc = pooled["h"], pooled["y"], pooled["mc"]
    mean = mc.mean(axis=0)
    hist = h[VARIANT_HIST][2]
    # Assert: AUC, accuracy, ECE of the pooled histograms are sklearn's on the pooled means
    assert st.auc(hist) == pytest.approx(roc_auc_score(y, mean), abs=2e-3)
    assert st.accuracy(hist) == pytest.approx(accuracy_score(y, mean >= 0.5), abs=1e-12)
    assert st.ece(hist) == pytest.approx(_ece(y, mean), abs=1e-3)
    # Assert: its prediction sets cover as NumPy's sets on the pooled means do
    qhat = 0.6
    ref = coverage_counts(mean, y, qhat)
    boundary = np.sum(np.abs(np.concatenate([mean, 1 - mean]) - qhat) < 1.0 / BINS)
    got = st.coverage(hist, qhat)
    assert got["coverage"]["value"] == pytest.approx(ref["covered"] / len(y),
                                                     abs=boundary / len(y) + 1e-12)


def test_a_stacker_head_combines_the_members_logits(pooled) -> None:
    from scipy.special import logit

    from client.queries.ensemble import stacked

    # Prepare: a head [v_1, v_2, v_3, b]
    y, p, w, mc = pooled["y"], pooled["p"], pooled["w"], pooled["mc"]
    head = np.array([0.9, 0.4, -0.2, 0.3])
    # Execute
    h = ensemble_histograms(p, y, w, mc, bins=BINS, uncertainty_bins=UBINS, stacker=head)
    # Assert: the ensemble row is sklearn's AUC of sigmoid(b + v . logit p); disagreement
    # keeps the weighted mean
    ens = expit(head[-1] + head[:-1] @ logit(p))
    assert stacked(p, head) == pytest.approx(ens)
    assert st.auc(h[VARIANT_HIST][1]) == pytest.approx(roc_auc_score(y, ens), abs=2e-3)
    assert st.accuracy(h[VARIANT_HIST][1]) == pytest.approx(accuracy_score(y, ens >= 0.5))
    mean = w @ p
    variance = 4 * (w @ (p - mean) ** 2)
    assert st.error_auroc(h[UNCERTAINTY_HIST][1]) == pytest.approx(
        roc_auc_score((ens >= 0.5) != y, variance), abs=0.01)


def test_youden_threshold_and_accuracy_at_it_equal_sklearn_on_the_binned_scores() -> None:
    from sklearn.metrics import roc_curve

    # Prepare: badly calibrated scores (every patient below 0.5, as a DP model may give)
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    scores = np.floor(expit(-2.5 + 1.5 * y + rng.normal(0, 0.7, 400)) * BINS) / BINS
    hist = np.stack([np.bincount((scores[y == 1] * BINS).astype(int), minlength=BINS),
                     np.bincount((scores[y == 0] * BINS).astype(int), minlength=BINS)])
    # Execute
    t = st.youden_threshold(hist)
    # Assert: the threshold attains sklearn's best J over the ROC curve of the same scores,
    # and accuracy at it is sklearn's accuracy of score >= t
    fpr, tpr, _ = roc_curve(y, scores)
    pred = scores >= t - 1e-12
    j = np.mean(pred[y == 1]) - np.mean(pred[y == 0])
    assert j == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    assert t < 0.5
    assert st.accuracy(hist, t) == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert st.youden_threshold(np.stack([hist[0], 0 * hist[1]])) == 0.5  # one class: default


def test_errors_are_counted_at_the_given_thresholds(pooled) -> None:
    # Prepare: thresholds for the single model, the ensemble and the MC-dropout mean
    y, p, w, mc = pooled["y"], pooled["p"], pooled["w"], pooled["mc"]
    t = np.array([0.3, 0.35, 0.4])
    # Execute
    h = ensemble_histograms(p, y, w, mc, bins=BINS, uncertainty_bins=UBINS, thresholds=t)
    # Assert: each uncertainty row's error count is the misclassified patients at its
    # model's threshold, and error-detection AUROC is sklearn's on those errors
    ens, mean = w @ p, mc.mean(axis=0)
    wrong_ens, wrong_mc = (ens >= t[1]) != y, (mean >= t[2]) != y
    assert h[UNCERTAINTY_HIST][0][0].sum() == wrong_mc.sum()
    assert h[UNCERTAINTY_HIST][1][0].sum() == wrong_ens.sum()
    assert wrong_ens.sum() != ((ens >= 0.5) != y).sum()  # the threshold matters here
    variance = 4 * (w @ (p - ens) ** 2)
    assert st.error_auroc(h[UNCERTAINTY_HIST][1]) == pytest.approx(
        roc_auc_score(wrong_ens, variance), abs=0.01)


def test_weights_follow_the_members_pooled_validation_auc(pooled) -> None:
    h, y, p = pooled["h"], pooled["y"], pooled["p"]
    raw = np.maximum([roc_auc_score(y, row) - 0.5 for row in p], 0.01)
    assert st.member_weights(h[MEMBER_HIST]) == pytest.approx(raw / raw.sum(), abs=5e-3)


class _Hospitals(DirectGrid):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []

    def get_node_ids(self) -> Iterable[int]:
        return [11, 12, 13]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        out = []
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            self.asked.append(node)
            meta = Metadata(run_id=1, message_id=f"r{node}{time.monotonic_ns()}",
                            src_node_id=node, dst_node_id=0, reply_to_message_id="",
                            group_id="", created_at=time.time(), ttl=60.0,
                            message_type=MessageType.TRAIN)
            out.append(Message(content=RecordDict({k.METRICS: MetricRecord(
                {k.NUM_EXAMPLES: 10, k.UNIT_WEIGHT: 1})}), metadata=meta))
        return out


def test_bootstrap_draws_are_reproducible_and_resample_every_hospital_count() -> None:
    draws = bootstrap_hospitals([13, 11, 12], seed=3)
    assert draws == bootstrap_hospitals([11, 12, 13], seed=3)
    assert sum(draws.values()) == 3 and set(draws) <= {11, 12, 13}
    assert any(len(bootstrap_hospitals([11, 12, 13], seed=s)) < 3 for s in range(10))


def test_bagged_grid_hides_undrawn_hospitals_and_counts_a_double_draw_twice() -> None:
    inner = _Hospitals()
    grid = BaggedGrid(inner, {11: 2, 13: 1})
    messages = [Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN)
                for n in (11, 12, 13)]
    replies = list(grid.send_and_receive(messages))
    assert list(grid.get_node_ids()) == [11, 13] and inner.asked == [11, 13]
    weights = {int(r.metadata.src_node_id): r.content[k.METRICS][k.NUM_EXAMPLES] for r in replies}
    assert weights == {11: 20, 13: 10}
    assert replies[0].content[k.METRICS][k.UNIT_WEIGHT] == 2


def _request(release_histograms: bool, **config: object):  # type: ignore[no-untyped-def]
    import torch
    from flwr.app import ArrayRecord, ConfigRecord

    from client.queries.registry import QueryRequest
    from common.config import NodeConfig, TrainPlan

    arrays = ArrayRecord(torch.nn.Linear(1, 1).state_dict())
    content = RecordDict({f"{k.ENSEMBLE_PREFIX}{i}": arrays for i in range(3)})
    return QueryRequest(name="ensemble-scores", node=NodeConfig(
        data_dir="/nonexistent", release_histograms=release_histograms), plan=TrainPlan(),
        split=k.SPLIT_TEST, config=ConfigRecord(dict(config)), content=content)


def test_the_query_declares_its_histograms_with_their_sensitivities_before_reading_data() -> None:
    from client.queries import get_query
    from common.errors import ConfigError

    query = get_query("ensemble-scores")
    declared = {s.key: s for s in query.statistics(_request(True, **{k.VALUE_BINS: 100}))}
    assert declared[MEMBER_HIST].shape == (3, 2, 100)
    assert declared[MEMBER_HIST].sensitivity == pytest.approx(math.sqrt(3))
    assert declared[VARIANT_HIST].sensitivity == pytest.approx(math.sqrt(3))
    assert declared[VARIANT_HIST].shape == (3, 2, 100)  # single, ensemble, MC-dropout mean
    assert declared[UNCERTAINTY_HIST].sensitivity == pytest.approx(math.sqrt(3))
    assert not any(s.small_cells for s in declared.values())
    with pytest.raises(ConfigError, match="histograms"):
        query.statistics(_request(False))
    with pytest.raises(ConfigError, match="weights"):
        query.statistics(_request(True, **{"ensemble-weights": [1.0, -1.0, 0.5]}))
    with pytest.raises(ConfigError, match="stacker"):
        query.statistics(_request(True, **{"ensemble-stacker": [1.0, 0.5]}))
