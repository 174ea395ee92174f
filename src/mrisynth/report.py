"""Figures for ``mrisynth evaluate --figures``: one panel grid per case and a summary plot.

Matplotlib is imported inside the functions and used through its object API with the Agg
canvas (no pyplot, no global backend switch), so importing mrisynth stays fast and a user's
interactive backend is left alone.

Display rules, so that a figure never flatters the model:

* the synthetic image is shown exactly as written (grey scale fixed to [0, 1], no contrast
  stretch, no smoothing); the real target and the inputs are scaled the way the metrics scale
  the reference (1st-99th percentile inside the brain mask), on the same [0, 1] grey scale;
* the error map is |prediction - reference| after both are scaled as the brain metrics scale
  them (what PSNR and MAE measure), on a fixed 0-0.5 colour scale so cases can be compared;
* slices are axial, shown the radiological way: anterior up, the patient's left on the
  viewer's right, whatever the file's voxel order (volumes are reoriented to LPS first).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from .metrics import normalise_percentile
from .modalities import MODALITIES
from .preprocess import CANONICAL_ORNT

if TYPE_CHECKING:
    from .evaluate import CaseData

ERROR_VMAX = 0.5


# --- orientation ---------------------------------------------------------------------------


def to_lps(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The volume with its voxel axes reordered/flipped to L, P, S (no resampling)."""
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), CANONICAL_ORNT)
    return nib.orientations.apply_orientation(volume, transform)


def lps_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes along the L, P, S axes of :func:`to_lps`'s output."""
    sizes = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    ornt = nib.orientations.io_orientation(affine)
    out = [1.0, 1.0, 1.0]
    for axis, (target, _flip) in enumerate(ornt):
        out[int(target)] = float(sizes[axis])
    return out[0], out[1], out[2]


def radiological(slice_lps: np.ndarray) -> np.ndarray:
    """An LPS axial slice [x, y] as an image: rows = y (anterior at the top), columns = x
    (patient's left on the viewer's right). Equivalent to ``np.rot90`` of an LAS slice."""
    return slice_lps.T


