"""Tests for mrisynth.metrics: exact expectations, agreement with reference implementations.

All volumes are small (at most 64 x 64 x 40) and built here from a fixed RNG.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity
from torchmetrics.functional.image import structural_similarity_index_measure

from mrisynth import metrics
from mrisynth.errors import DataError

SHAPE = (48, 48, 24)


def _ellipsoid(shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    return distance < 1.0


def _phantom(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth positive 'head' on a zero background, its brain mask and a tumour label map."""
    rng = np.random.default_rng(seed)
    mask = _ellipsoid(shape, tuple(n / 2 for n in shape), (shape[0] * 0.4, shape[1] * 0.42, shape[2] * 0.4))
    texture = gaussian_filter(rng.normal(size=shape), sigma=1.5)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    reference = np.where(mask, 200.0 + 800.0 * texture, 0.0).astype(np.float32)
    seg = np.zeros(shape, dtype=np.uint8)
    tumour = _ellipsoid(shape, (shape[0] * 0.4, shape[1] * 0.55, shape[2] / 2), (6, 5, 4))
    seg[tumour] = 2
    seg[tumour & _ellipsoid(shape, (shape[0] * 0.4, shape[1] * 0.55, shape[2] / 2), (3, 3, 2))] = 1
    return reference, mask, seg


def _noisy(reference: np.ndarray, mask: np.ndarray, level: float, seed: int = 1) -> np.ndarray:
    """Reference plus Gaussian noise of ``level`` x 800 inside the head (background stays 0)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=reference.shape).astype(np.float32) * np.float32(800.0 * level)
    return np.where(mask, reference + noise, 0.0).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Perfect prediction
# ----------------------------------------------------------------------------------------

def test_identical_volumes_give_perfect_scores() -> None:
    reference, mask, seg = _phantom()
    result = metrics.evaluate_volumes(reference, reference.copy(), mask, seg)
    assert result["psnr"] == math.inf  # documented: no cap, float('inf')
    assert result["psnr_full"] == math.inf
    assert result["mae"] == 0.0
    for key in ("ssim2d", "ssim3d", "ssim_tumour", "ssim_nontumour"):
        assert result[key] == pytest.approx(1.0, abs=1e-6), key
    assert "note" not in result


# ----------------------------------------------------------------------------------------
# Exact PSNR / MAE
# ----------------------------------------------------------------------------------------

def test_psnr_and_mae_are_exact_for_a_known_error() -> None:
    """Two-level volumes normalise to exactly 0/1, so flipping 10 % of brain voxels gives
    MSE = MAE = 0.1, i.e. PSNR = 10 dB exactly, whatever affine scale each volume has."""
    rng = np.random.default_rng(3)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[4:44, 4:44, 2:22] = True  # 40 * 40 * 20 = 32000 voxels, divisible by 10
    n = int(mask.sum())
    levels = (rng.random(n) < 0.5).astype(np.float64)
    flipped = levels.copy()
    chosen = rng.choice(n, size=n // 10, replace=False)
    flipped[chosen] = 1.0 - flipped[chosen]

    reference = np.zeros(SHAPE, dtype=np.float32)
    prediction = np.zeros(SHAPE, dtype=np.float32)
    reference[mask] = 100.0 + 400.0 * levels  # scale of the reference scanner
    prediction[mask] = 7.0 + 3.0 * flipped  # a different, arbitrary scale

    result = metrics.brain_metrics(reference, prediction, mask)
    assert result["mae"] == pytest.approx(0.1, abs=1e-12)
    assert result["psnr"] == pytest.approx(10.0, abs=1e-9)


def test_constant_offset_is_removed_by_per_volume_normalisation() -> None:
    """Why a constant offset cannot serve as a known error: each volume is scaled with its own
    percentiles, so an offset (or any positive affine change) disappears."""
    reference, mask, _ = _phantom()
    shifted = np.where(mask, 1.7 * reference + 55.0, 0.0)
    result = metrics.brain_metrics(reference, shifted, mask)
    assert result["mae"] == pytest.approx(0.0, abs=1e-6)
    assert result["psnr"] > 120.0


# ----------------------------------------------------------------------------------------
# SSIM implementation against scikit-image
# ----------------------------------------------------------------------------------------

def _skimage_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    _, full = structural_similarity(
        x.astype(np.float64),
        y.astype(np.float64),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        full=True,
    )
    return full


def test_ssim_map_3d_matches_scikit_image() -> None:
    reference, mask, _ = _phantom()
    prediction = _noisy(reference, mask, 0.1)
    x = metrics.normalise_percentile(reference, mask)
    y = metrics.normalise_percentile(prediction, mask)
    ours = metrics.ssim_map(x, y)
    theirs = _skimage_map(x, y)
    r = metrics.SSIM_RADIUS
    interior = (slice(r, -r),) * 3
    assert np.max(np.abs(ours[interior] - theirs[interior])) < 1e-4
    # Same border mode as scikit-image, so the border agrees too.
    assert np.max(np.abs(ours - theirs)) < 1e-4


def test_ssim_map_2d_matches_scikit_image_slice_by_slice() -> None:
    reference, mask, _ = _phantom()
    prediction = _noisy(reference, mask, 0.1)
    x = metrics.normalise_percentile(reference, mask)
    y = metrics.normalise_percentile(prediction, mask)
    ours = metrics.ssim_map(x, y, sigma=(1.5, 1.5, 0.0))
    for z in range(SHAPE[2]):
        theirs = _skimage_map(x[:, :, z], y[:, :, z])
        assert np.max(np.abs(ours[:, :, z] - theirs)) < 1e-4, z


def test_brain_ssim_aggregation_matches_scikit_image_maps() -> None:
    """End to end: ssim3d = mean of the 3D map over brain voxels; ssim2d = mean over slices with
    brain of the slice's mean over brain voxels (also checks the bounding-box crop is exact)."""
    reference, mask, _ = _phantom()
    prediction = _noisy(reference, mask, 0.1)
    x = metrics.normalise_percentile(reference, mask)
    y = metrics.normalise_percentile(prediction, mask)
    expected_3d = _skimage_map(x, y)[mask].mean()
    per_slice = [
        _skimage_map(x[:, :, z], y[:, :, z])[mask[:, :, z]].mean()
        for z in range(SHAPE[2])
        if mask[:, :, z].any()
    ]
    result = metrics.brain_metrics(reference, prediction, mask)
    assert result["ssim3d"] == pytest.approx(expected_3d, abs=1e-5)
    assert result["ssim2d"] == pytest.approx(float(np.mean(per_slice)), abs=1e-5)


