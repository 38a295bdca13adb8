"""Self-supervised and fine-tuning node steps: per-sample pretext losses, the plan model's
tensors back unchanged where frozen, DP-SGD through train_dp, clear refusals."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from client.data.node_data import SplitArrays
from client.paradigms import node_training
from client.paradigms.self_supervised import (
    PretextDataset,
    PretextModel,
    contrastive_loss,
    masked_loss,
    pretext_outputs,
    rotation_loss,
)
from client.paradigms.transfer import freeze_groups
from client.training import train_dp
from common.config import TrainPlan
from common.errors import ConfigError
from common.models import build_model
from common.paradigms import canonical_options
from common.paradigms.self_supervised import HEAD_LAYERS
from common.tasks import get_task

SIZE = 16


def _split(patients: int = 6, per: int = 2) -> SplitArrays:
    gen = torch.Generator().manual_seed(0)
    n = patients * per
    return SplitArrays(images=torch.rand(n, 1, SIZE, SIZE, generator=gen),
                       labels=torch.arange(n) % 2,
                       patient_index=torch.arange(n) // per, num_patients=patients)


def _wrapped(model: str, pretext: str) -> PretextModel:
    torch.manual_seed(0)
    net = build_model(model, in_channels=1, num_classes=2, image_size=SIZE, spatial_dims=2)
    return PretextModel(net, HEAD_LAYERS[model], pretext_outputs(pretext, SIZE), seed=3)


def _batch(pretext: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = PretextDataset(_split(), pretext, views=3, mask_ratio=0.5, patch=4)
    torch.manual_seed(1)
    items = [data[i] for i in range(4)]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def _losses(model: PretextModel, pretext: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if pretext == "rotation":
        return rotation_loss(model(x), y)
    if pretext == "masked":
        return masked_loss(model, x, y)
    return contrastive_loss(model, x, y)


@pytest.mark.parametrize("model", sorted(HEAD_LAYERS))
@pytest.mark.parametrize("pretext", ["rotation", "masked", "contrastive"])
def test_a_rows_pretext_loss_ignores_the_other_rows(model: str, pretext: str) -> None:
    # Prepare
    net = _wrapped(model, pretext).eval()
    x, y = _batch(pretext)
    changed = x.clone()
    changed[1:] = torch.rand_like(changed[1:]) * 5
    # Execute
    with torch.no_grad():
        before, after = _losses(net, pretext, x, y), _losses(net, pretext, changed, y)
    # Assert: one loss per record; row 0's loss is unchanged when the others change
    assert before.shape == (4,) and torch.isfinite(before).all()
    assert torch.allclose(before[0], after[0], atol=1e-5)
    assert not torch.allclose(before[1:], after[1:])


def test_the_dataset_gives_one_record_per_patient_of_the_pretext() -> None:
    # Prepare
    split = _split(patients=5)
    # Execute
    rot, rot_k = PretextDataset(split, "rotation")[0]
    img, mask = PretextDataset(split, "masked", mask_ratio=0.25, patch=4)[2]
    views, _ = PretextDataset(split, "contrastive", views=3)[4]
    # Assert
    assert len(PretextDataset(split, "rotation")) == 5
    assert rot.shape == (1, SIZE, SIZE) and 0 <= int(rot_k) < 4
    assert mask.shape == (SIZE, SIZE) and int(mask.sum()) == 4 * 16  # 4 of 16 patches
    assert views.shape == (3, 1, SIZE, SIZE)


def test_the_wrapper_sends_back_exactly_the_plan_models_tensors() -> None:
    # Prepare
    torch.manual_seed(0)
    net = build_model("resnet", in_channels=1, num_classes=2, image_size=SIZE, spatial_dims=2)
    keys = list(net.state_dict())
    head = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("fc.")}
    # Execute
    state = PretextModel(net, "fc", 4, seed=0).state_dict()
    # Assert
    assert list(state) == keys
    assert all(torch.equal(state[k], v) for k, v in head.items())


@pytest.mark.parametrize("pretext", ["rotation", "masked", "contrastive"])
def test_node_step_trains_the_encoder_with_dp_sgd(pretext: str) -> None:
    # Prepare: the node's hook through node_training, then train_dp as handle_train calls it
    plan = TrainPlan(model="cnn", image_size=SIZE, paradigm="self-supervised-rounds",
                     paradigm_options=canonical_options({"pretext": pretext}), seed=1)
    net = build_model("cnn", in_channels=1, num_classes=2, image_size=SIZE, spatial_dims=2)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    split = _split(patients=8)
    step = node_training(plan, get_task("binary"), split, None, net)  # type: ignore[arg-type]
    # Execute
    result = train_dp(step.model, step.dataset, epochs=1, batch_size=4, learning_rate=0.05,
                      noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, seed=0,
                      **step.losses)
    # Assert: the plan model's tensors; the trunk moved, the output layer did not
    assert step.num_patients == 8 and set(result.state_dict) == set(start)
    assert 0 < result.epsilon < float("inf") and result.steps == 2
    assert not torch.equal(result.state_dict["features.0.0.weight"], start["features.0.0.weight"])
    assert torch.equal(result.state_dict["classifier.weight"], start["classifier.weight"])


def test_the_pretext_step_refuses_a_model_without_a_head_split() -> None:
    plan = TrainPlan(model="mlp", image_size=SIZE, paradigm="self-supervised-rounds")
    with pytest.raises(ConfigError, match="trunk/head split"):
        node_training(plan, get_task("binary"), _split(), None,  # type: ignore[arg-type]
                      torch.nn.Linear(2, 2))


def test_fine_tuning_freezes_the_named_groups_and_refuses_unknown_ones() -> None:
    # Prepare
    net = build_model("cnn", in_channels=1, num_classes=2, image_size=SIZE, spatial_dims=2)
    # Execute
    frozen = freeze_groups(net, "cnn", "trunk")
    # Assert
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]
    assert frozen and all(n.startswith("features.") for n in frozen)
    with pytest.raises(ConfigError, match="no layer group 'block9'"):
        freeze_groups(net, "cnn", "block9")
    with pytest.raises(ConfigError, match="nothing would be trained"):
        freeze_groups(net, "cnn", "trunk,head")


def test_fine_tuning_with_a_frozen_trunk_leaves_it_unchanged() -> None:
    # Prepare
    plan = TrainPlan(model="cnn", image_size=SIZE, paradigm="fine-tune-rounds",
                     paradigm_options=canonical_options({"freeze": "trunk"}))
    net = build_model("cnn", in_channels=1, num_classes=2, image_size=SIZE, spatial_dims=2)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    step = node_training(plan, get_task("binary"), _split(), None, net)  # type: ignore[arg-type]
    # Execute
    result = train_dp(step.model, step.dataset, epochs=1, batch_size=3, learning_rate=0.1,
                      noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, seed=0, **step.losses)
    # Assert
    assert all(torch.equal(result.state_dict[k], v) for k, v in start.items()
               if k.startswith("features."))
    assert not torch.equal(result.state_dict["classifier.weight"], start["classifier.weight"])


def test_contrastive_per_sample_gradients_are_each_records_own() -> None:
    # Prepare: Opacus hooks (the mode the wrapper trains with) over one forward per view
    from opacus import GradSampleModule

    net = _wrapped("cnn", "contrastive")
    x = torch.rand(3, 2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    first = next(p for p in net.parameters() if p.requires_grad)
    # Execute
    wrapped = GradSampleModule(net, loss_reduction="sum")
    contrastive_loss(wrapped, x, torch.zeros(3)).sum().backward()
    per_sample = first.grad_sample.clone()
    # Assert: row i's per-sample gradient is the gradient of record i's loss alone
    for i in range(3):
        alone = _wrapped("cnn", "contrastive")  # the same seeded weights
        own = next(p for p in alone.parameters() if p.requires_grad)
        loss = contrastive_loss(alone, x[i:i + 1], torch.zeros(1)).sum()
        grad = torch.autograd.grad(loss, own)[0]
        assert torch.allclose(per_sample[i], grad, atol=1e-5)


def test_the_pretext_step_also_trains_the_unlabelled_patients_and_counts_them(
    tmp_path: Path
) -> None:
    # Prepare: one synthetic hospital whose last 10 patients have no labels.csv row
    from client.data.task_data import load_task_data
    from client.dicom.synth import synthesize_federation

    synthesize_federation(tmp_path, n_sites=1, patients_per_site=30, images_per_patient=(1, 1),
                          image_size=SIZE, seed=1)
    site = tmp_path / "site-1"
    rows = list(csv.DictReader((site / "labels.csv").open()))
    with (site / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:-10])
    data = load_task_data(site, task="binary", num_classes=2, samples="image-2d",
                          image_size=SIZE, seed=0)
    plan = TrainPlan(model="cnn", image_size=SIZE, paradigm="self-supervised-rounds")
    net = build_model("cnn", in_channels=1, num_classes=2, image_size=SIZE, spatial_dims=2)
    # Execute
    step = node_training(plan, get_task("binary"), data.train, data, net)
    # Assert: more patients than the labelled training ones, all in the accountant's count
    assert data.train.num_patients < step.num_patients <= data.train.num_patients + 10
    assert len(step.dataset) == step.num_patients  # type: ignore[arg-type]
