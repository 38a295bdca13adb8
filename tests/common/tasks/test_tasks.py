"""Task semantics: targets checked with safe reasons, patient aggregation, the registry's pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from common.errors import ConfigError, DataError
from common.tasks import (
    BINARY,
    MULTICLASS,
    MULTILABEL,
    ORDINAL,
    RECONSTRUCTION,
    REGRESSION,
    SEGMENTATION,
    check_pair,
    get_task,
    list_tasks,
    tasks_of,
)


def test_the_registry_holds_the_seven_tasks_by_name() -> None:
    assert [t.info.name for t in list_tasks()] == [
        "binary", "multiclass", "ordinal", "multilabel", "regression", "segmentation",
        "reconstruction"]
    assert get_task("ordinal") is ORDINAL
    with pytest.raises(ConfigError, match="choose one of binary, multiclass"):
        get_task("survival")


def test_an_unsupported_pair_names_what_fits() -> None:
    assert check_pair("segmentation", "unet") is SEGMENTATION
    with pytest.raises(ConfigError) as info:
        check_pair("segmentation", "cnn")
    assert "models for segmentation: multi-task-unet, unet" in str(info.value)
    assert "it serves binary, multiclass" in str(info.value)
    assert tasks_of("unet") == ["segmentation"]
    assert "reconstruction" in tasks_of("autoencoder") and "reconstruction" not in tasks_of("cnn")


@pytest.mark.parametrize(
    ("task", "targets", "why"),
    [
        (BINARY, torch.tensor([0, 2]), "outside 0..1"),
        (MULTICLASS, torch.tensor([0, 3]), "outside 0..2"),
        (ORDINAL, torch.tensor([-1, 1]), "outside 0..2"),
        (MULTICLASS, torch.tensor([0.5, 1.0]), "not integers"),
        (MULTILABEL, torch.tensor([[0, 2, 1]]), "other than 0 and 1"),
        (MULTILABEL, torch.tensor([[0, 1]]), "3-wide"),
        (REGRESSION, torch.tensor([1.0, float("nan")]), "not all finite"),
        (SEGMENTATION, torch.zeros(2, 4, 4, dtype=torch.long) + 3, "classes the task does not have"),
    ],
)
def test_invalid_targets_are_refused_with_a_safe_reason(task: object, targets: torch.Tensor,
                                                        why: str) -> None:
    with pytest.raises(DataError) as info:
        task.check_targets(targets, 3)  # type: ignore[attr-defined]
    assert why in str(info.value) + info.value.safe_reason
    assert "2" not in info.value.safe_reason or "0..2" in info.value.safe_reason


def test_binary_prediction_is_the_class_one_probability_and_its_loss_cross_entropy() -> None:
    logits = torch.tensor([[0.2, 1.5], [2.0, -1.0]])
    targets = torch.tensor([1, 0])
    assert torch.allclose(BINARY.predict(logits), torch.softmax(logits, 1)[:, 1])
    assert torch.allclose(BINARY.per_sample_loss(logits, targets),
                          F.cross_entropy(logits, targets, reduction="none"))


def test_ordinal_loss_and_prediction_follow_the_grade_order() -> None:
    # Prepare: K = 4 grades, 3 cumulative logits strongly saying "grade > 0 and > 1, not > 2"
    logits = torch.tensor([[8.0, 8.0, -8.0]])
    # Execute
    by_grade = [float(ORDINAL.per_sample_loss(logits, torch.tensor([g]))) for g in range(4)]
    expected_grade = float(ORDINAL.predict(logits).sum())
    # Assert: the right grade is cheapest, and the cost grows with the distance from it
    assert by_grade.index(min(by_grade)) == 2
    assert by_grade[1] < by_grade[0] and by_grade[3] > by_grade[2]
    assert expected_grade == pytest.approx(2.0, abs=1e-3)
    assert ORDINAL.num_outputs(4) == 3


def test_patients_get_the_mean_prediction_and_the_maximum_target() -> None:
    predictions = np.array([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])
    targets = np.array([[0, 1], [1, 0], [0, 0]])
    patients = np.array([7, 7, 3])  # patient 3 sorts first
    mean, worst = MULTILABEL.patient_prediction(predictions, targets, patients)
    np.testing.assert_allclose(mean, [[0.9, 0.1], [0.3, 0.7]])
    np.testing.assert_array_equal(worst, [[0, 0], [1, 1]])
    values, truth = REGRESSION.patient_prediction(np.array([1.0, 3.0, 5.0]),
                                                  np.array([2.0, 2.0, 4.0]), patients)
    np.testing.assert_allclose(values, [5.0, 2.0])
    np.testing.assert_allclose(truth, [4.0, 2.0])


def test_segmentation_loss_is_lowest_for_the_true_mask() -> None:
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, 2:5, 2:6] = 1
    right = F.one_hot(mask, 2).movedim(-1, 1).float() * 20 - 10
    wrong = -right
    assert float(SEGMENTATION.per_sample_loss(right, mask)) < 0.1
    assert float(SEGMENTATION.per_sample_loss(wrong, mask)) > 1.0
    masks, _ = SEGMENTATION.patient_prediction(SEGMENTATION.predict(right).numpy(),
                                               mask.numpy(), np.array([0]))
    np.testing.assert_array_equal(masks, mask.numpy())


def test_reconstruction_uses_the_autoencoders_own_objective_without_labels() -> None:
    from common.models import build_model

    torch.manual_seed(0)
    model = build_model("autoencoder", image_size=8)
    inputs = torch.rand(2, 1, 8, 8)
    # A model with a label term: the plain reconstruction error (no labels exist here)
    with_labels = RECONSTRUCTION.model_loss(model, inputs)
    mse = ((model.reconstruct(inputs) - inputs) ** 2).flatten(1).mean(1)  # type: ignore[operator]
    assert with_labels.shape == (2,) and torch.allclose(with_labels, mse)
    # Without one: the model's own objective (sparsity and denoising terms included)
    model.label_weight = 0.0
    own = model.dp_loss_per_sample(inputs, torch.zeros(2, dtype=torch.long))  # type: ignore[operator]
    assert torch.allclose(RECONSTRUCTION.model_loss(model, inputs), own)
    with pytest.raises(DataError, match="cannot reconstruct"):
        RECONSTRUCTION.model_loss(build_model("cnn", image_size=16), torch.rand(2, 1, 16, 16))
