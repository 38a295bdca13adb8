"""Report fragments for the regression and segmentation tasks.

Each function reads one ``inference`` section (:func:`server.inference_regression.
regression_inference`, :func:`server.inference_segmentation.segmentation_inference`) and
renders it for people:

* ``report.html``: :func:`regression_section_html` (table, Bland-Altman style agreement plot
  and the pooled ``|error|`` histogram), :func:`segmentation_section_html` (pooled and per-site
  Dice and HD95) and :func:`segmentation_overlays_html` (the final model on *synthetic*
  phantom slices; the coordinator holds no patient image);
* ``summary.txt``: :func:`regression_summary_lines`, :func:`segmentation_summary_lines`;
* the CLI: :func:`regression_rows`, :func:`segmentation_rows` (``(label, value)`` pairs of
  plain text).

A missing or failed section gives a one-line reason; no function raises on a partial section.
Every number shown is an estimate from pooled sums or a pooled count: no hospital released a
per-patient value, which is why the Bland-Altman figure (Bland & Altman 1986; 1999) shows the
bias and the limits of agreement with their intervals as bands, without patient points.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from server.report_tables import img
from server.report_tables import site_table
from server.report_text import fmt, fmt_interval

__all__ = ["plot_agreement", "regression_rows", "regression_section_html",
           "regression_summary_lines", "segmentation_overlays_html", "segmentation_rows",
           "segmentation_section_html", "segmentation_summary_lines", "synthetic_phantoms"]

_SIZE = (5.0, 4.2)


# --- small readers ----------------------------------------------------------------------------

def _part(section: Any, key: str) -> Mapping[str, Any]:
    part = section.get(key) if isinstance(section, Mapping) else None
    return part if isinstance(part, Mapping) else {}


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _value(est: Any) -> float | None:
    return _num(est.get("value")) if isinstance(est, Mapping) else _num(est)


def _text(est: Any, digits: int = 3) -> str:
    """``4.21 (95% CI 3.80-4.62)`` as plain text; ``-`` when undefined."""
    v = _value(est)
    if v is None:
        return "-"
    if not isinstance(est, Mapping):
        return f"{v:.{digits}f}"
    lo, hi = _num(est.get("lower")), _num(est.get("upper"))
    return f"{v:.{digits}f}" + (f" (95% CI {lo:.{digits}f}-{hi:.{digits}f})"
                                if lo is not None and hi is not None else "")


def _cell(est: Any) -> str:
    if isinstance(est, Mapping):
        return fmt_interval(est) if _value(est) is not None else fmt(None)
    if isinstance(est, int) and not isinstance(est, bool):
        return fmt(est)
    return fmt(_num(est), 4)


def _failed(section: Any, what: str) -> str:
    reason = section.get("reason") if isinstance(section, Mapping) else None
    return (f'<p class="note">No pooled {html.escape(what)} results: '
            f'{fmt(reason or "the section is missing")}.</p>')


def _completed(section: Any) -> bool:
    return isinstance(section, Mapping) and section.get("status") == "completed"


def _failed_rows(section: Any) -> list[tuple[str, str]]:
    reason = section.get("reason", "") if isinstance(section, Mapping) else "no section"
    return [("status", f"failed: {reason}")]


def _note(section: Mapping[str, Any]) -> str:
    parts = [f'<p class="note">{fmt(section["note"])}.</p>'] if section.get("note") else []
    if section.get("noised"):
        parts.append('<p class="note">Some hospitals added calibrated Gaussian noise to their '
                     "sums (differential privacy): the figures carry that noise.</p>")
    return "".join(parts)


def _rows_table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(name)}</th><td>{_cell(v)}</td></tr>"
                   for name, v in rows if v is not None)
    return f"<table>{body}</table>" if body else ""


# --- regression ---------------------------------------------------------------------------

def _band(ax: Any, est: Any, colour: str, name: str) -> None:
    v = _value(est)
    if v is None:
        return
    ax.axhline(v, color=colour, lw=1.6, label=f"{name} {v:.2f}")
    lo, hi = _num(est.get("lower")), _num(est.get("upper"))
    if lo is not None and hi is not None:
        ax.axhspan(lo, hi, color=colour, alpha=0.18, lw=0)


def plot_agreement(reg: Mapping[str, Any], value_range: Mapping[str, Any]) -> Figure:
    """Bland-Altman bands (left) and the pooled ``|error|`` histogram (right).

    Left: the bias and the 95% limits of agreement as lines, each with its confidence interval
    as a band, over the clipping range of the mean of prediction and target (no patient point
    exists at the coordinator). Right: patients per ``|error|`` bin, the median's bin marked.
    """
    ba = _part(reg, "bland_altman")
    fig = Figure(figsize=(2 * _SIZE[0], _SIZE[1]))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    _band(left, ba.get("loa_upper"), "tab:red", "upper limit")
    _band(left, ba.get("bias"), "tab:blue", "bias")
    _band(left, ba.get("loa_lower"), "tab:red", "lower limit")
    left.axhline(0.0, ls=":", color="grey", lw=0.8)
    lo, hi = _num(value_range.get("lower")), _num(value_range.get("upper"))
    if lo is not None and hi is not None and hi > lo:
        left.set_xlim(lo, hi)
    left.set(xlabel="mean of prediction and target", ylabel="prediction - target",
             title="Agreement (bands: 95% CIs)")
    left.legend(loc="upper right", fontsize=7)
    hist = _part(reg, "abs_error_histogram")
    edges = np.asarray(hist.get("edges") or [], dtype=np.float64)
    counts = np.asarray(hist.get("counts") or [], dtype=np.float64)
    if edges.size == counts.size + 1 and counts.size:
        colours = ["tab:gray"] * counts.size
        median = _part(hist, "median")
        m_lo = _num(median.get("lower"))
        if m_lo is not None:
            colours[min(int(np.searchsorted(edges, m_lo, side="right")) - 1,
                        counts.size - 1)] = "tab:orange"
        right.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=colours,
                  edgecolor="white")
    right.set(xlabel="|prediction - target|", ylabel="patients",
              title="Pooled |error| (orange: median's bin)")
    return fig


def _regression_rows_html(reg: Mapping[str, Any]) -> list[tuple[str, Any]]:
    median = _part(reg, "median_abs_error")
    med = (f"{median['lower']:.3g} to {median['upper']:.3g}"
           if _num(median.get("lower")) is not None and _num(median.get("upper")) is not None
           else None)
    return [("Mean absolute error (t CI)", reg.get("mae")),
            ("Root mean squared error", reg.get("rmse")),
            ("R² (around the pooled mean)", reg.get("r2")),
            ("Pearson r (Fisher z CI)", reg.get("pearson_r")),
            ("Bland-Altman bias, prediction - target (t CI)", reg.get("bias")),
            ("Lower 95% limit of agreement (CI)", reg.get("loa_lower")),
            ("Upper 95% limit of agreement (CI)", reg.get("loa_upper")),
            ("SD of the differences", reg.get("sd_difference")),
            ("Median absolute error lies in the bin", med)]


def regression_section_html(section: Mapping[str, Any]) -> str:
    """The regression task's pooled test results: headline, table, agreement plot, sites."""
    if not _completed(section):
        return _failed(section, "regression")
    reg = _part(section, "regression")
    vr = _part(section, "value_range")
    sites = section.get("sites") or []
    head = (f'<p class="headline">Pooled test mean absolute error: '
            f"<strong>{_cell(reg.get('mae'))}</strong> on {fmt(section.get('n'))} test patients"
            + (f" from {len(sites)} hospitals" if len(sites) > 1 else "") + ".</p>"
            "<p>How it was pooled: each hospital clipped its test patients' targets and "
            f"predictions to [{fmt(_num(vr.get('lower')))}, {fmt(_num(vr.get('upper')))}] "
            "(target units) and released only sums (of targets, predictions, their squares "
            "and products, of errors and squared errors) and a coarse count of patients per "
            "|error| bin; every figure below is computed from their totals. No patient's "
            "value reached the coordinator, so the agreement plot shows the bias and limits "
            "of agreement with their intervals instead of patient points.</p>")
    table = "".join(
        f"<tr><th>{html.escape(name)}</th><td>"
        f"{html.escape(v) if isinstance(v, str) else _cell(v)}</td></tr>"
        for name, v in _regression_rows_html(reg) if v is not None)
    plot = img(plot_agreement(reg, vr), "Bland-Altman bias and limits of agreement with "
               "their confidence intervals, and the pooled absolute-error histogram")
    sites_html = site_table(reg.get("per_site"), (("n", "Test patients"), ("mae", "MAE"),
                                                   ("bias", "Bias"), ("rmse", "RMSE")))
    return head + _note(section) + f"<table>{table}</table>" + plot + sites_html


