"""Tests of the digital phantom: API, files, geometry, labels and the MR physics.

Three full-size cases are built once per module (about 1.5-2 s each on one core): one in
memory (with its internals), one written with BraTS 2020 naming and the same seed (must be
identical), one written with BraTS 2023 naming and another seed (must differ).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mrisynth.modalities import parse_filename
from mrisynth.phantom import anatomy, files, make_case, make_cohort, physics, synth, tumour
from mrisynth.phantom.anatomy import OUT_AFFINE, OUT_SHAPE

SEQUENCES = ("t1", "t1ce", "t2", "flair")
DATA = Path(anatomy.__file__).parent / "data"


def _seed_with(kind: str) -> int:
    """First seed whose Phantom_001 has a tumour of ``kind`` (plans are cheap to draw)."""
    return next(s for s in range(200) if synth.plan_case("Phantom_001", s).tumour.kind == kind)


SEED = _seed_with("necrotic")


@pytest.fixture(scope="module")
def case() -> synth.PhantomCase:
    return synth.synthesize("Phantom_001", SEED)


@pytest.fixture(scope="module")
def cohort_2020(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("p2020")
    return out, make_cohort(out, 1, seed=SEED, naming="brats2020")


@pytest.fixture(scope="module")
def cohort_2023(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("p2023")
    return out, make_cohort(out, 1, seed=SEED + 1, naming="brats2023")


def _median_ratio(image: np.ndarray, region: np.ndarray, reference: np.ndarray) -> float:
    return float(np.median(image[region]) / np.median(image[reference]))


# --- template file ----------------------------------------------------------------------------


def test_template_file_is_small_and_has_its_notice():
    assert (DATA / "icbm152_2009a.npz.xz").stat().st_size < 2_000_000
    notice = (DATA / "NOTICE").read_text()
    assert "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre" in notice
    assert "without fee is hereby granted" in notice


def test_template_loads_as_symmetric_tissue_fractions():
    template = anatomy.load_template()
    gm = template.maps["gm"]
    assert gm.dtype == np.uint8 and gm.shape == template.maps["wm"].shape == template.maps["csf"].shape
    assert np.array_equal(gm, gm[::-1])
    total = template.maps["gm"].astype(int) + template.maps["wm"] + template.maps["csf"]
    assert total.max() <= 256  # fractions add up to at most 1 (+ rounding)
    assert len(template.sites) > 1000


# --- API, files, ids --------------------------------------------------------------------------


def test_case_ids_for_both_namings():
    assert files.case_id(1, "brats2020") == "Phantom_001"
    assert files.case_id(12, "brats2023") == "Phantom-00012-000"
    with pytest.raises(ValueError):
        files.case_id(1, "brats2015")


def test_file_names_for_both_namings():
    names_2020 = files.file_names("Phantom_001", "brats2020")
    assert names_2020 == {
        "t1": "Phantom_001_t1.nii.gz",
        "t1ce": "Phantom_001_t1ce.nii.gz",
        "t2": "Phantom_001_t2.nii.gz",
        "flair": "Phantom_001_flair.nii.gz",
        "seg": "Phantom_001_seg.nii.gz",
        "flair_clean": "Phantom_001_flair_clean.nii.gz",
    }
    names_2023 = files.file_names("Phantom-00001-000", "brats2023")
    assert names_2023["t1"] == "Phantom-00001-000-t1n.nii.gz"
    assert names_2023["t1ce"] == "Phantom-00001-000-t1c.nii.gz"
    assert names_2023["t2"] == "Phantom-00001-000-t2w.nii.gz"
    assert names_2023["flair"] == "Phantom-00001-000-t2f.nii.gz"
    assert names_2023["seg"] == "Phantom-00001-000-seg.nii.gz"
    assert names_2023["flair_clean"] == "Phantom-00001-000-t2f_clean.nii.gz"
    # the clean FLAIR must never be taken for a modality by the suffix matcher
    assert parse_filename(names_2020["flair_clean"]) is None
    assert parse_filename(names_2023["flair_clean"]) is None
    assert parse_filename(names_2020["t1"])[2] == "t1" and parse_filename(names_2023["t1ce"])[2] == "t1ce"


def test_cohort_2020_files(cohort_2020):
    out, ids = cohort_2020
    assert ids == ["Phantom_001"]
    folder = out / "Phantom_001"
    assert sorted(p.name for p in folder.iterdir()) == sorted(files.file_names("Phantom_001").values())
    for key, name in files.file_names("Phantom_001").items():
        image = nib.load(folder / name)
        assert image.shape == OUT_SHAPE
        assert np.allclose(image.affine, OUT_AFFINE)
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
        assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
        assert image.header.get_zooms() == (1.0, 1.0, 1.0)
        assert image.get_data_dtype() == (np.uint8 if key == "seg" else np.int16)
    seg = np.asarray(nib.load(folder / "Phantom_001_seg.nii.gz").dataobj)
    assert set(np.unique(seg)) == {0, 1, 2, 4}


def test_same_seed_same_arrays(case, cohort_2020):
    out, _ = cohort_2020
    for key, name in files.file_names("Phantom_001").items():
        written = np.asarray(nib.load(out / "Phantom_001" / name).dataobj)
        expected = case.seg if key == "seg" else case.images[key]
        assert np.array_equal(written, expected), key


def test_cohort_2023_files_labels_and_other_seed_differs(case, cohort_2023):
    out, ids = cohort_2023
    assert ids == ["Phantom-00001-000"]
    folder = out / ids[0]
    assert sorted(p.name for p in folder.iterdir()) == sorted(files.file_names(ids[0], "brats2023").values())
    seg = np.asarray(nib.load(folder / f"{ids[0]}-seg.nii.gz").dataobj)
    assert set(np.unique(seg)) <= {0, 1, 2, 3} and 2 in set(np.unique(seg))
    flair = np.asarray(nib.load(folder / f"{ids[0]}-t2f.nii.gz").dataobj)
    assert not np.array_equal(flair, case.images["flair"])


def test_plans_depend_on_seed_and_case_number_only():
    def draws(plan: synth.CasePlan) -> tuple:
        return plan.placement, plan.tumour, plan.physics

    plan = draws(synth.plan_case("Phantom-00001-000", SEED))
    assert plan == draws(synth.plan_case("Phantom_001", SEED))  # same case number: same case
    assert plan != draws(synth.plan_case("Phantom_001", SEED + 1))
    assert plan != draws(synth.plan_case("Phantom_002", SEED))


def test_in_memory_case_shapes_dtypes(case):
    for key in (*SEQUENCES, "flair_clean"):
        assert case.images[key].shape == OUT_SHAPE and case.images[key].dtype == np.int16
        assert case.images[key].min() >= 0
    assert case.seg.shape == OUT_SHAPE and case.seg.dtype == np.uint8
    assert set(np.unique(case.seg)) == {0, 1, 2, 4}


def test_make_case_returns_the_api_keys(monkeypatch, case):
    monkeypatch.setattr("mrisynth.phantom.synthesize", lambda case_id, seed: case)
    arrays = make_case("Phantom_001", SEED, naming="brats2023")
    assert set(arrays) == {"t1", "t1ce", "t2", "flair", "seg", "flair_clean"}
    assert set(np.unique(arrays["seg"])) == {0, 1, 2, 3}


# --- geometry ---------------------------------------------------------------------------------


def test_skull_stripped_background_is_zero(case):
    brain = np.zeros(OUT_SHAPE, dtype=bool)
    brain[case.box] = case.brain
    for key in (*SEQUENCES, "flair_clean"):
        assert not case.images[key][~brain].any(), key
    assert not case.seg[~brain].any()
    assert (case.images["t2"][brain] > 0).mean() > 0.99


def test_brain_is_centred_and_anterior_is_low_j(case):
    brain = case.images["t2"] > 0
    i, j, k = np.nonzero(brain)
    assert abs(i.mean() - 119.5) < 10 and abs(j.mean() - 119.5) < 15
    assert k.max() < OUT_SHAPE[2] - 1  # the top of the head is inside the volume
    # LPS: j grows to posterior. The cerebellum (lowest slices) lies posterior of the brain's centre.
    low = k < np.percentile(k, 10)
    assert j[low].mean() > j.mean() + 10


def test_sampling_mask_keeps_every_brain_voxel(case):
    template = anatomy.load_template()
    plan = case.plan
    _, field_rng, _ = synth._streams(plan.case_id, plan.seed)
    matrix = anatomy.sampling_matrix(template, plan.placement)
    box = anatomy.output_box(template, matrix)
    shape = tuple(s.stop - s.start for s in box)
    coords = anatomy.sampling_coordinates(matrix, box, anatomy.random_displacement(field_rng, shape, plan.placement))
    keep = anatomy._may_hold_brain(template, coords)
    total = template.maps["gm"].astype(np.float32) + template.maps["wm"] + template.maps["csf"]
    full = ndimage.map_coordinates(total, coords, order=1)
    assert not (full[~keep] > 0).any()


def test_lesion_sizes_stay_within_10_to_35_mm():
    rng = np.random.default_rng(0)
    for _ in range(40):
        plan = tumour.draw_tumour(rng)
        assert all(10.0 <= d <= 35.0 for d in plan.diameters_mm)
        half = int(1.3 * max(plan.diameters_mm) / 2) + 3
        region = tuple(slice(0, 2 * half + 1) for _ in range(3))
        lesion, core = tumour.lesion_fractions(plan, rng, np.full(3, float(half)), region)
        equivalent_diameter = (6.0 * lesion.sum() / np.pi) ** (1.0 / 3.0)
        assert 10.0 <= equivalent_diameter <= 35.0
        assert core.sum() < lesion.sum()


def test_tumour_sits_in_the_cerebrum(case):
    center = np.rint(case.center).astype(int)
    assert case.seg[tuple(center)] in (1, 4)  # the centre is tumour core
    assert center[2] > 40  # above the cerebellum
    oedema = case.seg == 2
    assert oedema.sum() > case.seg.astype(bool).sum() * 0.2


# --- physics ----------------------------------------------------------------------------------


def _pure(case: synth.PhantomCase, name: str) -> np.ndarray:
    """Brain voxels (in the order of ``case.ideal``) that are >= 95 % of one class."""
    return case.fractions[name][case.brain] >= 0.95


def _seg_in_brain(case: synth.PhantomCase) -> np.ndarray:
    return case.seg[case.box][case.brain]


def test_flair_nulls_csf_and_shows_oedema(case):
    brain = np.zeros(OUT_SHAPE, dtype=bool)
    brain[case.box] = case.brain
    clean = case.images["flair_clean"][case.box][case.brain].astype(np.float32)
    csf, wm, seg = _pure(case, "csf"), _pure(case, "wm"), _seg_in_brain(case)
    assert np.median(clean[csf]) < 0.5 * np.median(clean[wm])
    assert np.median(clean[seg == 2]) > 1.2 * np.median(clean[wm])


def test_t2_csf_brighter_than_wm(case):
    ideal = case.ideal["t2"]
    assert _median_ratio(ideal, _pure(case, "csf"), _pure(case, "wm")) > 1.3


def test_t1_wm_brighter_than_gm(case):
    ideal = case.ideal["t1"]
    assert _median_ratio(ideal, _pure(case, "gm"), _pure(case, "wm")) < 0.97


def test_enhancing_rim_brighter_after_contrast(case):
    seg, wm = _seg_in_brain(case), _pure(case, "wm")
    rim = seg == 4
    assert rim.sum() > 50
    after = _median_ratio(case.ideal["t1ce"], rim, wm)
    before = _median_ratio(case.ideal["t1"], rim, wm)
    assert after > 1.1 * before
    assert after > 1.0  # brighter than white matter, as on clinical T1CE
    others = case.fractions["enhancing"][case.brain] == 0  # gadolinium only in enhancing tissue
    assert np.array_equal(case.ideal["t1ce"][others], case.ideal["t1"][others])


def test_noise_is_rician_and_a_few_percent(case):
    flair = case.images["flair"][case.box][case.brain].astype(np.float32)
    clean = case.images["flair_clean"][case.box][case.brain].astype(np.float32)
    wm = _pure(case, "wm")
    relative = np.std(flair[wm] - clean[wm]) / np.median(clean[wm])
    assert 0.005 < relative < 0.06
    csf = _pure(case, "csf")  # near-zero signal: Rician noise is positive on average
    assert np.mean(flair[csf] - clean[csf]) > 0


def test_flair_inversion_time_nulls_its_t1():
    ti = physics.flair_null_ti(2569.0, 9000.0)
    protocol = physics.Protocol("flair", tr=9000.0, te=120.0, ti=ti)
    assert physics.flair_signal(physics.Tissue(1.0, 2569.0, 329.0), protocol) < 1e-9
    assert 1600 < ti < 1800  # ~ T1 ln 2 for long TR


def test_partial_volume_mixes_signals_not_parameters():
    voxels = np.array([[0.5], [0.0], [0.5], [0.0], [0.0], [0.0]], dtype=np.float32)
    signals = {"csf": 10.0, "gm": 0.0, "wm": 2.0, "edema": 0.0, "enhancing": 0.0, "core": 0.0}
    assert physics.mix(voxels, signals)[0] == pytest.approx(6.0)


def test_contrast_ratios_hold_for_many_cases():
    """The signal equations keep the clinical contrasts for every drawn protocol and tissue set."""
    for s in range(100):
        phys = synth.plan_case("Phantom_001", s).physics
        t1, t1ce, t2, flair = (physics.class_signals(phys, q) for q in SEQUENCES)
        assert t1["wm"] > t1["gm"] > t1["csf"]
        assert t2["csf"] > t2["gm"] > t2["wm"]
        assert flair["csf"] < 0.25 * flair["wm"] and flair["edema"] > 1.2 * flair["wm"]
        assert t1ce["enhancing"] > t1ce["wm"] and t1ce["enhancing"] > t1["enhancing"]
