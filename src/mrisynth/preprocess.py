"""The seed's preprocessing (brain mask, 1st-99th percentile scaling, axial slices, 160x160 window)
and its exact inverse; optionally a median-based scaling (``PreprocessConfig.median_level``).

Volumes are first reoriented to LPS (BraTS's orientation) by axis permutation and flips only, so a
case stored in RAS, or with its axes in another order, gives the network the same axial slices;
the in-plane window is centred on the brain's bounding box and grows (in steps of 16) for brains
wider than 160 voxels, so no brain voxel is ever cut off. :class:`Layout` records exactly what was
done and maps network slices back into the input grid.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import nibabel as nib
import numpy as np

from .modalities import MODALITIES

CANONICAL_AXCODES = ("L", "P", "S")
CANONICAL_ORNT = nib.orientations.axcodes2ornt(CANONICAL_AXCODES)


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings saved in every checkpoint, so prediction preprocesses exactly as training did."""

    low_percentile: float = 1.0
    high_percentile: float = 99.0
    min_window: int = 160
    multiple: int = 16
    # 0: the seed's scaling (high percentile -> 1). L > 0: the brain's median -> L (low percentile
    # -> 0, clipped at 1), so a voxel's value is its contrast to the brain's typical tissue, which a
    # slice shows, instead of to the volume's brightest 1 %, which it may not
    median_level: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def problems(self) -> list[str]:
        """Settings that cannot work, as ``"key: expected ..., found ..."`` (empty when all is well).

        A zero multiple divides by zero; a window that is not a multiple of 16 trains (the crop is)
        but fails in the network at prediction; low >= high percentiles give all-zero inputs.
        """
        values = self.to_dict()
        bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            return [f"{k}: expected a number, found {v!r}" for k, v in bad.items()]
        rules = [
            ("low_percentile", 0 <= self.low_percentile < self.high_percentile, "0 or more and below high_percentile"),
            ("high_percentile", self.high_percentile <= 100, "at most 100"),
            ("min_window", self.min_window >= 16, "at least 16"),
            ("multiple", self.multiple >= 16 and self.multiple % 16 == 0, "a positive multiple of 16"),
            ("median_level", 0 <= self.median_level < 1, "0 (off) or a level in (0, 1)"),
        ]
        return [f"{key}: expected {expected}, found {values[key]!r}" for key, ok, expected in rules if not ok]

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def background_value(volume: np.ndarray) -> float:
    """The value that fills the volume's outer faces (0 for BraTS; e.g. -3.6 for z-scored data)."""
    faces = np.concatenate(
        [volume[[0, -1], :, :].ravel(), volume[:, [0, -1], :].ravel(), volume[:, :, [0, -1]].ravel()]
    )
    values, counts = np.unique(faces, return_counts=True)
    return float(values[np.argmax(counts)])


def brain_mask(volumes: list[np.ndarray]) -> np.ndarray:
    """Brain = every voxel that differs from its volume's background value, in any modality."""
    mask = np.zeros(volumes[0].shape, dtype=bool)
    for volume in volumes:
        mask |= volume != background_value(volume)
    return mask


def normalise(
    volume: np.ndarray, mask: np.ndarray, low: float = 1.0, high: float = 99.0, median_level: float = 0.0
) -> tuple[np.ndarray, tuple[float, float]]:
    """Clip to the low/high percentiles of the brain voxels, scale to [0,1], 0 outside the brain.

    With ``median_level`` L > 0 the scale is set by the median instead: the low percentile -> 0,
    the brain's median -> L, values clipped to [0, 1] (so 1 is the low percentile plus
    (median - low percentile) / L). Returned: the (value at 0, value at 1) pair.
    """
    brain = volume[mask]
    if brain.size == 0:
        return np.zeros(volume.shape, dtype=np.float32), (0.0, 0.0)
    if median_level > 0:  # one partial sort for both percentiles
        lo, median = (float(v) for v in np.percentile(brain, [low, 50.0]))
        hi = lo + (median - lo) / median_level
    else:
        lo, hi = (float(v) for v in np.percentile(brain, [low, high]))
    out = np.zeros(volume.shape, dtype=np.float32)
    # lo and hi rounded to float32 once, and the result clipped: every value lies in [0, 1], with
    # exactly 0 at or below the low percentile and exactly 1 at or above the high one
    lo32, hi32 = np.float32(lo), np.float32(hi)
    if hi32 > lo32:
        out[mask] = np.clip((brain - lo32) / (hi32 - lo32), 0.0, 1.0)
    return out, (lo, hi)


def normalise_with(volume: np.ndarray, mask: np.ndarray, config: PreprocessConfig) -> tuple[np.ndarray, tuple[float, float]]:
    """:func:`normalise` with a checkpoint's settings: a volume scaled exactly as the model's inputs
    and training targets were."""
    return normalise(volume, mask, config.low_percentile, config.high_percentile, config.median_level)


#: In the network's slices [..., H, W] (``Layout.to_slices``), H runs along LPS x: left-right.
LEFT_RIGHT_AXIS = -2


