"""Every (task, model, sample kind) the registry claims takes a private DP-SGD step as a node does.

The node trains a plan with :func:`client.training.train_dp` and the loss routing of
:func:`common.tasks.federated.train_losses` after :func:`~common.tasks.federated.
prepare_for_training` (each model's registered per-sample gradient mode: "direct", "ghost"
or "hooks"). For every claimed pair, a few patients' records pass through one private epoch:
the accountant records the steps, the loss is finite and the trained parameters move. A pair
that the registry claims but the trainer cannot serve fails here, not at a hospital.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from client.training import train_dp
from common.models import build_model, list_models
from common.tasks import SampleKind, Task, list_tasks, serves
from common.tasks.federated import prepare_for_training, train_losses

CLASSES = 3
PATIENTS = 6
PAIRS = [(task, spec.name, kind) for task in list_tasks() for spec in list_models()
         for kind in serves(task, spec)]


def _targets(task: Task, inputs: torch.Tensor) -> torch.Tensor:
    name, n = task.info.name, len(inputs)
    generator = torch.Generator().manual_seed(3)
    if name == "binary":
        return torch.arange(n) % 2
    if name in ("multiclass", "ordinal"):
        return torch.arange(n) % CLASSES
    if name == "multilabel":
        return torch.randint(0, 2, (n, CLASSES), generator=generator)
    if name == "regression":
        return torch.randn(n, generator=generator)
    if name == "segmentation":
        return (inputs[:, 0] > 0.5).long()
    return torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize(("task", "model_name", "kind"), PAIRS,
                         ids=[f"{t.info.name}-{m}-{k.value}" for t, m, k in PAIRS])
def test_a_claimed_pair_takes_private_steps_through_the_trainer(
    task: Task, model_name: str, kind: SampleKind
) -> None:
    # Prepare: a tiny patient-level dataset of the sample kind (series are volumes)
    dims = 2 if kind is SampleKind.IMAGE_2D else 3
    size = 16 if dims == 2 else 8
    torch.manual_seed(0)
    try:
        model = build_model(model_name, num_classes=task.num_outputs(CLASSES), image_size=size,
                            spatial_dims=dims)
    except Exception:  # a model with a larger minimum input (e.g. dc-elm): its own minimum
        size = 32
        model = build_model(model_name, num_classes=task.num_outputs(CLASSES), image_size=size,
                            spatial_dims=dims)
    model = prepare_for_training(task, model)
    inputs = torch.rand((PATIENTS, 1, *([size] * dims)))
    dataset = TensorDataset(inputs, _targets(task, inputs))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # Execute
    result = train_dp(model, dataset, epochs=1, batch_size=3, learning_rate=0.05,
                      noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, device="cpu",
                      seed=0, **train_losses(task))
    # Assert: DP steps were accounted, the loss is finite and the trainable weights moved
    assert result.steps >= 1 and math.isfinite(result.epsilon) and result.epsilon > 0
    assert math.isfinite(result.train_loss)
    assert before and any(not torch.equal(result.state_dict[n], w) for n, w in before.items())
