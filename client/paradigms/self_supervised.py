"""The node's self-supervised training step (``self-supervised-rounds``; see
:mod:`common.paradigms.self_supervised` for the pretexts and why each loss is per sample).

:func:`self_supervised_training` wraps the plan's model in a :class:`PretextModel`: the model's
own output layer is bypassed (kept, frozen, and sent back unchanged), a fixed seeded pretext
head reads the penultimate features, and :class:`PretextDataset` gives one record per patient
of the training split plus the node's unlabelled training patients (labels ignored; never
the test split; all of them count in ``num_patients``, the accountant's privacy unit). The
step then goes through :func:`client.training.train_dp` like any other, so DP-SGD, the ledger and the accountant
apply; :meth:`PretextModel.state_dict` returns the plan model's tensors only, so the
coordinator averages exactly the model it sent.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from client.data.node_data import NodeData, PerPatientDataset, SplitArrays
from client.paradigms import NodeTraining
from common.config import TrainPlan
from common.errors import DataError
from common.paradigms.self_supervised import HEAD_LAYERS, check_encoder_model
from common.tasks.base import Task

__all__ = ["PretextDataset", "PretextModel", "contrastive_loss", "masked_loss",
           "pretext_outputs", "rotation_loss", "self_supervised_training",
           "with_unlabelled"]

logger = logging.getLogger(__name__)

PROJECTION = 64
"""Width of the contrastive projection (and of its prediction)."""


def pretext_outputs(pretext: str, image_size: int) -> int:
    """Outputs of the pretext head: 4 rotations, the image's pixels, or projection +
    prediction."""
    return {"rotation": 4, "masked": image_size * image_size,
            "contrastive": 2 * PROJECTION}[pretext]


class PretextModel(nn.Module):
    """The plan's model with its output layer bypassed and a fixed pretext head on top.

    Parameters
    ----------
    model : torch.nn.Module
        The plan's model (modified: its output layer ``head_path`` becomes an identity and is
        kept frozen as :attr:`plan_head`).
    head_path : str
        Dotted name of the model's output ``nn.Linear`` (:data:`HEAD_LAYERS`).
    outputs : int
        Outputs of the pretext head.
    seed : int
        Seeds the pretext head (the same head at every node and round).
    """

    def __init__(self, model: nn.Module, head_path: str, outputs: int, seed: int) -> None:
        super().__init__()
        self._keys = list(model.state_dict())
        parent_name, _, name = head_path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        head = getattr(parent, name)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"{head_path} is not a linear output layer")
        head.requires_grad_(False)
        setattr(parent, name, nn.Identity())
        self.encoder = model
        self.plan_head = head
        self._head_path = head_path
        self.pretext_head = nn.Linear(head.in_features, outputs)
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            bound = 1.0 / math.sqrt(head.in_features)
            self.pretext_head.weight.copy_(
                torch.rand(self.pretext_head.weight.shape, generator=gen) * 2 * bound - bound)
            self.pretext_head.bias.zero_()
        self.pretext_head.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pretext head's outputs on the penultimate features of ``x``."""
        return self.pretext_head(self.encoder(x))  # type: ignore[no-any-return]

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Any]:
        """The plan model's tensors (its output layer included), in its own order."""
        own = dict(self.encoder.state_dict(prefix=prefix, keep_vars=keep_vars))
        own.update(self.plan_head.state_dict(prefix=f"{prefix}{self._head_path}.",
                                             keep_vars=keep_vars))
        out = OrderedDict((f"{prefix}{key}", own[f"{prefix}{key}"]) for key in self._keys)
        if destination is not None:
            destination.update(out)
            return destination  # type: ignore[no-any-return]
        return out