def regression_rows(section: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` rows for the CLI (plain text)."""
    if not _completed(section):
        return _failed_rows(section)
    reg = _part(section, "regression")
    median = _part(reg, "median_abs_error")
    rows = [("patients", str(section.get("n", 0))),
            ("mean absolute error", _text(reg.get("mae"))),
            ("root mean squared error", _text(reg.get("rmse"))),
            ("R²", _text(reg.get("r2"))), ("Pearson r", _text(reg.get("pearson_r"))),
            ("Bland-Altman bias", _text(reg.get("bias"))),
            ("lower limit of agreement", _text(reg.get("loa_lower"))),
            ("upper limit of agreement", _text(reg.get("loa_upper")))]
    if _num(median.get("lower")) is not None and _num(median.get("upper")) is not None:
        rows.append(("median absolute error (bin)",
                     f"{median['lower']:.3g} to {median['upper']:.3g}"))
    return rows


def regression_summary_lines(section: Mapping[str, Any]) -> list[str]:
    """Lines for ``summary.txt`` (or why there are none)."""
    if not _completed(section):
        reason = section.get("reason") if isinstance(section, Mapping) else ""
        return [f"regression inference failed: {reason or 'no section'}"]
    return [f"test {name}: {value}" for name, value in regression_rows(section)[1:]
            if value != "-"]


# --- segmentation -------------------------------------------------------------------------

def segmentation_section_html(section: Mapping[str, Any], overlays_html: str = "") -> str:
    """The segmentation task's pooled test results: Dice and HD95, pooled and per site.

    ``overlays_html`` (e.g. :func:`segmentation_overlays_html`) is appended as it is.
    """
    if not _completed(section):
        return _failed(section, "segmentation") + overlays_html
    seg = _part(section, "segmentation")
    sites = section.get("sites") or []
    hd95 = _part(seg, "hd95")
    head = (f'<p class="headline">Pooled test mean Dice: <strong>{_cell(seg.get("dice"))}'
            f"</strong> on {fmt(section.get('n'))} test patients"
            + (f" from {len(sites)} hospitals" if len(sites) > 1 else "") + ".</p>"
            "<p>How it was pooled: each hospital computed every test patient's Dice and 95th "
            "percentile Hausdorff distance (HD95) of the predicted lesion against the true "
            "mask, and released only their sums and sums of squares; the means and t "
            "intervals come from the totals. HD95 is in pixels of the model's input grid, "
            "clipped to the image diagonal, and averages only the patients whose true and "
            "predicted masks are both non-empty.</p>")
    table = _rows_table([
        ("Mean Dice (t CI)", seg.get("dice")),
        (f"Mean HD95, pixels (t CI; {fmt(hd95.get('n'))} patients)", seg.get("hd95")),
        ("Patients with both masks empty (no lesion, none found)", seg.get("n_empty_both")),
        ("Patients with exactly one mask empty (lesion missed or invented)",
         seg.get("n_empty_one"))])
    sites_html = site_table(seg.get("per_site"), (
        ("n", "Test patients"), ("dice", "Mean Dice [95% CI]"),
        ("hd95", "Mean HD95, px [95% CI]"), ("n_empty_both", "Both empty"),
        ("n_empty_one", "One empty")))
    return head + _note(section) + table + sites_html + overlays_html


def segmentation_rows(section: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` rows for the CLI (plain text)."""
    if not _completed(section):
        return _failed_rows(section)
    seg = _part(section, "segmentation")
    return [("patients", str(section.get("n", 0))), ("mean Dice", _text(seg.get("dice"))),
            ("mean HD95 (pixels)", _text(seg.get("hd95"))),
            ("both masks empty", str(seg.get("n_empty_both", "-"))),
            ("one mask empty", str(seg.get("n_empty_one", "-")))]


def segmentation_summary_lines(section: Mapping[str, Any]) -> list[str]:
    """Lines for ``summary.txt`` (or why there are none)."""
    if not _completed(section):
        reason = section.get("reason") if isinstance(section, Mapping) else ""
        return [f"segmentation inference failed: {reason or 'no section'}"]
    return [f"test {name}: {value}" for name, value in segmentation_rows(section)[1:]
            if value != "-"]


# --- synthetic overlays ---------------------------------------------------------------------

def synthetic_phantoms(image_size: int, *, count: int = 3, seed: int = 2026,
                       native_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """``count`` synthetic phantom slices with a liver lesion and their masks, at the model grid.

    Drawn with the demo's own phantom (:func:`client.dicom.synth_phantom.draw_anatomy`,
    :func:`~client.dicom.synth_phantom.draw_lesion`, :func:`~client.dicom.synth_phantom.
    render_slice` and :func:`client.dicom.synth_seg.lesion_mask`) through the first site
    profile's noise, each slice through the lesion's centre; images are preprocessed as the
    nodes do (:func:`client.data.transforms.preprocess`) and masks resized by area (>= 0.5).
    Nothing here comes from a patient. Returns float32 ``[count, 1, S, S]`` and bool
    ``[count, S, S]``.
    """
    import torch
    from monai.transforms import Resize

    from client.data.transforms import preprocess
    from client.dicom.synth_phantom import draw_anatomy, draw_lesion, render_slice
    from client.dicom.synth_profiles import default_profiles
    from client.dicom.synth_seg import lesion_mask

    profile = default_profiles(1)[0]
    spacing = profile.field_of_view_mm / native_size
    rng = np.random.default_rng(seed)
    images, masks = [], []
    while len(images) < count:
        anatomy = draw_anatomy(rng)
        lesion = draw_lesion(rng, anatomy, mean_contrast_hu=profile.lesion_contrast, n_slices=1)
        z = lesion.cz
        mask = lesion_mask(anatomy, lesion, z_mm=z, size=native_size, spacing_mm=spacing)
        if not mask.any():
            continue
        phantom = render_slice(anatomy, lesion, z_mm=z, slice_index=0, size=native_size,
                               spacing_mm=spacing)
        phantom = phantom + rng.normal(0.0, profile.noise_sd, size=phantom.shape)
        images.append(preprocess(phantom.astype(np.float32), image_size))
        small = Resize((image_size, image_size), mode="area")(
            torch.as_tensor(mask[None].astype(np.float32)))
        masks.append(torch.as_tensor(small)[0].numpy() >= 0.5)
    return torch.stack(images).numpy(), np.stack(masks)


def _model(state_dict_or_model: Any, plan: Any) -> Any:
    import torch

    from common.models import build_model
    from common.tasks import get_task
    from common.tasks.federated import spatial_dims

    if isinstance(state_dict_or_model, torch.nn.Module):
        return state_dict_or_model
    state = state_dict_or_model
    if hasattr(state, "to_torch_state_dict"):  # a Flower ArrayRecord
        state = state.to_torch_state_dict()
    model = build_model(plan.model, in_channels=1,
                        num_classes=get_task(plan.task).num_outputs(plan.num_classes),
                        image_size=plan.image_size, spatial_dims=spatial_dims(plan.samples))
    model.load_state_dict(state)
    return model


def segmentation_overlays_html(state_dict_or_model: Any, plan: Any) -> str:
    """The final model on 3 synthetic phantom slices: image, true and predicted contours.

    ``state_dict_or_model`` is a ``torch.nn.Module``, a state dict or a Flower ArrayRecord of
    ``plan``'s model. Only 2-D plans are drawn (``""`` otherwise, or when the model cannot be
    built). The caption says the slices are synthetic phantoms, not patients.
    """
    import torch

    from common.stats.segmentation import dice_coefficient

    if getattr(plan, "samples", "image-2d") != "image-2d":
        return ""
    try:
        model = _model(state_dict_or_model, plan)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        return f'<p class="note">No synthetic overlays: {fmt(str(exc)[:200])}.</p>'
    images, truth = synthetic_phantoms(int(plan.image_size))
    model.eval()
    with torch.no_grad():
        pred = (model(torch.as_tensor(images)).argmax(dim=1) >= 1).numpy()
    fig = Figure(figsize=(3.2 * len(images), 3.6))
    for i in range(len(images)):
        ax = fig.add_subplot(1, len(images), i + 1)
        ax.imshow(images[i, 0], cmap="gray", interpolation="nearest")
        if truth[i].any():
            ax.contour(truth[i].astype(float), levels=[0.5], colors="lime", linewidths=1.4)
        if pred[i].any():
            ax.contour(pred[i].astype(float), levels=[0.5], colors="red", linewidths=1.2,
                       linestyles="dashed")
        ax.set_title(f"phantom {i + 1}: Dice {dice_coefficient(pred[i], truth[i]):.2f}",
                     fontsize=8)
        ax.set_axis_off()
    caption = ("Synthetic phantom slices, not patients: generated at the coordinator with the "
               "project's CT phantom (the coordinator holds no patient image), segmented by "
               "the final model. Green: the phantom's true lesion; red dashed: the model's "
               "prediction.")
    return ("<figure>" + img(fig, "final model on three synthetic phantom slices (not "
                             "patients): true and predicted lesion contours")
            + f"<figcaption>{html.escape(caption)}</figcaption></figure>")
