"""``vesalius synth``: write a demo federation of DICOM hospitals for any task."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.console import console, fmt, progress_bar, table
from cli.node_check import task_names
from cli.options import LazyChoice

#: Rows of the summary table before the rest is summed up in one line.
_SHOWN_SITES = 20


def synth(
    out: Path = typer.Option(..., "--out", help="Folder to write site-1/, site-2/, ... into."),
    sites: int = typer.Option(3, "--sites", min=1, max=1000, help="Number of hospitals."),
    patients: int = typer.Option(500, "--patients", min=4, help="Patients per hospital."),
    seed: int = typer.Option(0, "--seed", help="Random seed (output is deterministic)."),
    task: str = typer.Option(
        "binary", "--task", click_type=LazyChoice(task_names),
        help="What the labels are: binary (the demo), multiclass (lesion types), ordinal "
        "(lesion size grades), multilabel (findings), regression (lesion area, cm²), "
        "segmentation (mask series) or reconstruction (images only).",
    ),
    num_classes: int | None = typer.Option(
        None, "--num-classes", min=2,
        help="K for multiclass (2-6, default 4), ordinal (2-8, default 5) or multilabel "
        "(2-3, default 3).",
    ),
    slices: int | None = typer.Option(
        None, "--slices", min=1, max=64,
        help="Slices per study (one series, 6 mm apart; e.g. 8 for volume or recurrent "
        "models); by default 2-4.",
    ),
) -> None:
    """Write synthetic, PHI-free DICOM studies and their labels for each hospital.

    `vesalius node check --task TASK` accepts what each task writes.
    """
    import client.dicom.synth as synth_binary
    from client.dicom.synth_tasks import check_num_classes, synthesize_task_federation

    if not str(out).strip() or str(out) == ".":
        raise typer.BadParameter("give --out a new folder to write the hospitals into",
                                 param_hint="--out")
    if task == "binary" and num_classes not in (None, 2):
        raise typer.BadParameter("the binary task has 2 classes", param_hint="--num-classes")
    if task in ("regression", "segmentation", "reconstruction") and num_classes is not None:
        raise typer.BadParameter(f"the {task} task takes no number of classes",
                                 param_hint="--num-classes")
    if task != "binary":
        try:
            num_classes = check_num_classes(task, num_classes)
        except Exception as exc:  # noqa: BLE001 - a ConfigError naming the range
            raise typer.BadParameter(str(exc), param_hint="--num-classes") from None
    span = (2, 4) if slices is None else (slices, slices)

    with progress_bar("writing DICOM") as progress:
        if task == "binary":
            summaries = synth_binary.synthesize_federation(
                out, n_sites=sites, patients_per_site=patients, images_per_patient=span,
                seed=seed, progress=progress)
        else:
            summaries = synthesize_task_federation(
                out, task=task, num_classes=num_classes, n_sites=sites,
                patients_per_site=patients, images_per_patient=span, seed=seed,
                progress=progress)
    what = {"binary": "positive", "segmentation": "lesion images",
            "reconstruction": "with lesion"}.get(task, "non-zero target")
    t = table(f"Synthetic {task} federation in {out}", ["site", "patients", "images", what])
    for s in summaries[:_SHOWN_SITES]:
        t.add_row(s.site, str(s.patients), str(s.images), fmt(s.positives, "d"))
    if len(summaries) > _SHOWN_SITES:
        rest = summaries[_SHOWN_SITES:]
        t.add_row(f"… {len(rest)} more", str(sum(s.patients for s in rest)),
                  str(sum(s.images for s in rest)), fmt(sum(s.positives for s in rest), "d"))
    console.print(t)
    k = f" --num-classes {num_classes}" if num_classes and task != "binary" else ""
    console.print(f"check a site with: vesalius node check --data {out}/site-1 --task {task}{k}",
                  highlight=False, soft_wrap=True)
