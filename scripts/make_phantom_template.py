"""One-off conversion of the ICBM 2009a template into the phantom's compact tissue file.

Why this script exists: the digital phantom needs real brain anatomy, but mrisynth must not
download anything nor depend on nilearn. nilearn ships the ICBM 2009a nonlinear symmetric
grey-matter, white-matter and skull-stripped T1 templates inside its wheel, so this script is run
once, by a developer, in a throwaway environment that has nilearn, and its output
(``src/mrisynth/phantom/data/icbm152_2009a.npz.xz``, 1.9 MB) is committed next to the NOTICE.

Usage (in a throwaway venv, never a dependency of mrisynth)::

    python -m venv /tmp/nlvenv && /tmp/nlvenv/bin/pip install nilearn
    /tmp/nlvenv/bin/python scripts/make_phantom_template.py

What it writes: uint8 probabilities (0-255) ``gm``, ``wm``, ``csf`` cropped to the brain bounding
box (plus a 2-voxel margin), and ``affine`` (voxel -> MNI RAS mm of the cropped grid).
The template is exactly left-right symmetric (checked below), so only the right hemisphere
including the midline plane is stored (``x >= midline``): this halves the file (4.4 -> 2.3 MB);
the phantom mirrors it back at load time (``full = concat(half[:0:-1], half)`` along axis 0).
CSF is what the brain mask holds besides GM and WM: ``csf = mask - gm - wm`` (clipped at 0),
where the mask is the non-zero part of nilearn's skull-stripped T1 template, or GM+WM >= 0.5
(a few voxels where the tissue maps reach past the T1 mask).
"""
from __future__ import annotations

import argparse
import io
import lzma
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "src" / "mrisynth" / "phantom" / "data" / "icbm152_2009a.npz.xz"
STEM = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
MARGIN = 2


def nilearn_data_dir() -> Path:
    """Folder of the templates inside the installed nilearn package (found, never downloaded)."""
    import nilearn  # only in the throwaway venv

    return Path(nilearn.__file__).parent / "datasets" / "data"


def load(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One template as float32 in [0, 1] and its affine; all three must share one grid."""
    img = nib.load(folder / STEM.format(name))
    data = np.asarray(img.dataobj, dtype=np.float32) / 255.0
    return data, img.affine


def tissue_maps(folder: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """GM, WM and CSF fractions on the template grid, and the grid's affine."""
    gm, affine = load(folder, "gm")
    wm, affine_wm = load(folder, "wm")
    t1, affine_t1 = load(folder, "t1")
    if not (np.allclose(affine, affine_wm) and np.allclose(affine, affine_t1)):
        raise SystemExit("templates are not on one grid")
    mask = (t1 > 0) | (gm + wm >= 0.5)
    gm = gm * mask
    wm = wm * mask
    csf = np.clip(mask.astype(np.float32) - gm - wm, 0.0, 1.0)
    return {"gm": gm, "wm": wm, "csf": csf}, affine


def crop(maps: dict[str, np.ndarray], affine: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Crop to the brain's bounding box (+margin) and shift the affine so world mm are unchanged."""
    brain = sum(maps.values()) > 0
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(0) - MARGIN, 0)
    hi = np.minimum(idx.max(0) + 1 + MARGIN, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return {k: v[box] for k, v in maps.items()}, shifted


def right_half(maps: dict[str, np.ndarray], affine: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """The x >= 0 half of each map (midline plane included), after checking exact symmetry."""
    mid = int(round(-affine[0, 3] / affine[0, 0]))
    for name, values in maps.items():
        if not np.array_equal(values, values[::-1]) or 2 * mid + 1 != values.shape[0]:
            raise SystemExit(f"{name} is not symmetric about voxel {mid}: store the full map")
    return {k: v[mid:] for k, v in maps.items()}, mid


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Probabilities 0..1 -> 0..255, rounding (the maps are uint8 in nilearn already)."""
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nilearn-data", type=Path, default=None, help="folder of the templates")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    folder = args.nilearn_data or nilearn_data_dir()
    maps, affine = tissue_maps(folder)
    shape = next(iter(maps.values())).shape
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    print(f"template grid {shape} voxels of {zooms} mm, axes {nib.aff2axcodes(affine)}")
    maps, affine = crop(maps, affine)
    maps = {k: to_uint8(v) for k, v in maps.items()}
    cropped_shape = maps["gm"].shape
    halves, mid = right_half(maps, affine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    arrays = io.BytesIO()
    np.savez(
        arrays,
        gm=halves["gm"],
        wm=halves["wm"],
        csf=halves["csf"],
        affine=affine.astype(np.float64),
        midline=np.int64(mid),
        source=np.array("ICBM 2009a nonlinear symmetric (nilearn *_converted.nii.gz)"),
    )
    # xz instead of the zip deflate of savez_compressed: 1.90 MB instead of 2.26 MB, same arrays
    args.out.write_bytes(lzma.compress(arrays.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size_mb:.2f} MB): cropped grid {cropped_shape}, stored half {halves['gm'].shape}")


if __name__ == "__main__":
    main()