def _patch_mask(size: int, patch: int, ratio: float) -> torch.Tensor:
    """A ``[size, size]`` 0/1 mask of square patches, ``ratio`` of them (at least one) set."""
    cells = -(-size // patch)
    flat = torch.zeros(cells * cells)
    count = max(1, round(ratio * cells * cells))
    flat[torch.randperm(cells * cells)[:count]] = 1.0
    grid = flat.reshape(1, 1, cells, cells)
    return F.interpolate(grid, scale_factor=patch, mode="nearest")[0, 0, :size, :size].long()


def _augment(image: torch.Tensor) -> torch.Tensor:
    """A random view of a ``[C, S, S]`` image: resized crop (60-100 % of the side), horizontal
    flip, contrast/brightness jitter and light Gaussian noise (torch's RNG)."""
    size = image.shape[-1]
    side = max(2, int(size * float(torch.empty(1).uniform_(0.6, 1.0))))
    top, left = (int(torch.randint(size - side + 1, (1,))) for _ in range(2))
    crop = image[:, top:top + side, left:left + side].unsqueeze(0)
    view = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
    if bool(torch.rand(1) < 0.5):
        view = torch.flip(view, dims=(-1,))
    scale = float(torch.empty(1).uniform_(0.8, 1.2))
    shift = float(torch.empty(1).uniform_(-0.1, 0.1))
    return view * scale + shift + 0.02 * torch.randn_like(view)


class PretextDataset(PerPatientDataset):
    """One pretext record per patient of a split (labels never read).

    ``rotation``: ``(image rotated by k * 90 degrees, k)``; ``masked``: ``(image, patch mask
    [S, S])``; ``contrastive``: ``([views, C, S, S], 0)``, each view an augmentation of an
    image of the same patient drawn afresh.
    """

    def __init__(self, split: SplitArrays, pretext: str, *, views: int = 2,
                 mask_ratio: float = 0.5, patch: int = 4) -> None:
        self.split = split
        self.pretext = pretext
        self.views = views
        self.mask_ratio = mask_ratio
        self.patch = patch
        super().__init__(split.patient_index, split.num_patients)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pretext != "contrastive":
            return super().__getitem__(index)
        members = self._members[index]
        picks = [int(members[int(torch.randint(len(members), (1,)))]) for _ in range(self.views)]
        return torch.stack([_augment(self.split.images[p]) for p in picks]), torch.tensor(0)

    def _item(self, pick: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.split.images[pick]
        if self.pretext == "rotation":
            k = int(torch.randint(4, (1,)))
            return torch.rot90(image, k, dims=(-2, -1)), torch.tensor(k)
        return image, _patch_mask(image.shape[-1], self.patch, self.mask_ratio)


def rotation_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of the 4-way rotation prediction (``[B]``)."""
    return F.cross_entropy(outputs, targets.reshape(-1).long(), reduction="none")


def masked_loss(model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE on the masked pixels of the reconstruction from the unmasked ones."""
    mask = masks.to(images.dtype).unsqueeze(1)  # [B, 1, S, S]
    recon = model(images * (1 - mask)).reshape(images.shape)
    err = ((recon - images) ** 2 * mask).flatten(1).sum(1)
    return err / mask.flatten(1).sum(1).clamp(min=1.0)


def contrastive_loss(model: nn.Module, views: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-record SimSiam-style loss over one patient's own views (``views [B, V, C, S, S]``).

    Each view is run through the model on its own (a batch of ``B`` records each time, so
    per-sample gradients stay per record); the loss of record ``i`` is the mean over ordered
    pairs of its views ``v != w`` of ``1 - cos(p_v, stopgrad(z_w))`` in ``[0, 2]``, where the
    head's outputs are the projection ``z`` and the prediction ``p``.
    """
    outs = [model(views[:, v]) for v in range(views.shape[1])]
    zs = [o[:, :PROJECTION].detach() for o in outs]
    ps = [o[:, PROJECTION:] for o in outs]
    terms = [1 - F.cosine_similarity(ps[v], zs[w], dim=1)
             for v in range(len(outs)) for w in range(len(outs)) if v != w]
    return torch.stack(terms, 0).mean(0)


def with_unlabelled(plan: TrainPlan, split: SplitArrays, data: NodeData | None) -> SplitArrays:
    """``split`` plus the node's unlabelled training patients (same patient-level split rule,
    :func:`client.data.task_data.load_unlabelled`); ``split`` alone when the node has none or
    they cannot be read (logged). In cross-validation the same unlabelled patients join every
    fold: they have no label, so no fold holds them out."""
    root = getattr(data, "root", "") if data is not None else ""
    if not root:
        return split
    from client.data.task_data import load_unlabelled

    try:
        extra = load_unlabelled(root, task=plan.task, num_classes=plan.num_classes,
                                samples=plan.samples, image_size=plan.image_size, seed=0)
    except DataError as exc:
        logger.warning("unlabelled patients left out of the pretext step: %s", exc)
        return split
    if not extra.num_patients:
        return split
    return SplitArrays(
        images=torch.cat([split.images, extra.images]),
        labels=torch.cat([split.labels.reshape(len(split), -1)[:, 0],
                          torch.zeros(len(extra), dtype=torch.long)]),
        patient_index=torch.cat([split.patient_index, extra.patient_index + split.num_patients]),
        num_patients=split.num_patients + extra.num_patients)


def self_supervised_training(plan: TrainPlan, task: Task, split: SplitArrays, data: NodeData,
                             model: nn.Module, options: dict[str, Any]) -> NodeTraining:
    """The pretext step on the training split's patients (the node hook)."""
    check_encoder_model(plan, plan.paradigm)
    split = with_unlabelled(plan, split, data)
    pretext = str(options["pretext"])
    wrapped = PretextModel(model, HEAD_LAYERS[plan.model],
                           pretext_outputs(pretext, plan.image_size), seed=plan.seed)
    dataset = PretextDataset(split, pretext, views=int(options["views"]),
                             mask_ratio=float(options["mask-ratio"]), patch=int(options["patch"]))
    losses: dict[str, Any]
    if pretext == "rotation":
        losses = {"output_loss": rotation_loss}
    elif pretext == "masked":
        losses = {"input_loss": masked_loss}
    else:
        losses = {"input_loss": contrastive_loss}
    return NodeTraining(model=wrapped, dataset=dataset, num_patients=split.num_patients,
                        losses=losses)
