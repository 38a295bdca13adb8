"""Semi-supervised node step: labels hidden deterministically and stratified, unlabelled
patients read beside the labelled ones (which stay as they were) and counted in the privacy
unit, a per-sample loss, DP-SGD through train_dp, clear refusals."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from client.data.node_data import SplitArrays, clear_cache
from client.data.task_data import load_task_data, load_unlabelled
from client.paradigms import node_training
from client.paradigms.semi_supervised import (
    NO_LABEL,
    labelled_mask,
    pseudo_labels,
    semi_supervised_loss,
)
from client.training import train_dp
from common.config import TrainPlan
from common.errors import ConfigError
from common.models import build_model
from common.paradigms import canonical_options, get_paradigm
from common.paradigms.semi_supervised import check

SIZE = 16


def _plan(**options: object) -> TrainPlan:
    values = {"method": "both", "labelled-fraction": 1.0, "threshold": 0.9,
              "consistency-weight": 1.0, **options}
    return TrainPlan(model="cnn", image_size=SIZE, paradigm="semi-supervised-rounds",
                     paradigm_options=canonical_options(values))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", in_channels=1, num_classes=2, image_size=SIZE, spatial_dims=2)


def test_labels_are_hidden_deterministically_and_stratified() -> None:
    labels = [0] * 30 + [1] * 10
    keep = labelled_mask(labels, 0.3)
    assert torch.equal(keep, labelled_mask(labels, 0.3))  # the same patients every time
    assert int(keep[:30].sum()) == 9 and int(keep[30:].sum()) == 3  # per class
    assert int(labelled_mask(labels, 0.01)[30:].sum()) == 1  # every class keeps one
    assert bool(labelled_mask(labels, 1.0).all())
    assert not torch.equal(keep[:30], torch.arange(30) < 9)  # not simply the first ones


def test_a_records_loss_does_not_depend_on_the_other_records() -> None:
    model = _model().eval()  # eval: no dropout draw differs between the two calls
    loss = semi_supervised_loss("both", 1.0)
    torch.manual_seed(1)
    views = torch.rand(4, 2, 1, SIZE, SIZE)
    targets = torch.tensor([1, NO_LABEL, 0, NO_LABEL])
    before = loss(model, views, targets)
    changed_views, changed_targets = views.clone(), targets.clone()
    changed_views[2] = torch.rand(2, 1, SIZE, SIZE)
    changed_targets[2] = 1
    after = loss(model, changed_views, changed_targets)
    assert before.shape == (4,) and torch.isfinite(before).all()
    keep = [0, 1, 3]
    assert torch.allclose(before[keep], after[keep], atol=1e-6)
    assert not torch.isclose(before[2], after[2])
    # pseudo-label only: a record with no (accepted) label adds nothing
    only = semi_supervised_loss("pseudo-label", 1.0)(model, views, targets)
    assert float(only[1].detach()) == 0.0 and float(only[0].detach()) > 0


def test_pseudo_labels_only_above_the_threshold() -> None:
    model = _model()
    images = torch.rand(5, 1, SIZE, SIZE)
    assert bool((pseudo_labels(model, images, 1.0) == NO_LABEL).all())
    assert bool((pseudo_labels(model, images, 0.5) >= 0).all())
    assert model.training  # its mode is given back


def _synth(tmp_path: Path) -> tuple[Path, set[str]]:
    from client.dicom.synth import synthesize_federation

    synthesize_federation(tmp_path, n_sites=1, patients_per_site=24, images_per_patient=(1, 1),
                          image_size=SIZE, seed=3)
    site = tmp_path / "site-1"
    rows = list(csv.DictReader((site / "labels.csv").open()))
    dropped = {row["patient_id"] for row in rows[::3]}  # a third of the patients: no label
    with (site / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(row for row in rows if row["patient_id"] not in dropped)
    clear_cache()
    return site, dropped


def test_unlabelled_patients_are_read_beside_and_counted(tmp_path: Path) -> None:
    # Prepare: a hospital whose labels.csv lacks a third of its patients
    site, dropped = _synth(tmp_path)
    from client.data.splits import assign_split

    data = load_task_data(site, image_size=SIZE)
    # Execute
    extra = load_unlabelled(site, image_size=SIZE)
    training = node_training(_plan(**{"labelled-fraction": 0.5}), _task(), data.train, data,
                             _model())
    # Assert: the labelled splits hold the labelled patients only, as before; the unlabelled
    # training patients are the unlabelled ones the split rule puts in train
    total = data.train.num_patients + data.val.num_patients + data.test.num_patients
    assert total == 24 - len(dropped)
    assert extra.num_patients == sum(assign_split(p, seed=0) == "train" for p in dropped) > 0
    assert training.num_patients == data.train.num_patients + extra.num_patients
    assert len(training.dataset) == training.num_patients  # type: ignore[arg-type]
    views, target = training.dataset[training.num_patients - 1]
    assert views.shape == (2, 1, SIZE, SIZE) and target.dtype == torch.int64
    assert "input_loss" in training.losses


def _task():  # type: ignore[no-untyped-def]
    from common.tasks import get_task

    return get_task("binary")


def test_a_split_without_unlabelled_patients_trains_on_hidden_labels() -> None:
    n = 12
    split = SplitArrays(images=torch.rand(n, 1, SIZE, SIZE), labels=torch.arange(n) % 2,
                        patient_index=torch.arange(n), num_patients=n)
    from client.data.node_data import NodeData

    data = NodeData(report=None, fingerprint="f", image_size=SIZE,  # type: ignore[arg-type]
                    train=split, val=split, test=split)  # root "": nothing more to read
    training = node_training(_plan(**{"labelled-fraction": 0.5, "method": "pseudo-label",
                                      "threshold": 1.0}), _task(), split, data, _model())
    targets = training.dataset.targets  # type: ignore[attr-defined]
    assert training.num_patients == n and int((targets == NO_LABEL).sum()) == n // 2


@pytest.mark.parametrize("method", ["both", "pseudo-label"])
def test_dp_sgd_trains_on_every_record(method: str) -> None:
    n = 10
    split = SplitArrays(images=torch.rand(n, 1, SIZE, SIZE), labels=torch.arange(n) % 2,
                        patient_index=torch.arange(n), num_patients=n)
    from client.data.node_data import NodeData

    data = NodeData(report=None, fingerprint="f", image_size=SIZE,  # type: ignore[arg-type]
                    train=split, val=split, test=split)
    training = node_training(_plan(**{"labelled-fraction": 0.3, "method": method,
                                      "threshold": 0.5}), _task(), split, data, _model())
    result = train_dp(training.model, training.dataset, epochs=1, batch_size=5,
                      learning_rate=0.05, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-4,
                      private=True, device="cpu", **training.losses)
    assert result.num_examples == n and result.steps >= 1
    assert all(torch.isfinite(v).all() for v in result.state_dict.values())


def test_clear_refusals() -> None:
    paradigm = get_paradigm("semi-supervised")
    with pytest.raises(ConfigError, match="--task binary or multiclass"):
        check(TrainPlan(task="regression"), paradigm.defaults())
    with pytest.raises(ConfigError, match="closed form"):
        check(TrainPlan(model="dc-elm"), paradigm.defaults())
    with pytest.raises(ConfigError, match="labelled-fraction must be"):
        _plan(**{"labelled-fraction": 0.0})
    with pytest.raises(ConfigError, match="method must be one of"):
        _plan(method="mixup")


def test_per_sample_gradients_are_each_records_own() -> None:
    # Prepare: Opacus hooks over the trained view's forward (the target view's runs without
    # a gradient and must leave no activation behind)
    from opacus import GradSampleModule

    views = torch.rand(3, 2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([1, NO_LABEL, 0])
    loss = semi_supervised_loss("both", 2.0)
    net = _model()  # train mode (Opacus captures activations only then); the cnn has no dropout
    params = [p for p in net.parameters() if p.requires_grad]
    # Execute
    loss(GradSampleModule(net, loss_reduction="sum"), views, targets).sum().backward()
    per_sample = [p.grad_sample.clone() for p in params]  # type: ignore[attr-defined]
    # Assert: row i's per-sample gradient is the gradient of record i's loss alone
    for i in range(3):
        alone = _model()  # the same seeded weights
        own = [p for p in alone.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss(alone, views[i:i + 1], targets[i:i + 1]).sum(), own)
        for got, want in zip(per_sample, grads, strict=True):
            assert torch.allclose(got[i], want, atol=1e-5)