def test_ssim_2d_and_3d_stay_within_minus_one_and_one() -> None:
    reference, mask, _ = _phantom()
    inverted = np.where(mask, reference.max() - reference + 1.0, 0.0)
    for prediction in (_noisy(reference, mask, 0.3), inverted):
        result = metrics.brain_metrics(reference, prediction, mask)
        for key in ("ssim2d", "ssim3d"):
            assert -1.0 <= result[key] <= 1.0, key
    # Contrast inversion is structurally anti-correlated: SSIM must go negative.
    assert metrics.brain_metrics(reference, inverted, mask)["ssim3d"] < 0.0


# ----------------------------------------------------------------------------------------
# Normalisations
# ----------------------------------------------------------------------------------------

def test_normalise_percentile_range_and_background() -> None:
    reference, mask, _ = _phantom()
    out = metrics.normalise_percentile(reference, mask)
    assert out.dtype == np.float32
    assert np.all(out[~mask] == 0.0)
    assert out[mask].min() == 0.0 and out[mask].max() == pytest.approx(1.0)
    lo, hi = np.percentile(reference[mask].astype(np.float64), [1.0, 99.0])
    expected = np.clip((reference[mask] - lo) / (hi - lo), 0.0, 1.0)
    np.testing.assert_allclose(out[mask], expected, atol=1e-6)
    # About 1 % of brain voxels sit at each end (the clipped tails).
    n = int(mask.sum())
    assert abs(np.sum(out[mask] <= 1e-7) / n - 0.01) <= 2.0 / n
    assert abs(np.sum(out[mask] >= 1.0 - 1e-6) / n - 0.01) <= 2.0 / n


def test_normalise_percentile_flat_volume_gives_zeros() -> None:
    _, mask, _ = _phantom()
    flat = np.full(SHAPE, 5.0, dtype=np.float32)
    out = metrics.normalise_percentile(flat, mask)
    assert np.all(out == 0.0) and np.all(np.isfinite(out))


