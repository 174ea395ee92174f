"""Image-similarity metrics for a synthesized MRI volume against its real reference.

Two families are reported, and they are deliberately kept apart because they answer
different questions and are not comparable with each other:

* **Brain metrics** (:func:`brain_metrics`): both volumes are scaled with
  :func:`normalise_percentile` (1st/99th percentile over the reference brain mask) and every
  figure is computed over brain voxels only, so the black background cannot inflate them.
* **BraSyn protocol** (:func:`brasyn_metrics`): the normalisation and SSIM used by the BraSyn
  (BraTS 2023-2025 synthesis) challenge, so that figures can be set beside the leaderboard,
  plus a whole-volume PSNR of the kind quoted in papers (background included).

All functions take numpy volumes shaped X x Y x Z (axial = last axis) and return plain Python
floats (or ``None``) in dicts, so the result can be written as JSON directly. A perfect
prediction has PSNR ``float('inf')``: we do not cap it, because any cap would be an arbitrary
number that users might quote; the JSON writers upstream handle infinity.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from mrisynth.errors import DataError

# Classic SSIM constants of Wang et al. (2004): Gaussian window sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# scipy's Gaussian radius is int(truncate * sigma + 0.5) = int(5.75) = 5, i.e. an 11-tap window.
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)

BRASYN_LOW_PERCENTILE = 0.5
BRASYN_HIGH_PERCENTILE = 99.5
NO_SEG_NOTE = "no reference segmentation: BraSyn SSIM skipped"
EMPTY_TUMOUR_NOTE = "reference segmentation has no tumour voxels: BraSyn tumour SSIM undefined"


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

def _check_pair(reference: np.ndarray, prediction: np.ndarray) -> None:
    """Refuse volumes that cannot be compared voxel by voxel (a user error, not a crash)."""
    if reference.ndim != 3 or prediction.ndim != 3:
        raise DataError(
            f"metrics need 3D volumes, got reference {reference.shape} "
            f"and prediction {prediction.shape}"
        )
    if reference.shape != prediction.shape:
        raise DataError(
            f"reference {reference.shape} and prediction {prediction.shape} have different shapes"
        )


def _check_mask(mask: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Return ``mask`` as a bool array after checking its shape."""
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise DataError(f"{name} {mask.shape} does not match the volumes {shape}")
    return mask.astype(bool, copy=False)


# --------------------------------------------------------------------------------------------
# Brain metrics (our own, inside the reference brain mask)
# --------------------------------------------------------------------------------------------

