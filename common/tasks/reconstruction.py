"""Reconstruction: self-supervised pretraining on every image a node holds, labelled or not.

The target is the sample itself. Every model that serves the task (``"reconstruction"`` in
its ``ModelSpec.tasks``) has two methods, so the task never branches on the family:

``reconstruction_loss_per_sample(inputs) -> Tensor``
    Its self-supervised objective, ``[B]``; row ``i`` depends only on sample ``i`` (what
    DP-SGD's per-sample clipping needs). Autoencoders: the reconstruction error of their
    training objective, denoising corruption and sparsity penalty included, never the label
    term. DBN: the sum over its RBMs of the per-sample contrastive-divergence surrogates
    (Hinton 2002) on the deterministic up-pass (every layer in one run), or one RBM's in phase
    ``pretrain:<layer>``. DBM: its per-sample mean-field / CD surrogate (Salakhutdinov and
    Hinton 2009). See :mod:`common.models.autoencoder` and :mod:`common.models.boltzmann`.
``reconstruction_modules() -> list[nn.Module]``
    The sub-modules that objective trains (never a classification head).

:meth:`ReconstructionTask.model_loss` is the trainer's per-sample criterion
``(model, inputs, targets) -> [B]`` (targets ignored); it accepts the bare network or an
Opacus ``GradSampleModule`` around it. :meth:`ReconstructionTask.prepare_model` freezes every
parameter the objective does not train; call it before the model is wrapped for DP-SGD (Opacus
refuses a trainable parameter that gets no per-sample gradient, e.g. an unused head). A model
without these methods but with ``reconstruct`` is scored by the voxel-mean squared error of
its reconstruction. The pretrained weights are what ``--init-from``
(:func:`common.models.transfer.init_from`) fine-tunes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.errors import DataError
from common.tasks.base import ModelHead, SampleKind, TargetKind, TaskInfo

__all__ = ["RECONSTRUCTION", "ReconstructionTask"]


@dataclass(frozen=True)
class ReconstructionTask:
    """The reconstruction task (see the module docstring)."""

    info: TaskInfo

    def num_outputs(self, num_classes: int) -> int:
        """Outputs of the model's classification head (unused while pretraining)."""
        return 2

    def check_targets(self, targets: torch.Tensor, num_classes: int) -> None:
        """The targets are the inputs: finite images."""
        if not bool(torch.isfinite(targets.double()).all()):
            raise DataError("reconstruction inputs hold NaN or infinite values",
                            safe_reason="the node's images are not all finite")

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Voxel-mean squared error between a reconstruction and its input, per sample."""
        return ((outputs - targets.to(outputs.dtype)) ** 2).flatten(1).mean(1)

    def model_loss(self, model: torch.nn.Module, inputs: torch.Tensor,
                   targets: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` per-sample self-supervised loss of ``model`` on ``inputs``.

        Parameters
        ----------
        model : torch.nn.Module
            The network, or an Opacus ``GradSampleModule`` wrapping it (its methods are found
            on ``model._module`` and run through its hooked sub-modules, so per-sample
            gradients are captured).
        inputs : torch.Tensor
            ``[B, C, *spatial]`` images.
        targets : torch.Tensor, optional
            Ignored (the target is the input); accepted so that this method is a trainer
            criterion ``(model, inputs, targets) -> [B]``.

        Returns
        -------
        torch.Tensor
            The model's ``reconstruction_loss_per_sample(inputs)``, else the voxel-mean squared
            error of ``reconstruct(inputs)``.

        Raises
        ------
        DataError
            When the model has neither method (it does not serve the task).
        """
        inner = getattr(model, "_module", model)
        own = getattr(inner, "reconstruction_loss_per_sample", None)
        if callable(own):
            loss: torch.Tensor = own(inputs)
            return loss
        reconstruct = getattr(inner, "reconstruct", None)
        if not callable(reconstruct):
            why = "the model cannot reconstruct its input; choose a model that serves 'reconstruction'"
            raise DataError(why, safe_reason=why)
        return self.per_sample_loss(reconstruct(inputs), inputs)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Make exactly the parameters of ``model.reconstruction_modules()`` trainable.

        Call it on the (unwrapped) model before DP training, after any ``set_phase`` (a DBN's
        phase ``pretrain:<layer>`` selects the RBM trained). A model without
        ``reconstruction_modules`` is returned unchanged.

        Returns
        -------
        torch.nn.Module
            ``model`` itself, modified in place (``requires_grad`` of its parameters).
        """
        inner = getattr(model, "_module", model)
        modules = getattr(inner, "reconstruction_modules", None)
        if not callable(modules):
            return model
        keep = {id(p) for m in modules() for p in m.parameters()}
        for p in inner.parameters():
            p.requires_grad_(id(p) in keep)
        return model

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """The reconstruction itself."""
        return outputs

    def patient_prediction(self, predictions: np.ndarray, targets: np.ndarray,
                           patient_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reconstructions and inputs, images ordered by patient."""
        order = np.argsort(patient_index, kind="stable")
        return predictions[order], targets[order]


RECONSTRUCTION = ReconstructionTask(TaskInfo(
    "reconstruction", TargetKind.SELF, ModelHead.RECONSTRUCTION,
    (SampleKind.IMAGE_2D, SampleKind.VOLUME_3D),
    "self-supervised pretraining (autoencoders, DBN, DBM): per-sample reconstruction or CD "
    "objective; no labels needed"))