def test_brasyn_normalise_puts_percentiles_at_zero_and_one() -> None:
    rng = np.random.default_rng(5)
    volume = rng.gamma(2.0, 100.0, size=SHAPE) + 10.0
    out = metrics.brasyn_normalise(volume)
    assert out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    lo, hi = np.percentile(volume, [0.5, 99.5])
    # The voxel values at the 0.5th and 99.5th percentiles land on 0 and 1 ...
    np.testing.assert_allclose(out, np.clip((volume - lo) / (hi - lo), 0.0, 1.0), atol=1e-6)
    # ... so 0.5 % of the voxels are clipped at each end.
    n = volume.size
    assert abs(np.sum(out <= 1e-7) / n - 0.005) <= 2.0 / n
    assert abs(np.sum(out >= 1.0 - 1e-6) / n - 0.005) <= 2.0 / n


def test_brasyn_normalise_raises_a_negative_lower_bound_to_zero() -> None:
    rng = np.random.default_rng(6)
    volume = rng.normal(size=SHAPE)  # 0.5th percentile is about -2.6
    out = metrics.brasyn_normalise(volume)
    hi = np.percentile(volume, 99.5)
    assert np.all(out[volume <= 0] == 0.0)
    positive = (volume > 0) & (volume < hi)
    np.testing.assert_allclose(out[positive], volume[positive] / hi, rtol=1e-6)
    assert np.all(metrics.brasyn_normalise(np.zeros(SHAPE)) == 0.0)


# ----------------------------------------------------------------------------------------
# BraSyn protocol
# ----------------------------------------------------------------------------------------

