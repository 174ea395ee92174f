"""Preprocessing: brain mask, percentile scaling, reorientation to LPS, the window and its exact inverse."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import BRATS_AFFINE, synthetic_brain

from mrisynth.modalities import MODALITIES
from mrisynth.preprocess import (
    Layout,
    PreprocessConfig,
    background_value,
    brain_mask,
    make_layout,
    normalise,
    prepare,
)

LPS = BRATS_AFFINE
RAS = np.diag([1.0, 1.0, 1.0, 1.0])


def four(shape, seed=0) -> dict[str, np.ndarray]:
    vols = synthetic_brain(shape, seed)
    return {m: vols[m] for m in MODALITIES}


def box_brain(shape, lo, hi, seed=0) -> np.ndarray:
    """A volume that is random-positive inside the box [lo, hi) and 0 elsewhere."""
    v = np.zeros(shape, dtype=np.float32)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    v[box] = np.random.default_rng(seed).uniform(1, 100, v[box].shape)
    return v


# --------------------------------------------------------------------------- mask and normalisation


def test_background_value_is_the_value_on_the_outer_faces():
    v = np.full((10, 10, 10), -3.6, dtype=np.float32)
    v[3:7, 3:7, 3:7] = np.random.default_rng(0).normal(0, 1, (4, 4, 4))
    assert background_value(v) == np.float32(-3.6)
    assert background_value(box_brain((8, 8, 8), (2, 2, 2), (6, 6, 6))) == 0.0


def test_brain_mask_is_the_union_over_modalities():
    a = box_brain((10, 10, 10), (1, 1, 1), (5, 5, 5))
    b = box_brain((10, 10, 10), (4, 4, 4), (8, 8, 8))
    mask = brain_mask([a, b])
    assert mask.sum() == 64 + 64 - 1 and mask[1, 1, 1] and mask[7, 7, 7] and not mask[0, 9, 0]


def test_normalise_maps_percentiles_to_0_and_1():
    v = box_brain((20, 20, 20), (3, 3, 3), (17, 17, 17))
    mask = v != 0
    out, (lo, hi) = normalise(v, mask)
    expect_lo, expect_hi = np.percentile(v[mask], [1, 99])
    assert (lo, hi) == pytest.approx((expect_lo, expect_hi))
    np.testing.assert_allclose(out[mask], np.clip((v[mask] - lo) / (hi - lo), 0, 1), rtol=1e-6, atol=1e-6)
    assert out.dtype == np.float32 and np.all(out[~mask] == 0)
    # exactly [0, 1]: everything at or below the 1st percentile is 0, at or above the 99th is 1
    assert out.min() == 0 and out.max() == 1
    np.testing.assert_array_equal(out[mask][v[mask] <= lo], 0)
    np.testing.assert_array_equal(out[mask][v[mask] >= hi], 1)
    assert np.mean(out[mask] == 0) == pytest.approx(0.01, abs=0.001)
    assert np.mean(out[mask] == 1) == pytest.approx(0.01, abs=0.001)


def test_normalise_other_percentiles_and_edge_cases():
    v = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    mask = np.ones(v.shape, bool)
    out, (lo, hi) = normalise(v, mask, 10, 90)
    assert (lo, hi) == pytest.approx((99.9, 899.1))
    assert np.mean(out == 0) == pytest.approx(0.1, abs=0.01) and np.mean(out == 1) == pytest.approx(0.1, abs=0.01)
    zero, span = normalise(v, np.zeros(v.shape, bool))
    assert span == (0.0, 0.0) and not zero.any()
    flat, _ = normalise(np.ones_like(v), mask)
    assert not flat.any()


def test_z_scored_data_with_negative_background():
    shape = (24, 24, 12)
    vols = {}
    brain = np.zeros(shape, bool)
    brain[4:20, 5:19, 2:10] = True
    rng = np.random.default_rng(0)
    for m in MODALITIES:
        v = np.full(shape, -3.6, dtype=np.float32)
        v[brain] = rng.normal(0, 1, brain.sum())  # includes negative brain values
        vols[m] = v
    assert (vols["t1"][brain] < 0).sum() > 100
    prepared = prepare(vols, LPS, PreprocessConfig(min_window=16))
    back = prepared.layout.to_volume(prepared.mask)
    np.testing.assert_array_equal(back, brain)
    for m in MODALITIES:
        lo, hi = np.percentile(vols[m][brain], [1, 99])
        assert prepared.percentiles[m] == pytest.approx((lo, hi))
        volume = prepared.layout.to_volume(prepared.slices[MODALITIES.index(m)])
        np.testing.assert_allclose(volume[brain], np.clip((vols[m][brain] - lo) / (hi - lo), 0, 1), atol=1e-6)
        assert np.all(volume[~brain] == 0)


def test_explicit_mask_overrides_and_may_be_integer():
    vols = four((32, 32, 16))
    mask = np.zeros((32, 32, 16), np.uint8)
    mask[10:20, 8:24, 4:12] = 1  # a smaller region than the synthetic brain
    prepared = prepare(vols, LPS, PreprocessConfig(min_window=16), mask=mask)
    np.testing.assert_array_equal(prepared.layout.to_volume(prepared.mask), mask.astype(bool))
    t1 = prepared.layout.to_volume(prepared.slices[0])
    assert np.all(t1[mask == 0] == 0) and t1[mask == 1].max() == 1
    lo, hi = np.percentile(vols["t1"][mask == 1], [1, 99])
    assert prepared.percentiles["t1"] == pytest.approx((lo, hi))
    with pytest.raises(ValueError, match="does not match the mask"):
        prepare(vols, LPS, mask=np.ones((4, 4, 4), bool))


# --------------------------------------------------------------------------- window and round trip


@pytest.mark.parametrize(
    "shape, min_window, expected_size",
    [
        # the synthetic brain spans 80% of the grid in x and 85% in y
        ((240, 240, 10), 160, (192, 208)),  # 192 x 204 voxels
        ((182, 218, 40), 160, (160, 192)),  # 145 x 185 voxels
        ((48, 48, 16), 32, (48, 48)),
        ((48, 48, 16), 160, (160, 160)),  # a window bigger than the image pads with zeros
    ],
)
def test_round_trip_is_exact_on_the_brain(shape, min_window, expected_size):
    vols = four(shape)
    prepared = prepare(vols, LPS, PreprocessConfig(min_window=min_window))
    layout = prepared.layout
    assert layout.size == expected_size and all(s % 16 == 0 for s in layout.size)
    assert prepared.slices.shape == (4, shape[2], *expected_size)
    brain = brain_mask(list(vols.values()))
    assert prepared.mask.sum() == brain.sum()  # no brain voxel lost
    for m in MODALITIES:
        v = vols[m]
        assert np.array_equal(layout.to_volume(layout.to_slices(v))[brain], v[brain])
        assert np.all(layout.to_volume(layout.to_slices(v))[~brain] == 0)
        normalised, _ = normalise(v, brain)
        np.testing.assert_array_equal(layout.to_volume(prepared.slices[MODALITIES.index(m)]), normalised)


def test_wide_brain_gets_a_larger_window_and_loses_nothing():
    shape = (240, 240, 20)
    v = box_brain(shape, (20, 30, 2), (220, 190, 18))  # 200 voxels wide in x, 160 in y
    prepared = prepare({m: v for m in MODALITIES}, LPS)
    layout = prepared.layout
    assert layout.size == (208, 160)
    assert prepared.mask.sum() == np.count_nonzero(v)
    np.testing.assert_array_equal(layout.to_volume(layout.to_slices(v)), v)
    # the window is centred on the brain's bounding box (BraTS arrays are stored LPS already)
    assert layout.origin == ((20 + 220) // 2 - 208 // 2, (30 + 190) // 2 - 160 // 2)
    # a plain 160x160 centre crop would have cut brain off
    assert np.count_nonzero(v[40:200, 40:200]) < np.count_nonzero(v)


@pytest.mark.parametrize("brain_width, expected", [(160, 160), (161, 176), (176, 176), (177, 192), (200, 208)])
def test_window_size_is_the_next_multiple_of_16(brain_width, expected):
    mask = np.zeros((256, 256, 3), bool)
    mask[10 : 10 + brain_width, 20:60, 1] = True
    layout = make_layout(mask, LPS, PreprocessConfig())
    assert layout.size == (expected, 160)
    window = layout.to_slices(mask)
    assert window.sum() == mask.sum()


def test_window_off_centre_brain_near_the_edge_pads():
    mask = np.zeros((200, 200, 4), bool)
    mask[0:30, 150:200, 1:3] = True  # brain in a corner: the window reaches outside the image
    layout = make_layout(mask, RAS, PreprocessConfig())
    assert min(layout.origin) < 0 or max(o + s for o, s in zip(layout.origin, layout.size)) > 200
    np.testing.assert_array_equal(layout.to_volume(layout.to_slices(mask)), mask)


def ras_version(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored RAS: flip the first two axes, and the affine with them."""
    nx, ny = volume.shape[:2]
    flip = np.array([[-1.0, 0, 0, nx - 1], [0, -1.0, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    return volume[::-1, ::-1].copy(), affine @ flip


def test_ras_and_lps_inputs_give_identical_slices():
    shape = (40, 52, 12)
    vols = four(shape)
    prepared = prepare(vols, LPS, PreprocessConfig(min_window=32))
    ras_vols, ras_affine = {}, None
    for m, v in vols.items():
        ras_vols[m], ras_affine = ras_version(v, LPS)
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    assert not np.array_equal(ras_vols["t1"], vols["t1"])
    prepared_ras = prepare(ras_vols, ras_affine, PreprocessConfig(min_window=32))
    np.testing.assert_array_equal(prepared_ras.slices, prepared.slices)
    np.testing.assert_array_equal(prepared_ras.mask, prepared.mask)
    # each maps back to its own grid exactly
    brain = brain_mask(list(vols.values()))
    for i, m in enumerate(MODALITIES):
        expected, _ = normalise(vols[m], brain)
        np.testing.assert_array_equal(prepared.layout.to_volume(prepared.slices[i]), expected)
        np.testing.assert_array_equal(prepared_ras.layout.to_volume(prepared_ras.slices[i]), expected[::-1, ::-1])
        ras_layout = prepared_ras.layout
        np.testing.assert_array_equal(ras_layout.to_volume(ras_layout.to_slices(ras_vols[m])), ras_vols[m])


def test_axis_permuted_storage_gives_the_same_slices():
    shape = (40, 44, 12)
    vols = four(shape)
    prepared = prepare(vols, LPS, PreprocessConfig(min_window=32))
    # data stored as (Z, X, Y): voxel (k, i, j) holds what (i, j, k) held
    perm = np.zeros((4, 4))
    perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1  # (k, i, j) -> (i, j, k)
    zxy_affine = LPS @ perm
    zxy = {m: np.ascontiguousarray(v.transpose(2, 0, 1)) for m, v in vols.items()}
    prepared_zxy = prepare(zxy, zxy_affine, PreprocessConfig(min_window=32))
    np.testing.assert_array_equal(prepared_zxy.slices, prepared.slices)
    for m, v in zxy.items():
        layout = prepared_zxy.layout
        assert layout.shape == (12, 40, 44) and layout.canonical_shape == shape
        np.testing.assert_array_equal(layout.to_volume(layout.to_slices(v)), v)


def test_layout_to_dict_round_trip():
    vols = four((48, 40, 10))
    layout = prepare(vols, LPS @ np.diag([1.0, -1, 1, 1]), PreprocessConfig(min_window=32)).layout
    data = json.loads(json.dumps(layout.to_dict()))
    assert set(data) == {"shape", "input_ornt", "canonical_shape", "origin", "size"}
    again = Layout.from_dict(data)
    assert again == layout
    v = vols["t2"]
    np.testing.assert_array_equal(again.to_slices(v), layout.to_slices(v))


def test_layout_refuses_wrong_shapes():
    layout = make_layout(np.ones((20, 20, 5), bool), LPS, PreprocessConfig(min_window=16))
    with pytest.raises(ValueError, match="does not match"):
        layout.to_slices(np.zeros((20, 21, 5)))
    with pytest.raises(ValueError, match="do not match"):
        layout.to_volume(np.zeros((5, 16, 16)))


def test_config_round_trip_and_unknown_keys():
    config = PreprocessConfig(low_percentile=0.5, high_percentile=99.5, min_window=128, multiple=32)
    assert PreprocessConfig.from_dict({**config.to_dict(), "future": 1}) == config


def test_prepare_with_a_modality_absent():
    vols = four((32, 32, 8))
    del vols["t1ce"]
    prepared = prepare(vols, LPS, PreprocessConfig(min_window=32))
    assert prepared.available == ("t1", "t2", "flair")
    assert not prepared.slices[1].any() and prepared.slices[0].any()
    assert list(prepared.brain_slices) == [z for z in range(8) if prepared.mask[z].any()]
    with pytest.raises(ValueError, match="at least one"):
        prepare({}, LPS)


def test_median_level_puts_the_brain_median_at_the_level_and_keeps_bright_tissue_below_one():
    rng = np.random.default_rng(0)
    v = np.zeros((20, 20, 20), np.float32)
    mask = np.zeros(v.shape, bool)
    mask[3:17, 3:17, 3:17] = True
    v[mask] = rng.uniform(100, 300, mask.sum())
    v[8:10, 8:10, 8:10] = 400  # a small bright lesion (0.3 % of the brain): above the 99th percentile
    out, (lo, top) = normalise(v, mask, median_level=0.25)
    p1, median = np.percentile(v[mask], [1, 50])
    assert lo == pytest.approx(p1) and top == pytest.approx(p1 + (median - p1) / 0.25)
    assert np.median(out[mask]) == pytest.approx(0.25, abs=1e-3)
    assert 0.25 < out[9, 9, 9] < 1  # the lesion keeps its contrast instead of being clipped at 1
    seed, _ = normalise(v, mask)
    assert seed[9, 9, 9] == 1  # the seed's scaling saturates it
    # the contrast to typical tissue does not depend on how much bright tissue the volume holds
    more = v.copy()
    more[5:15, 5:15, 5:8] = 400  # 10 % of the brain bright now
    out_more, _ = normalise(more, mask, median_level=0.25)
    seed_more, _ = normalise(more, mask)
    typical = (12, 12, 12)
    assert abs(out_more[typical] - out[typical]) < abs(seed_more[typical] - seed[typical])


def test_median_level_is_checked_and_changes_the_config():
    assert PreprocessConfig(median_level=1.0).problems() == ["median_level: expected 0 (off) or a level in (0, 1), found 1.0"]
    assert PreprocessConfig(median_level=-0.1).problems()
    assert PreprocessConfig(median_level=0.25).to_dict() != PreprocessConfig().to_dict()  # so the cache key changes
