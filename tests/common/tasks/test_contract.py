"""Contract suite over every (task, model, sample kind) the task registry claims.

For each pair: the model built with the task's output count maps a batch to outputs whose
per-sample loss has one finite value per row, **row 0's loss does not move when row 1 changes**
(what DP-SGD's per-sample clipping needs), gradients reach the parameters, and predictions
have the task's shape and range. New tasks and models are covered automatically.
"""

from __future__ import annotations

import pytest
import torch

from common.models import build_model, list_models
from common.tasks import SampleKind, Task, list_tasks, serves
from common.tasks.reconstruction import ReconstructionTask

SIZE = 16
CLASSES = 3
BATCH = 3

PAIRS = [(task, spec.name, kind) for task in list_tasks() for spec in list_models()
         for kind in serves(task, spec)]


def _targets(task: Task, outputs_shape: torch.Size, inputs: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
    name = task.info.name
    if name == "binary":
        return torch.randint(0, 2, (BATCH,), generator=generator)
    if name in ("multiclass", "ordinal"):
        return torch.randint(0, CLASSES, (BATCH,), generator=generator)
    if name == "multilabel":
        return torch.randint(0, 2, (BATCH, CLASSES), generator=generator)
    if name == "regression":
        return torch.randn(BATCH, generator=generator)
    if name == "segmentation":
        return torch.randint(0, CLASSES, (BATCH, *inputs.shape[2:]), generator=generator)
    return inputs


def _loss(task: Task, model: torch.nn.Module, inputs: torch.Tensor,
          targets: torch.Tensor) -> torch.Tensor:
    if isinstance(task, ReconstructionTask):
        return task.model_loss(model, inputs)
    return task.per_sample_loss(model(inputs), targets)


def test_every_task_is_served_by_some_model() -> None:
    served = {task.info.name for task, _, _ in PAIRS}
    assert served == {task.info.name for task in list_tasks()}


@pytest.mark.parametrize(("task", "model_name", "kind"), PAIRS,
                         ids=[f"{t.info.name}-{m}-{k.value}" for t, m, k in PAIRS])
def test_per_sample_loss_is_per_sample_and_trains(task: Task, model_name: str,
                                                   kind: SampleKind) -> None:
    # Prepare
    dims = 2 if kind is SampleKind.IMAGE_2D else 3  # a series is a volume read slice by slice
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=task.num_outputs(CLASSES), image_size=SIZE,
                        spatial_dims=dims)
    model.train()  # training mode: a batch statistic would couple rows here
    generator = torch.Generator().manual_seed(1)
    inputs = torch.rand((BATCH, 1, *([SIZE] * dims)), generator=generator)
    targets = _targets(task, torch.Size(), inputs, generator)
    task.check_targets(targets, CLASSES)
    changed_inputs, changed_targets = inputs.clone(), targets.clone()
    changed_inputs[1] = torch.rand(changed_inputs[1].shape, generator=generator)
    changed_targets[1] = _targets(task, torch.Size(), changed_inputs, generator)[0]
    # Execute: the same seed before both passes draws the same dropout masks and noise
    torch.manual_seed(2)
    loss = _loss(task, model, inputs, targets)
    torch.manual_seed(2)
    with torch.no_grad():
        moved = _loss(task, model, changed_inputs, changed_targets)
    loss.sum().backward()
    # Assert
    assert loss.shape == (BATCH,) and bool(torch.isfinite(loss).all())
    assert torch.allclose(loss[0], moved[0], rtol=1e-5, atol=1e-6), "row 0 depends on row 1"
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    if not isinstance(task, ReconstructionTask):
        model.eval()
        with torch.no_grad():
            predictions = task.predict(model(inputs))
        assert len(predictions) == BATCH and bool(torch.isfinite(predictions).all())