def _brasyn_by_hand(reference: np.ndarray, prediction: np.ndarray, seg: np.ndarray) -> tuple[float, float, float]:
    """Independent re-statement of the challenge recipe with a plain torchmetrics call: tumour,
    non-tumour, and the tumour's SSIM map averaged over its voxels (the organisers' indexing)."""

    def scale(v: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(v, [0.5, 99.5])
        lo = max(lo, 0.0)
        return (np.clip(v, lo, hi) - lo) / (hi - lo)

    t = (seg > 0).astype(np.float32)
    r = torch.from_numpy(scale(reference.astype(np.float64)).astype(np.float32))[None, None]
    p = torch.from_numpy(scale(prediction.astype(np.float64)).astype(np.float32))[None, None]
    tt = torch.from_numpy(t)[None, None]
    tumour, tumour_map = structural_similarity_index_measure(p * tt, r * tt, return_full_image=True)
    healthy = structural_similarity_index_measure(p * (1 - tt), r * (1 - tt))
    region = float(tumour_map[tt.bool()].double().mean())
    return float(tumour), float(healthy), region


def test_brasyn_ssim_matches_plain_torchmetrics_on_whole_volumes() -> None:
    """Also checks that the exact bounding-box speed-up changes nothing (tumour is small)."""
    shape = (64, 64, 40)
    reference, mask, _ = _phantom(shape=shape)
    prediction = _noisy(reference, mask, 0.1)
    for centre in ((20, 30, 20), (32, 32, 6)):  # well inside, and within 11 voxels of the z border
        seg = _ellipsoid(shape, centre, (5, 4, 3)).astype(np.uint8)
        result = metrics.brasyn_metrics(reference, prediction, seg)
        tumour, healthy, region = _brasyn_by_hand(reference, prediction, seg)
        assert result["ssim_tumour"] == pytest.approx(tumour, abs=1e-6)
        assert result["ssim_nontumour"] == pytest.approx(healthy, abs=1e-6)
        assert result["ssim_tumour_region"] == pytest.approx(region, abs=1e-5)
        assert 1 - result["ssim_tumour_region"] > 20 * (1 - result["ssim_tumour"])  # not pinned near 1 by the background


def test_psnr_full_includes_the_background() -> None:
    reference, mask, seg = _phantom()
    prediction = _noisy(reference, mask, 0.1)
    r = metrics.brasyn_normalise(reference).astype(np.float64)
    p = metrics.brasyn_normalise(prediction).astype(np.float64)
    expected = 10.0 * math.log10(1.0 / np.mean((p - r) ** 2))
    result = metrics.brasyn_metrics(reference, prediction, seg)
    assert result["psnr_full"] == pytest.approx(expected, abs=1e-9)


def test_without_segmentation_brasyn_ssim_is_skipped() -> None:
    reference, mask, _ = _phantom()
    prediction = _noisy(reference, mask, 0.1)
    result = metrics.evaluate_volumes(reference, prediction, mask, seg=None)
    assert result["ssim_tumour"] is None and result["ssim_nontumour"] is None and result["ssim_tumour_region"] is None
    assert result["note"] == "no reference segmentation: BraSyn SSIM skipped"
    assert math.isfinite(result["psnr_full"])
    json.dumps(result, allow_nan=False)  # plain floats, None, str


def test_empty_segmentation_gives_none_not_nan() -> None:
    reference, mask, _ = _phantom()
    prediction = _noisy(reference, mask, 0.1)
    result = metrics.brasyn_metrics(reference, prediction, np.zeros(SHAPE, dtype=np.uint8))
    assert result["ssim_tumour"] is None and result["ssim_tumour_region"] is None
    assert "no tumour" in result["note"]
    assert 0.0 < result["ssim_nontumour"] < 1.0


def test_evaluate_volumes_returns_one_flat_json_dict() -> None:
    reference, mask, seg = _phantom()
    result = metrics.evaluate_volumes(reference, _noisy(reference, mask, 0.1), mask, seg)
    assert set(result) == {"psnr", "mae", "ssim2d", "ssim3d", "ssim_tumour", "ssim_tumour_region", "ssim_nontumour", "psnr_full"}
    assert all(type(v) is float for v in result.values())
    json.dumps(result, allow_nan=False)


def test_more_noise_gives_worse_scores() -> None:
    reference, mask, seg = _phantom()
    rows = [metrics.evaluate_volumes(reference, _noisy(reference, mask, level), mask, seg)
            for level in (0.02, 0.05, 0.1, 0.2)]
    for key in ("psnr", "ssim2d", "ssim3d", "ssim_tumour", "ssim_tumour_region", "ssim_nontumour", "psnr_full"):
        values = [row[key] for row in rows]
        assert all(a > b for a, b in zip(values, values[1:])), (key, values)
    maes = [row["mae"] for row in rows]
    assert all(a < b for a, b in zip(maes, maes[1:])), maes


def test_bad_inputs_raise_data_error() -> None:
    reference, mask, _ = _phantom()
    with pytest.raises(DataError):
        metrics.brain_metrics(reference, reference[:-1], mask[:-1])
    with pytest.raises(DataError):
        metrics.brain_metrics(reference, reference, mask[:-1])
    with pytest.raises(DataError):
        metrics.brain_metrics(reference, reference, np.zeros(SHAPE, dtype=bool))
    with pytest.raises(DataError):
        metrics.brasyn_metrics(reference, reference, np.zeros((2, 2, 2)))


# ----------------------------------------------------------------------------------------
# Summary over cases
# ----------------------------------------------------------------------------------------

def test_summarise_mean_sd_and_none_handling() -> None:
    rows = [
        {"psnr": 20.0, "ssim_tumour": None, "note": "no reference segmentation: BraSyn SSIM skipped", "only_none": None},
        {"psnr": 22.0, "ssim_tumour": 0.8, "only_none": None},
        {"psnr": 27.0, "ssim_tumour": None, "only_none": None},
    ]
    summary = metrics.summarise(rows)
    assert summary["psnr"]["n"] == 3
    assert summary["psnr"]["mean"] == pytest.approx(23.0)
    assert summary["psnr"]["sd"] == pytest.approx(np.std([20.0, 22.0, 27.0], ddof=1))
    assert summary["ssim_tumour"] == {"mean": 0.8, "sd": 0.0, "n": 1}
    assert summary["only_none"] == {"mean": None, "sd": None, "n": 0}
    assert "note" not in summary
    json.dumps(summary, allow_nan=False)


def test_summarise_with_a_perfect_psnr() -> None:
    summary = metrics.summarise([{"psnr": math.inf}, {"psnr": 30.0}])
    assert summary["psnr"] == {"mean": math.inf, "sd": None, "n": 2}