@dataclass
class Layout:
    """How an input volume becomes [slices, H, W] network input, and how to go back exactly."""

    shape: tuple[int, int, int]  # input grid
    input_ornt: list[list[float]]  # the input's orientation (nibabel ornt), from its affine
    canonical_shape: tuple[int, int, int]
    origin: tuple[int, int]  # window corner in LPS in-plane voxels (may be negative: padding)
    size: tuple[int, int]  # window size, multiples of 16

    def _overlap(self) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """(image region, window region) where the window and the LPS image overlap."""
        img, win = [], []
        for start, size, dim in zip(self.origin, self.size, self.canonical_shape[:2]):
            a, b = max(start, 0), min(start + size, dim)
            img.append(slice(a, b))
            win.append(slice(a - start, b - start))
        return (img[0], img[1]), (win[0], win[1])

    def to_slices(self, volume: np.ndarray) -> np.ndarray:
        """Input-grid volume -> [Z, H, W] axial slices of the window (zeros where it pads)."""
        if tuple(volume.shape) != tuple(self.shape):
            raise ValueError(f"volume of shape {tuple(volume.shape)} does not match the layout's grid {tuple(self.shape)}")
        to_lps = nib.orientations.ornt_transform(np.asarray(self.input_ornt), CANONICAL_ORNT)
        canonical = nib.orientations.apply_orientation(volume, to_lps)
        (ix, iy), (wx, wy) = self._overlap()
        out = np.zeros((self.size[0], self.size[1], canonical.shape[2]), dtype=volume.dtype)
        out[wx, wy] = canonical[ix, iy]
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def to_volume(self, slices: np.ndarray) -> np.ndarray:
        """[Z, H, W] slices -> a volume in the input grid (0 outside the window)."""
        expected = (self.canonical_shape[2], self.size[0], self.size[1])
        if tuple(slices.shape) != expected:
            raise ValueError(f"slices of shape {tuple(slices.shape)} do not match the layout's {expected}")
        (ix, iy), (wx, wy) = self._overlap()
        canonical = np.zeros(self.canonical_shape, dtype=slices.dtype)
        canonical[ix, iy] = slices.transpose(1, 2, 0)[wx, wy]
        back = nib.orientations.ornt_transform(CANONICAL_ORNT, np.asarray(self.input_ornt))
        return np.ascontiguousarray(nib.orientations.apply_orientation(canonical, back))

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Layout":
        return cls(
            shape=tuple(data["shape"]),
            input_ornt=[list(map(float, row)) for row in data["input_ornt"]],
            canonical_shape=tuple(data["canonical_shape"]),
            origin=tuple(data["origin"]),
            size=tuple(data["size"]),
        )



def make_layout(mask: np.ndarray, affine: np.ndarray, config: PreprocessConfig) -> Layout:
    """Reorientation to LPS plus an in-plane window covering the whole brain (multiple of 16)."""
    input_ornt = nib.orientations.io_orientation(affine)
    to_canonical = nib.orientations.ornt_transform(input_ornt, CANONICAL_ORNT)
    canonical_mask = nib.orientations.apply_orientation(mask, to_canonical)
    origin, size = [], []
    for axis in (0, 1):
        other = tuple(a for a in (0, 1, 2) if a != axis)
        present = np.flatnonzero(canonical_mask.any(axis=other))
        lo, hi = (int(present[0]), int(present[-1]) + 1) if present.size else (0, canonical_mask.shape[axis])
        extent = max(hi - lo, config.min_window)
        window = -(-extent // config.multiple) * config.multiple
        origin.append((lo + hi) // 2 - window // 2)
        size.append(window)
    return Layout(
        shape=tuple(int(s) for s in mask.shape),
        input_ornt=input_ornt.tolist(),
        canonical_shape=tuple(int(s) for s in canonical_mask.shape),
        origin=(origin[0], origin[1]),
        size=(size[0], size[1]),
    )


@dataclass
class PreparedCase:
    """Normalised axial slices of all four modalities (zeros for an unavailable one) and their layout."""

    slices: np.ndarray  # [4, Z, H, W] float32 in [0, 1], channel order = MODALITIES
    mask: np.ndarray  # [Z, H, W] bool
    available: tuple[str, ...]
    layout: Layout
    percentiles: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def brain_slices(self) -> np.ndarray:
        """Indices of axial slices that contain brain (the only ones the network sees)."""
        return np.flatnonzero(self.mask.any(axis=(1, 2)))


def prepare(
    volumes: dict[str, np.ndarray],
    affine: np.ndarray,
    config: PreprocessConfig = PreprocessConfig(),
    mask: np.ndarray | None = None,
) -> PreparedCase:
    """Mask, normalise and slice the available modalities of one case (the seed's preprocessing)."""
    available = tuple(m for m in MODALITIES if m in volumes)
    if not available:
        raise ValueError(f"expected at least one of {', '.join(MODALITIES)}, found {', '.join(volumes) or 'none'}")
    if mask is None:
        mask = brain_mask([volumes[m] for m in available])
    else:
        # an integer/label mask must select voxels, not index them
        mask = np.asarray(mask) != 0
    for m in available:
        if volumes[m].shape != mask.shape:
            raise ValueError(f"{m} volume of shape {volumes[m].shape} does not match the mask's {mask.shape}")
    layout = make_layout(mask, affine, config)
    slice_mask = layout.to_slices(mask)
    z, h, w = slice_mask.shape
    slices = np.zeros((len(MODALITIES), z, h, w), dtype=np.float32)
    percentiles = {}
    for m in available:
        normalised, percentiles[m] = normalise_with(volumes[m], mask, config)
        slices[MODALITIES.index(m)] = layout.to_slices(normalised)
    return PreparedCase(slices=slices, mask=slice_mask, available=available, layout=layout, percentiles=percentiles)
