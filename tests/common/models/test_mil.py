"""The attention-MIL model (``mil-attention``): a DP-safe bag classifier over slices.

Opacus accepts it; attention is a distribution over each bag's slices; a bag's logits and
attention depend on that bag alone (one bag = one DP record); Opacus's per-sample gradients
equal each bag's own gradient; the attention finds the one slice that carries the label.
"""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch.nn import functional as F

from common.models import build_model, get_spec
from common.models.mil import AttentionMIL, is_mil_model
from common.tasks import SampleKind, get_task, serves

SIZE = 8


def _model(num_classes: int = 2, seed: int = 0) -> AttentionMIL:
    torch.manual_seed(seed)
    model = build_model("mil-attention", num_classes=num_classes, image_size=SIZE,
                        spatial_dims=3)
    assert isinstance(model, AttentionMIL)
    return model


def _bags(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 1, SIZE, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def test_it_is_opacus_valid_and_serves_series_and_volumes() -> None:
    model = _model()
    assert ModuleValidator.validate(model, strict=True) == []
    assert is_mil_model(model) and is_mil_model(GradSampleModule(_model()))
    kinds = serves(get_task("binary"), get_spec("mil-attention"))
    assert set(kinds) == {SampleKind.VOLUME_3D, SampleKind.SERIES}


def test_attention_sums_to_one_over_each_bags_slices() -> None:
    weights = _model().attention(_bags(5))
    assert weights.shape == (5, SIZE)
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(5))


def test_a_bag_does_not_depend_on_the_other_bags() -> None:
    # Prepare
    model = _model(num_classes=3).train()
    bags = _bags(4)
    changed = bags.clone()
    changed[1:] = _bags(3, seed=7)
    # Execute
    logits, moved = model(bags), model(changed)
    # Assert: row 0's logits and attention are unchanged when rows 1..3 change
    torch.testing.assert_close(logits[0], moved[0])
    torch.testing.assert_close(model.attention(bags)[0], model.attention(changed)[0])


def test_opacus_per_sample_gradients_are_each_bags_own_gradient() -> None:
    # Prepare
    bags, labels = _bags(3), torch.tensor([0, 1, 1])
    wrapped = GradSampleModule(_model(), loss_reduction="sum")
    # Execute: Opacus's per-sample gradients in one batch pass
    F.cross_entropy(wrapped(bags), labels, reduction="sum").backward()
    # Assert: each equals the gradient of that bag alone
    for i in range(3):
        alone = _model()
        F.cross_entropy(alone(bags[i:i + 1]), labels[i:i + 1]).backward()
        for (name, p), q in zip(wrapped.named_parameters(), alone.parameters(), strict=True):
            torch.testing.assert_close(p.grad_sample[i], q.grad, rtol=1e-4, atol=1e-5,
                                       msg=f"{name}, bag {i}")


def test_attention_learns_the_slice_that_carries_the_label() -> None:
    # Prepare: noise bags; a positive bag has one bright slice at a random depth
    gen = torch.Generator().manual_seed(3)
    n = 32
    bags = 0.3 * torch.rand((n, 1, SIZE, SIZE, SIZE), generator=gen)
    labels = torch.arange(n) % 2
    where = torch.randint(0, SIZE, (n,), generator=gen)
    for i in range(n):
        if labels[i]:
            bags[i, 0, where[i]] += 1.0
    model = _model()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    # Execute
    for _ in range(40):
        optimiser.zero_grad()
        F.cross_entropy(model(bags), labels).backward()
        optimiser.step()
    # Assert: the positive bags' attention peaks at their bright slice
    positives = labels.bool()
    peaks = model.attention(bags[positives]).argmax(dim=1)
    assert (peaks == where[positives]).float().mean() >= 0.8
