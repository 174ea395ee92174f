"""Figure of one phantom case: the four sequences and the labels at the tumour's axial slice.

Why: a person should be able to see at a glance that the phantom looks like brain MRI (it is in
docs/phantom.md). Display follows the radiological convention: for the LPS arrays, an axial
slice ``a[:, :, k].T`` shown with the origin at the top puts anterior up and the patient's right
on the image's left.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

PANELS: tuple[tuple[str, str], ...] = (("t1", "T1"), ("t1ce", "T1CE"), ("t2", "T2"), ("flair", "FLAIR"))
LABEL_COLOURS = {1: (0.2, 0.4, 1.0), 2: (0.2, 0.9, 0.2), 3: (1.0, 0.9, 0.1), 4: (1.0, 0.9, 0.1)}


def tumour_slice(seg: np.ndarray) -> int:
    """Axial slice with the most tumour-core voxels (labels 1, 3, 4; else any label; else middle)."""
    counts = np.isin(seg, (1, 3, 4)).sum(axis=(0, 1))
    if not counts.any():
        counts = (seg > 0).sum(axis=(0, 1))
    return int(np.argmax(counts)) if counts.any() else seg.shape[2] // 2


def label_overlay(seg_slice: np.ndarray) -> np.ndarray:
    """RGBA image of the labels (transparent background)."""
    rgba = np.zeros((*seg_slice.shape, 4), dtype=np.float32)
    for label, colour in LABEL_COLOURS.items():
        rgba[seg_slice == label] = (*colour, 0.6)
    return rgba


def save_case_figure(arrays: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Save a 1x5 panel figure (4 sequences + labels over FLAIR) as PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = tumour_slice(arrays["seg"])
    brain = np.any(arrays["flair"] > 0, axis=2)
    rows, cols = np.nonzero(brain.T)
    crop = (slice(max(rows.min() - 5, 0), rows.max() + 6), slice(max(cols.min() - 5, 0), cols.max() + 6))
    fig, axes = plt.subplots(1, 5, figsize=(17, 4.4), facecolor="black")
    for ax, (key, name) in zip(axes, PANELS):
        image = arrays[key][:, :, k].T[crop]
        ax.imshow(image, cmap="gray", vmin=0, vmax=np.percentile(arrays[key][arrays[key] > 0], 99.5))
        ax.set_title(name, color="white")
    axes[4].imshow(arrays["flair"][:, :, k].T[crop], cmap="gray")
    axes[4].imshow(label_overlay(arrays["seg"][:, :, k].T[crop]))
    axes[4].set_title("labels: core (blue), oedema (green), enhancing (yellow)", color="white", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{title}  axial slice {k}  (anterior up, patient's right on the left)", color="white")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, facecolor="black")
    plt.close(fig)
    return path
