"""Reconstruction: self-supervised pretraining on every image a node holds, labelled or not.

The target is the sample itself. Autoencoders (:class:`common.models.autoencoder`) define
their own per-sample reconstruction loss (``dp_loss_per_sample``: denoising and sparsity
terms included), used when the model carries no label term; otherwise the voxel-mean squared
error of ``reconstruct``. The output is the encoder checkpoint that ``--init-from``
fine-tunes. DBN and DBM pretrain through their own phases (``--model-phase pretrain``, a
batch mean of per-sample contrastive-divergence terms with Gibbs sampling); they serve this
task once their per-sample CD surrogate is exposed as a ``[B]`` loss.
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

    def model_loss(self, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """``[B]`` per-sample loss of ``model`` reconstructing ``inputs`` (its own when it has one)."""
        own = getattr(model, "dp_loss_per_sample", None)
        if callable(own) and float(getattr(model, "label_weight", 0.0)) == 0.0:
            no_labels = torch.zeros(len(inputs), dtype=torch.long, device=inputs.device)
            return own(inputs, no_labels)  # its denoising and sparsity terms included
        reconstruct = getattr(model, "reconstruct", None)
        if not callable(reconstruct):
            why = "the model cannot reconstruct its input; choose a model that serves 'reconstruction'"
            raise DataError(why, safe_reason=why)
        return self.per_sample_loss(reconstruct(inputs), inputs)

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
    "self-supervised pretraining of autoencoders: reconstruction error; no labels needed"))
