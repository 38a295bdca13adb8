"""``vesalius node attention``: which slices an MIL model looked at, shown at the hospital only.

An attention-MIL model (``--paradigm mil``, :class:`common.models.mil.AttentionMIL`) weighs the
slices of each study's volume; the weights are a view of the hospital's own studies, so they
are computed here, from the run's checkpoint and the node's data folder, and written to a local
folder (``attention.json`` and one PNG per study: the weight of each slice and the slices it
weighed most). Nothing is sent anywhere: no node message carries attention, and the
coordinator's report only says that it exists at the nodes.

Studies are named by their position in the split (``test-001``, ...), never by a patient id,
a UID or a path; the JSON holds each study's label, the model's score and its slice weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch
import typer
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cli.console import console, table
from common.errors import ConfigError

__all__ = ["attention", "plot_study", "study_attention"]

SPLITS = ("train", "val", "test")
TOP_SLICES = 4
"""Slices shown beside each study's attention bars (the most weighed ones)."""


def _load_model(checkpoint: Path, model_name: str, image_size: int) -> torch.nn.Module:
    """The MIL model of ``checkpoint`` (its output count read from the classifier's weights)."""
    from common.models import build_model
    from common.models.mil import is_mil_model

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weight = state.get("classifier.weight") if isinstance(state, dict) else None
    if weight is None:
        raise ConfigError(f"{checkpoint.name} is not a checkpoint of an MIL model (no "
                          "classifier weights); pass the final.pt of a --paradigm mil run")
    model = build_model(model_name, num_classes=int(weight.shape[0]), image_size=image_size,
                        spatial_dims=3)
    if not is_mil_model(model):
        raise ConfigError(f"--model {model_name} has no slice attention; use mil-attention")
    model.load_state_dict(state)
    return model.eval()


def study_attention(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    prefix: str) -> list[dict[str, Any]]:
    """One row per study: its label, the model's class probabilities and slice weights."""
    rows = []
    with torch.no_grad():
        for start in range(0, len(images), 16):
            batch = images[start:start + 16]
            probs = torch.softmax(model(batch), dim=1)
            weights = model.attention(batch)
            for i in range(len(batch)):
                n = start + i
                w = weights[i]
                rows.append({"study": f"{prefix}-{n + 1:03d}", "label": int(labels[n]),
                             "probabilities": [round(float(p), 6) for p in probs[i]],
                             "weights": [round(float(v), 6) for v in w],
                             "top_slice": int(w.argmax())})
    return rows


def plot_study(row: dict[str, Any], volume: torch.Tensor) -> Figure:
    """Bars of the slice weights, and the ``TOP_SLICES`` most weighed slices of ``volume``."""
    weights = row["weights"]
    top = sorted(range(len(weights)), key=lambda s: -weights[s])[:TOP_SLICES]
    fig = Figure(figsize=(2.0 * (len(top) + 2), 2.6))
    grid = fig.add_gridspec(1, len(top) + 2)
    bars = fig.add_subplot(grid[0, :2])
    bars.bar(range(len(weights)), weights, color="tab:blue")
    bars.xaxis.get_major_locator().set_params(integer=True)
    bars.set_xlabel("slice")
    bars.set_ylabel("attention")
    bars.set_title(f"{row['study']} (label {row['label']})", fontsize=9)
    for col, s in enumerate(top, start=2):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(volume[0, s].numpy(), cmap="gray")
        ax.set_title(f"slice {s}: {weights[s]:.2f}", fontsize=8)
        ax.axis("off")
    return fig


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=80, bbox_inches="tight", metadata={"Software": None})


def attention(
    data_dir: Path = typer.Option(..., "--data-dir", "--data",
                                  help="The node's data folder (DICOM + labels.csv)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", exists=True, dir_okay=False,
                                    help="The run's final.pt (a --paradigm mil run)."),
    image_size: int = typer.Option(32, "--image-size", min=4,
                                   help="The run's image size (slices per bag and their side)."),
    task: str = typer.Option("binary", "--task", click_type=click.Choice(["binary",
                                                                          "multiclass"])),
    model_name: str = typer.Option("mil-attention", "--model", help="The run's MIL model."),
    split: str = typer.Option("test", "--split", click_type=click.Choice(list(SPLITS)),
                              help="Whose studies: the node's train, val or test patients."),
    out: Path = typer.Option(Path("attention"), "--out",
                             help="Local folder for attention.json and the PNGs."),
    max_plots: int = typer.Option(12, "--max-plots", min=0, help="PNGs drawn (first studies)."),
    allow_identified: bool = typer.Option(False, "--allow-identified",
                                          help="Read files that carry direct identifiers."),
) -> None:
    """Show each study's slice attention of an MIL model, here at the hospital (never sent)."""
    from client.data.task_data import load_task_data

    model = _load_model(checkpoint, model_name, image_size)
    outputs = int(model.classifier.out_features)  # type: ignore[union-attr]
    data = load_task_data(data_dir, task=task, num_classes=max(outputs, 2), samples="series",
                          image_size=image_size, require_deidentified=not allow_identified,
                          seed=0)  # the node's own split, as training uses it
    chosen = getattr(data, split)
    rows = study_attention(model, chosen.images, chosen.labels.reshape(len(chosen), -1)[:, 0],
                           split)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": model_name, "checkpoint": checkpoint.name, "split": split,
           "slices_per_study": image_size, "studies": rows}
    (out / "attention.json").write_text(json.dumps(doc, indent=2))
    for row, volume in list(zip(rows, chosen.images))[:max_plots]:
        _save(plot_study(row, volume), out / f"{row['study']}.png")
    shown = table(f"Slice attention ({split} studies)",
                  ["study", "label", "top slice", "its weight", "max p"])
    for row in rows:
        shown.add_row(row["study"], str(row["label"]), str(row["top_slice"]),
                      f"{max(row['weights']):.3f}", f"{max(row['probabilities']):.3f}")
    console.print(shown)
    console.print(f"{len(rows)} studies; attention written to {out} (kept on this machine, "
                  "never sent to the coordinator)", highlight=False, soft_wrap=True)
