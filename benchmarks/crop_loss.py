"""Brain voxels lost by the seed's plain 160x160 centre crop, versus mrisynth's window.

The seed cropped every axial slice to the central 160x160 voxels of the image. mrisynth centres a
window on the brain's bounding box and grows it (in steps of 16) when the brain is wider than
160 voxels, so it must lose nothing. For each case: brain voxels (non-zero in any of the four
modalities), voxels outside the plain centre crop, voxels outside our window, and the window size.

    .venv/bin/python benchmarks/crop_loss.py [--data ../shared/data/brats18]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from mrisynth.cases import discover_cases
from mrisynth.io import read_images
from mrisynth.preprocess import PreprocessConfig, brain_mask, make_layout

from _common import DEFAULT_DATA, command_line

CROP = 160


def plain_crop_loss(mask: np.ndarray, crop: int = CROP) -> int:
    """Brain voxels outside the central crop x crop square of every axial slice (as stored)."""
    x0 = (mask.shape[0] - crop) // 2
    y0 = (mask.shape[1] - crop) // 2
    kept = mask[max(x0, 0) : x0 + crop, max(y0, 0) : y0 + crop].sum()
    return int(mask.sum() - kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of BraTS cases")
    args = parser.parse_args(argv)
    cases = [c for c in discover_cases(args.data) if not c.missing]
    if not cases:
        print(f"no complete cases under {args.data}", file=sys.stderr)
        return 1
    config = PreprocessConfig()
    command = command_line("crop_loss.py", argv)
    print(f"Command: `{command}`  ")
    print(f"Data: {len(cases)} cases from {args.data}")
    print()
    print("| case | grid | brain voxels | brain extent (x × y) | lost by plain 160×160 crop | % | lost by our window | window |")
    print("|---|---|---:|---|---:|---:|---:|---|")
    n_losing, worst, ours_total = 0, 0.0, 0
    for case in cases:
        volumes, geometry = read_images(case.modalities)
        mask = brain_mask(list(volumes.values()))
        layout = make_layout(mask, geometry.affine, config)
        ours = int(mask.sum() - layout.to_slices(mask).sum())
        plain = plain_crop_loss(mask)
        total = int(mask.sum())
        xs = np.flatnonzero(mask.any(axis=(1, 2)))
        ys = np.flatnonzero(mask.any(axis=(0, 2)))
        extent = f"{xs[-1] - xs[0] + 1} × {ys[-1] - ys[0] + 1}"
        n_losing += plain > 0
        worst = max(worst, 100 * plain / total)
        ours_total += ours
        grid = "×".join(str(s) for s in geometry.shape)
        print(f"| {case.id} | {grid} | {total:,} | {extent} | {plain:,} | {100 * plain / total:.2f} | {ours} "
              f"| {layout.size[0]}×{layout.size[1]} |")
    print()
    print(f"Summary: {n_losing} of {len(cases)} cases lose brain voxels under a plain 160×160 centre crop "
          f"(worst {worst:.2f}% of the brain); our window loses {ours_total} voxels in all.")
    return 0 if ours_total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