def display_slice(mask_lps: np.ndarray, seg_lps: np.ndarray | None) -> int:
    """The axial slice with the largest tumour area, else the middle slice containing brain."""
    if seg_lps is not None and np.any(seg_lps > 0):
        return int(np.argmax((seg_lps > 0).sum(axis=(0, 1))))
    brain = np.flatnonzero(mask_lps.any(axis=(0, 1)))
    if brain.size == 0:
        return mask_lps.shape[2] // 2
    return int(brain[len(brain) // 2])


def brain_box(mask_lps: np.ndarray, margin: int = 6) -> tuple[slice, slice]:
    """In-plane (x, y) bounding box of the brain over all slices, plus a margin: panels show the
    head, not the empty field of view, and every slice of a case is cropped the same way."""
    box = []
    for axis in (0, 1):
        other = tuple(a for a in (0, 1, 2) if a != axis)
        present = np.flatnonzero(mask_lps.any(axis=other))
        if present.size == 0:
            box.append(slice(None))
            continue
        box.append(slice(max(int(present[0]) - margin, 0), int(present[-1]) + 1 + margin))
    return box[0], box[1]


# --- per-case figure -------------------------------------------------------------------------


def case_figure(data: "CaseData", row: dict[str, Any], path: str | Path) -> Path:
    """Inputs, real and synthetic target and |error| at one axial slice, titled with PSNR/SSIM."""
    from matplotlib.figure import Figure

    affine = data.geometry.affine
    mask = data.mask
    modality = row["modality"]
    ref_n = normalise_percentile(data.reference, mask)
    error = np.abs(normalise_percentile(data.prediction, mask) - ref_n)
    seg_lps = to_lps(data.seg, affine) if data.seg is not None else None
    mask_lps = to_lps(mask, affine)
    z = display_slice(mask_lps, seg_lps)
    box = brain_box(mask_lps)
    sx, sy, _ = lps_spacing(affine)
    aspect = sy / sx

    def view(volume: np.ndarray) -> np.ndarray:
        return radiological(to_lps(volume, affine)[box[0], box[1], z])

    panels = [(f"input {m}", view(normalise_percentile(data.inputs[m], mask))) for m in MODALITIES if m in data.inputs]
    panels += [(f"real {modality}", view(ref_n)), (f"synthetic {modality} (as written)", view(data.prediction))]

    fig = Figure(figsize=(12, 8.4), layout="constrained")
    axes = fig.subplots(2, 3)
    for ax, (title, image) in zip(axes.flat, panels):
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect=aspect)
        ax.set_title(title, fontsize=10)
    err_ax = axes.flat[len(panels)]
    shown = err_ax.imshow(view(error), cmap="magma", vmin=0.0, vmax=ERROR_VMAX, interpolation="nearest", aspect=aspect)
    err_ax.set_title("|error| as scored (both 1-99 pct in brain)", fontsize=10)
    fig.colorbar(shown, ax=err_ax, shrink=0.8, extend="max", label="absolute error")
    for ax in axes.flat[len(panels) + 1 :]:
        ax.set_visible(False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes.flat[0].text(0.02, 0.5, "R", transform=axes.flat[0].transAxes, color="yellow", fontsize=9, va="center")
    axes.flat[0].text(0.98, 0.5, "L", transform=axes.flat[0].transAxes, color="yellow", fontsize=9, va="center", ha="right")
    fig.suptitle(
        f"{row['case']}: synthetic {modality}   PSNR {_fmt(row.get('psnr'), 2)} dB   "
        f"SSIM {_fmt(row.get('ssim2d'), 3)} (2D) / {_fmt(row.get('ssim3d'), 3)} (3D), brain only   "
        f"axial slice {z} ({'largest tumour area' if seg_lps is not None and np.any(seg_lps > 0) else 'middle of brain'})",
        fontsize=10,
    )
    return _save(fig, path)


# --- summary figure --------------------------------------------------------------------------


def summary_figure(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Per-case PSNR and SSIM (2D and 3D, brain only) as box plots with every case as a dot."""
    from matplotlib.figure import Figure

    modalities = [m for m in MODALITIES if any(r["modality"] == m for r in rows)]
    metrics = [("psnr", "PSNR (dB, brain)"), ("ssim2d", "SSIM 2D (brain)"), ("ssim3d", "SSIM 3D (brain)")]
    fig = Figure(figsize=(4 * len(metrics), 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics))
    rng = np.random.default_rng(0)  # fixed jitter: the same figure every run
    for ax, (key, label) in zip(axes, metrics):
        groups, excluded = [], 0
        for m in modalities:
            values = [r.get(key) for r in rows if r["modality"] == m and r.get(key) is not None]
            finite = [v for v in values if math.isfinite(v)]
            excluded += len(values) - len(finite)
            groups.append(finite)
        positions = list(range(1, len(groups) + 1))
        ax.boxplot([g if g else [np.nan] for g in groups], positions=positions, widths=0.5, showfliers=False)
        for pos, values in zip(positions, groups):
            ax.scatter(pos + rng.uniform(-0.12, 0.12, len(values)), values, s=14, alpha=0.7, zorder=3)
        ax.set_xticks(positions, [f"{m}\n(n={len(g)})" for m, g in zip(modalities, groups)])
        ax.set_title(label + (f"\n{excluded} infinite value(s) not drawn" if excluded else ""), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"per-case metrics of {len(rows)} synthesized volume(s)", fontsize=11)
    return _save(fig, path)


# --- uncertainty -----------------------------------------------------------------------------


def plot_uncertainty(
    std: np.ndarray,
    error: np.ndarray,
    path: str | Path,
    affine: np.ndarray | None = None,
    z: int | None = None,
    title: str | None = None,
    mask: np.ndarray | None = None,
) -> Path:
    """A posterior std map beside the absolute error at the same axial slice, each with its colour bar.

    ``affine`` (the volumes' NIfTI affine) orients the slice radiologically; without it the volumes
    are taken to be LPS (BraTS). ``z`` defaults to the middle brain slice of ``mask`` (or of std > 0).
    """
    from matplotlib.figure import Figure

    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else np.asarray(affine)
    std_lps, err_lps = to_lps(std, affine), to_lps(error, affine)
    mask_lps = to_lps(mask, affine) if mask is not None else std_lps > 0
    if z is None:
        z = display_slice(mask_lps, None)
    sx, sy, _ = lps_spacing(affine)
    fig = Figure(figsize=(9, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, volume, label, cmap in ((axes[0], std_lps, "posterior std", "viridis"), (axes[1], err_lps, "absolute error", "magma")):
        image = radiological(volume[:, :, z])
        vmax = float(np.percentile(volume[mask_lps], 99.5)) if mask_lps.any() else float(volume.max())
        shown = ax.imshow(image, cmap=cmap, vmin=0.0, vmax=max(vmax, 1e-6), interpolation="nearest", aspect=sy / sx)
        fig.colorbar(shown, ax=ax, shrink=0.8, label=label)
        ax.set_title(f"{label} (axial slice {z})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