def normalise_percentile(
    volume: np.ndarray, mask: np.ndarray, low: float = 1.0, high: float = 99.0
) -> np.ndarray:
    """Scale ``volume`` to [0, 1] using its own percentiles over the brain mask.

    Exactly: ``lo, hi = np.percentile(volume[mask], [low, high])`` (numpy's default linear
    interpolation); inside the mask the result is ``(clip(volume, lo, hi) - lo) / (hi - lo)``;
    outside the mask it is 0. The result is float32.

    Why: MRI intensities have no absolute unit, so each volume is put on its own [0, 1] scale
    before comparison, and the percentiles (not min/max) keep a few hot voxels from squashing
    the rest. Percentiles are taken over brain voxels only, so the amount of background in the
    field of view does not change the scale. If ``hi == lo`` (a flat volume) the brain is
    returned as zeros rather than dividing by zero.
    """
    volume = np.asarray(volume)
    mask = _check_mask(mask, volume.shape, "mask")
    out = np.zeros(volume.shape, dtype=np.float32)
    if not mask.any():
        return out
    values = volume[mask].astype(np.float64)
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        return out
    out[mask] = ((np.clip(values, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    return out


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of the True voxels of ``mask``, grown by ``margin`` voxels per side.

    The box is clipped to the volume. ``mask`` must contain at least one True voxel.
    """
    boxes = []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other_axes))
        start = max(int(present[0]) - margin, 0)
        stop = min(int(present[-1]) + 1 + margin, mask.shape[axis])
        boxes.append(slice(start, stop))
    return tuple(boxes)


def ssim_map(
    x: np.ndarray,
    y: np.ndarray,
    sigma: float | tuple[float, ...] = SSIM_SIGMA,
    data_range: float = 1.0,
) -> np.ndarray:
    """Voxel-wise SSIM map of Wang et al. (2004) with a Gaussian window, as float32.

    For each voxel, with Gaussian-weighted local means ``mu``, variances and covariance
    (population form, i.e. no N/(N-1) correction)::

        SSIM = (2 mu_x mu_y + C1)(2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2))

    with ``C1 = (0.01 * data_range)^2`` and ``C2 = (0.03 * data_range)^2``. The Gaussian is
    scipy's ``gaussian_filter`` with ``truncate=3.5`` (radius 5, 11 taps for sigma 1.5) and
    ``mode='reflect'`` at the volume border, which is what scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``
    does. ``sigma`` may be a tuple per axis: ``(1.5, 1.5, 0)`` filters within each axial slice
    only (a stack of 2D SSIM maps); a scalar filters in 3D.

    Memory: float32 throughout (about seven volume-sized arrays at peak).
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2

    def smooth(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=sigma, mode="reflect", truncate=SSIM_TRUNCATE)

    mu_x = smooth(x)
    mu_y = smooth(y)
    var_x = smooth(x * x)
    var_x -= mu_x * mu_x
    var_y = smooth(y * y)
    var_y -= mu_y * mu_y
    cov_xy = smooth(x * y)
    cov_xy -= mu_x * mu_y

    # Numerator and denominator are built in place to keep the peak memory low.
    mu_xy = mu_x * mu_y
    mu_x *= mu_x
    mu_y *= mu_y
    luminance_den = mu_x
    luminance_den += mu_y
    luminance_den += c1
    del mu_y
    structure_den = var_x
    structure_den += var_y
    structure_den += c2
    del var_y
    numerator = mu_xy
    numerator *= 2.0
    numerator += c1
    cov_xy *= 2.0
    cov_xy += c2
    numerator *= cov_xy
    del cov_xy
    luminance_den *= structure_den
    numerator /= luminance_den
    return numerator


def _ssim_2d_and_3d(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Brain-restricted 2D (per axial slice) and 3D SSIM of two [0, 1] volumes.

    ``ssim2d``: for each axial slice containing at least one brain voxel, the mean of the 2D
    SSIM map over that slice's brain voxels; then the plain mean over those slices.
    ``ssim3d``: the mean of the 3D SSIM map over all brain voxels.
    """
    # A Gaussian-filtered value depends only on voxels within the filter radius, so maps
    # computed on the brain's bounding box grown by that radius are identical, at every brain
    # voxel, to maps of the whole volume, for a fraction of the time and memory.
    box = _bounding_box(mask, margin=SSIM_RADIUS)
    x, y, mask = x[box], y[box], mask[box]

    map2d = ssim_map(x, y, sigma=(SSIM_SIGMA, SSIM_SIGMA, 0.0))
    # per axial slice: sum and count of the brain voxels' SSIM values, in one pass
    slice_sums = np.where(mask, map2d, 0.0).sum(axis=(0, 1), dtype=np.float64)
    slice_counts = mask.sum(axis=(0, 1))
    del map2d
    brain = slice_counts > 0
    ssim2d = float(np.mean(slice_sums[brain] / slice_counts[brain]))

    map3d = ssim_map(x, y, sigma=SSIM_SIGMA)
    ssim3d = float(map3d[mask].mean(dtype=np.float64))
    return ssim2d, ssim3d


def _psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    """PSNR in dB, ``10 log10(data_range^2 / MSE)``; ``inf`` when the MSE is exactly 0."""
    if mse == 0.0:
        return math.inf
    return float(10.0 * math.log10(data_range**2 / mse))


def brain_metrics(
    reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray
) -> dict[str, float]:
    """PSNR, MAE, 2D and 3D SSIM inside the reference brain mask.

    Both volumes are first scaled with :func:`normalise_percentile` using the reference's
    brain mask (each volume with its own 1st/99th percentiles over those voxels). Then, with
    ``r`` and ``p`` the normalised volumes and ``B`` the brain voxels:

    * ``psnr``: ``10 log10(1 / mean_B((p - r)^2))`` in dB (data range 1); ``inf`` if identical.
    * ``mae``: ``mean_B(|p - r|)``.
    * ``ssim2d``: mean over axial slices containing brain of the mean 2D SSIM-map value over
      that slice's brain voxels (Gaussian window sigma 1.5, 11 taps, K1 0.01, K2 0.03,
      data range 1; see :func:`ssim_map`).
    * ``ssim3d``: mean of the 3D SSIM map (same settings, 11x11x11 window) over brain voxels.

    Why brain-only: the background is zero in both normalised volumes, so including it would
    reward every model for the empty space around the head.
    """
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    _check_pair(reference, prediction)
    mask = _check_mask(mask, reference.shape, "brain mask")
    if not mask.any():
        raise DataError("the reference brain mask is empty: brain metrics are undefined")

    ref_n = normalise_percentile(reference, mask)
    pred_n = normalise_percentile(prediction, mask)
    errors = brain_errors(ref_n, pred_n, mask)
    ssim2d, ssim3d = _ssim_2d_and_3d(ref_n, pred_n, mask)
    return {"psnr": errors["psnr"], "mae": errors["mae"], "ssim2d": ssim2d, "ssim3d": ssim3d}


def brain_errors(ref_n: np.ndarray, pred_n: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """PSNR, MAE and mean signed error (``bias``, > 0: prediction brighter) over ``mask`` of two
    volumes already scaled by :func:`normalise_percentile` (the voxel-wise part of
    :func:`brain_metrics`, without its SSIMs)."""
    diff = pred_n[mask].astype(np.float64) - ref_n[mask].astype(np.float64)
    return {"psnr": _psnr_from_mse(float(np.mean(diff * diff))), "mae": float(np.mean(np.abs(diff))),
            "bias": float(np.mean(diff))}


# --------------------------------------------------------------------------------------------
# BraSyn challenge protocol
# --------------------------------------------------------------------------------------------
#
# What we found about the official evaluation (checked with public code, not copied):
# * hongweilibran/BraSyn, file ssim.py (the organisers' published BraSyn SSIM script):
#   each volume is clipped to its OWN 0.5th/99.5th percentiles over the whole volume, with the
#   lower bound raised to 0 if negative, and scaled to [0, 1]; the segmentation is binarised
#   (seg > 0); tumour volumes are ``volume * mask`` and non-tumour volumes
#   ``volume * (1 - mask)``; SSIM is torchmetrics' ``StructuralSimilarityIndexMeasure`` on
#   5D tensors [1, 1, X, Y, Z] with default kernel/sigma/data_range. That script asks for
#   ``return_full_image=True`` and then indexes the result with the int64 0/1 mask,
#   apparently meaning to average the SSIM map over tumour (resp. non-tumour) voxels only.
#   As published it does not run: with torchmetrics 1.9 (tried here) the metric returns a
#   tuple and the indexing raises TypeError (and an int64 0/1 tensor would be an integer
#   index, not a boolean selection, anyway).
# * A participant's evaluation derived from it (AImageLab-zip/BraSyn25, file
#   final_eval/get_ssim.py) uses ``StructuralSimilarityIndexMeasure()`` with defaults and
#   takes the plain scalar, i.e. the elementwise mean of the SSIM map over the WHOLE masked
#   volume (the zeroed voxels included); it skips cases whose tumour SSIM is NaN.
# * Sage-Bionetworks-Challenges/brats2023 (the BraTS 2023 scoring repository) holds scoring
#   for segmentation and inpainting; we found no synthesis scorer there.
# We follow the scalar, default-argument form (what the brief specifies and what runs) for
# ssim_tumour / ssim_nontumour, and also report the tumour figure in the intended form, the SSIM
# map averaged over the tumour's voxels (ssim_tumour_region): the scalar form of a small tumour
# is close to 1 for any synthesis. The docstring of brasyn_metrics states both, so users know
# which variant they are quoting.


def brasyn_normalise(volume: np.ndarray) -> np.ndarray:
    """BraSyn scaling: clip to the volume's own 0.5th/99.5th percentiles, scale to [0, 1].

    Exactly: ``lo, hi = np.percentile(volume, [0.5, 99.5])`` over ALL voxels (background
    included); ``lo = max(lo, 0)``; result ``(clip(volume, lo, hi) - lo) / (hi - lo)`` as
    float32. Each volume (reference and prediction) is scaled separately, as in the official
    script. If ``hi <= lo`` (flat volume) zeros are returned; the official script would divide
    by zero there.
    """
    volume = np.asarray(volume, dtype=np.float64)
    lo, hi = np.percentile(volume, [BRASYN_LOW_PERCENTILE, BRASYN_HIGH_PERCENTILE])
    lo = max(float(lo), 0.0)
    if hi <= lo:
        return np.zeros(volume.shape, dtype=np.float32)
    return ((np.clip(volume, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def _torchmetrics_ssim_3d(
    reference: np.ndarray, prediction: np.ndarray, region: np.ndarray | None = None
) -> tuple[float | None, float | None]:
    """torchmetrics ``StructuralSimilarityIndexMeasure()`` with default arguments, on 3D data:
    the volume-wide mean of its SSIM map, and (with ``region``) the map's mean over ``region``'s
    voxels only, both from one map (``None`` where undefined).

    Defaults: Gaussian kernel 11 taps, sigma 1.5, K1 0.01, K2 0.03, ``data_range=None`` (so
    inferred as ``max(range(prediction), range(reference))``), reflection padding at the
    border, reduction = elementwise mean of the SSIM map over ALL voxels of the volume.
    Tensors are float32 shaped [1, 1, X, Y, Z]. Returns ``None`` if the result is NaN (two
    constant volumes give 0/0).

    Speed-up, exact by construction: the masked BraSyn volumes are mostly zeros, and the SSIM
    map is exactly 1 wherever both 11x11x11 windows hold only zeros, because it then reads
    ``(C1 * C2) / (C1 * C2)``. So torchmetrics is run on the bounding box of the non-zero
    voxels of either volume grown by 11 voxels (two window radii plus one: every voxel of
    that margin, and every voxel it reflects at the box edge, sees only zeros), and the voxels
    outside the box are counted as 1 in the volume-wide mean. The box holds the same minimum
    and maximum as the whole volume (it holds zeros whenever it is smaller than the volume),
    so the inferred data range is unchanged. ``tests/test_metrics.py`` checks this against a
    plain torchmetrics call on the whole volume.
    """
    import torch
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    support = (reference != 0) | (prediction != 0)
    if not support.any():
        return None, None  # two all-zero volumes: torchmetrics gives NaN (data range 0)
    box = _bounding_box(support, margin=2 * SSIM_RADIUS + 1)
    ref_box = np.ascontiguousarray(reference[box], dtype=np.float32)
    pred_box = np.ascontiguousarray(prediction[box], dtype=np.float32)

    metric = StructuralSimilarityIndexMeasure(return_full_image=True)
    with torch.no_grad():
        preds = torch.from_numpy(pred_box)[None, None]  # [1, 1, X, Y, Z], as in the challenge
        target = torch.from_numpy(ref_box)[None, None]
        value, ssim_map = metric(preds, target)
        value = float(value)
    if math.isnan(value):
        return None, None
    n_box = ref_box.size
    n_total = reference.size
    whole = (value * n_box + (n_total - n_box) * 1.0) / n_total
    if region is None or not region.any():
        return whole, None
    inside = region[box]
    n_region = int(region.sum())
    region_sum = float(ssim_map[0, 0][torch.from_numpy(inside)].double().sum())
    return whole, (region_sum + (n_region - int(inside.sum())) * 1.0) / n_region


def brasyn_metrics(
    reference: np.ndarray, prediction: np.ndarray, seg: np.ndarray | None = None
) -> dict[str, Any]:
    """BraSyn-challenge SSIMs and a whole-volume PSNR.

    Both volumes are scaled with :func:`brasyn_normalise` (each with its own percentiles).
    With ``T = seg > 0`` (the reference tumour segmentation):

    * ``ssim_tumour``: torchmetrics default 3D SSIM (see :func:`_torchmetrics_ssim_3d`)
      between ``prediction * T`` and ``reference * T``. As in the challenge code that runs
      (see the notes above this function), this is the mean SSIM over the whole volume, in
      which the zeroed voxels outside the tumour count too: they score exactly 1, so for a
      small tumour the figure stays close to 1 even for a poor prediction. Compare it only
      with other BraSyn-protocol figures.
    * ``ssim_tumour_region``: the same SSIM map averaged over the tumour's voxels only, which is
      what the organisers' script evidently meant (it indexes the full SSIM map with the mask;
      see the notes above). Unlike ``ssim_tumour`` it is not pinned near 1 by the zeroed
      background, so it tells syntheses of the lesion apart.
    * ``ssim_nontumour``: the same on ``prediction * (1 - T)`` and ``reference * (1 - T)`` (its
      region form would differ only by leaving out the tumour's zeroed voxels, so it is not
      reported separately).
    * ``psnr_full``: ``10 log10(1 / MSE)`` with the MSE over ALL voxels, background included,
      data range 1 (``inf`` if identical). This is the literature-style figure; the black
      background inflates it, so do not compare it with the brain-only ``psnr``.

    If ``seg`` is None the SSIMs are ``None`` and ``note`` says why. If ``seg`` has no tumour
    voxel, both tumour SSIMs are ``None`` (torchmetrics would give NaN) and ``note`` says so.
    """
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    _check_pair(reference, prediction)
    ref_n = brasyn_normalise(reference)
    pred_n = brasyn_normalise(prediction)

    diff = pred_n.astype(np.float64) - ref_n.astype(np.float64)
    result: dict[str, Any] = {"psnr_full": _psnr_from_mse(float(np.mean(diff * diff)))}
    del diff

    if seg is None:
        result.update(ssim_tumour=None, ssim_tumour_region=None, ssim_nontumour=None, note=NO_SEG_NOTE)
        return result

    tumour = _check_mask(np.asarray(seg) > 0, reference.shape, "segmentation")
    if tumour.any():
        result["ssim_tumour"], result["ssim_tumour_region"] = _torchmetrics_ssim_3d(
            ref_n * tumour, pred_n * tumour, tumour
        )
    else:
        result.update(ssim_tumour=None, ssim_tumour_region=None, note=EMPTY_TUMOUR_NOTE)
    healthy = ~tumour
    result["ssim_nontumour"], _ = _torchmetrics_ssim_3d(ref_n * healthy, pred_n * healthy)
    return result


# --------------------------------------------------------------------------------------------
# Combining and summarising
# --------------------------------------------------------------------------------------------

def evaluate_volumes(
    reference: np.ndarray,
    prediction: np.ndarray,
    mask: np.ndarray,
    seg: np.ndarray | None = None,
) -> dict[str, Any]:
    """All metrics for one case, as one flat dict: :func:`brain_metrics` + :func:`brasyn_metrics`.

    Keys: ``psnr``, ``mae``, ``ssim2d``, ``ssim3d`` (brain-only) and ``ssim_tumour``,
    ``ssim_tumour_region``, ``ssim_nontumour``, ``psnr_full`` (BraSyn protocol), plus ``note`` when a BraSyn figure
    could not be computed.
    """
    result: dict[str, Any] = {}
    result.update(brain_metrics(reference, prediction, mask))
    result.update(brasyn_metrics(reference, prediction, seg))
    return result


def _is_number(value: Any) -> bool:
    """True for int/float (numpy scalars included) but not bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean, standard deviation and count of every numeric key over cases.

    For each key that holds a number in at least one row (or only ``None``), ``None`` values
    are ignored and the rest give ``{"mean": m, "sd": s, "n": n}`` where ``sd`` is the sample
    standard deviation (ddof=1) when ``n > 1`` and 0.0 when ``n == 1``. A key with no numeric
    value (only ``None``) gets ``{"mean": None, "sd": None, "n": 0}``. If some value is
    infinite (a perfect PSNR) and ``n > 1``, the mean is infinite and ``sd`` is ``None``
    (undefined).
    Non-numeric keys (such as ``note``) are skipped.
    """
    values: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if value is None:
                values.setdefault(key, [])
            elif _is_number(value):
                values.setdefault(key, []).append(float(value))
    # A key that was only ever None but is also a string somewhere is not numeric: drop it.
    text_keys = {key for row in rows for key, value in row.items() if isinstance(value, str)}

    summary: dict[str, dict[str, Any]] = {}
    for key, numbers in values.items():
        if key in text_keys and not numbers:
            continue
        n = len(numbers)
        if n == 0:
            summary[key] = {"mean": None, "sd": None, "n": 0}
            continue
        array = np.asarray(numbers, dtype=np.float64)
        mean = float(np.mean(array))
        sd: float | None
        if n == 1:
            sd = 0.0
        elif not np.all(np.isfinite(array)):
            sd = None
        else:
            sd = float(np.std(array, ddof=1))
        summary[key] = {"mean": mean, "sd": sd, "n": n}
    return summary
