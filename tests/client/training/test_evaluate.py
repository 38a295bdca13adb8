"""Evaluation metrics per image and per patient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from client.training import evaluate
from common.errors import ConfigError


class _FixedScores(nn.Module):
    """Returns logits whose class-1 softmax probability is the image's first pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x.flatten(1)[:, 0].clamp(1e-6, 1 - 1e-6)
        return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)


def _images(scores: list[float]) -> torch.Tensor:
    return torch.tensor(scores).reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()


def test_per_image_metrics_match_sklearn() -> None:
    scores = [0.9, 0.2, 0.6, 0.4, 0.7, 0.1]
    labels = torch.tensor([1, 0, 0, 1, 1, 0])
    result = evaluate(_FixedScores(), _images(scores), labels)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-5)
    assert result.num_examples == 6
    assert result.auc == pytest.approx(roc_auc_score(labels.numpy(), scores))
    assert result.accuracy == pytest.approx(4 / 6)
    expected_loss = -np.mean(np.log([0.9, 0.8, 0.4, 0.4, 0.7, 0.9]))
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)


def test_per_patient_aggregation_mean_score_max_label() -> None:
    # patient 7: images 0.9 (1), 0.3 (0) -> 0.6, 1 ; patient 2: 0.2, 0.4 (0, 0) -> 0.3, 0
    # patient 5: 0.8 (0) -> 0.8, 0
    scores = [0.9, 0.2, 0.3, 0.4, 0.8]
    labels = torch.tensor([1, 0, 0, 0, 0])
    pid = torch.tensor([7, 2, 7, 2, 5])
    result = evaluate(_FixedScores(), _images(scores), labels, patient_index=pid)
    assert result.num_examples == 3
    np.testing.assert_allclose(result.scores, [0.3, 0.8, 0.6], rtol=1e-5)  # sorted ids 2, 5, 7
    np.testing.assert_array_equal(result.labels, [0, 0, 1])
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.auc == pytest.approx(0.5)


def test_auc_is_nan_with_one_class() -> None:
    result = evaluate(_FixedScores(), _images([0.2, 0.7]), torch.tensor([1, 1]))
    assert math.isnan(result.auc)
    assert result.accuracy == 0.5


def test_model_mode_is_restored_and_inputs_checked() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    model.train()
    evaluate(model, torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 0, 1, 1]), batch_size=2)
    assert model.training
    with pytest.raises(ConfigError):
        evaluate(model, torch.randn(5, 1, 2, 2), torch.tensor([0, 1]))
    with pytest.raises(ConfigError):
        evaluate(model, torch.randn(2, 1, 2, 2), torch.tensor([0, 1]), patient_index=torch.tensor([1]))
