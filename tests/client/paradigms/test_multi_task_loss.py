"""The multi-task per-sample loss: the weighted sum of both heads' losses, row by row.

DP-SGD clips one gradient per patient, so row i's loss may depend on row i only; and one
private training step through the trainer's direct engine moves both heads.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from client.paradigms.multi_task import multi_task_loss, presence_targets
from common.models import build_model
from common.tasks import get_task

SIZE = 16


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("multi-task-unet", num_classes=2, image_size=SIZE, spatial_dims=2)


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 1, SIZE, SIZE), generator=g)
    masks = (torch.rand((n, SIZE, SIZE), generator=g) > 0.8).long()
    masks[0] = 0  # one image without a lesion
    return images, masks


def test_presence_is_any_foreground_pixel() -> None:
    masks = torch.zeros((3, 4, 4), dtype=torch.long)
    masks[1, 2, 2] = 1
    masks[2] = 1
    assert presence_targets(masks).tolist() == [0, 1, 1]


def test_loss_is_the_weighted_sum_of_the_heads_per_sample() -> None:
    model = _model().eval()
    images, masks = _batch(4, 1)
    task = get_task("segmentation")
    got = multi_task_loss(1.5, 0.25)(model, images, masks)
    seg, pres = model.heads(images)
    want = 1.5 * task.per_sample_loss(seg, masks) + 0.25 * F.cross_entropy(
        pres, presence_targets(masks), reduction="none")
    assert got.shape == (4,)
    torch.testing.assert_close(got, want)


def test_a_rows_loss_depends_on_that_row_only() -> None:
    model = _model().eval()
    images, masks = _batch(4, 2)
    other_images, other_masks = _batch(4, 3)
    loss = multi_task_loss(1.0, 0.5)
    before = loss(model, images, masks)
    images[1:], masks[1:] = other_images[1:], other_masks[1:]
    after = loss(model, images, masks)
    torch.testing.assert_close(before[0], after[0])


def test_one_private_step_trains_both_heads_with_the_direct_engine() -> None:
    from torch.utils.data import TensorDataset

    from client.training import train_dp

    model = _model()
    images, masks = _batch(16, 4)
    result = train_dp(model, TensorDataset(images, masks), epochs=1, batch_size=8,
                      learning_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3,
                      device="cpu", seed=0, grad_sample_mode="direct",
                      input_loss=multi_task_loss(1.0, 0.5))
    trained = result.state_dict
    start = model.state_dict()
    assert not torch.equal(trained["presence_head.weight"], start["presence_head.weight"])
    key = "unet.net.final_conv.weight"
    assert not torch.equal(trained[key], start[key])


def test_the_models_own_loss_is_both_heads_at_the_default_weights() -> None:
    from common.models.multi_task import PRESENCE_WEIGHT, SEGMENTATION_WEIGHT

    model = _model().eval()
    images, masks = _batch(3, 5)
    want = multi_task_loss(SEGMENTATION_WEIGHT, PRESENCE_WEIGHT)(model, images, masks)
    torch.testing.assert_close(model.dp_loss_per_sample(images, masks), want)
    torch.testing.assert_close(model.dp_loss(images, masks), want.mean())


def test_direct_engine_gives_opacus_per_sample_gradients_of_the_multi_task_loss() -> None:
    import copy

    from opacus import GradSampleModule

    from client.training.per_sample import DirectPerSampleGradients

    model = _model()
    images, masks = _batch(3, 6)
    loss = multi_task_loss(1.0, 0.5)
    ref = GradSampleModule(copy.deepcopy(model))
    loss(ref, images, masks).sum().backward()
    want = {n: p.grad_sample for n, p in ref._module.named_parameters()}
    net = copy.deepcopy(model)
    engine = DirectPerSampleGradients(net)
    try:
        loss(net, images, masks).sum().backward()
    finally:
        engine.restore()
        engine.close()
    got = {n: p.grad_sample for n, p in net.named_parameters()}
    assert got.keys() == want.keys() and "presence_head.weight" in got
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)
