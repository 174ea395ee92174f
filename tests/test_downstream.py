"""The downstream check's own logic: BraTS regions, BraTS-style scores, recovery, the whole script.

The reference segmenter and ``benchmarks/downstream.py`` live under ``benchmarks/`` (evaluation
only); these tests import them from there. They need MONAI (test and bench extras).
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import downstream  # noqa: E402
import segmenter  # noqa: E402
from conftest import write_case  # noqa: E402
from mrisynth.cases import find_case  # noqa: E402
from mrisynth.io import read_images  # noqa: E402


def test_region_masks_follow_brats_labels_in_both_schemes():
    labels = np.array([0, 1, 2, 3, 4])
    wt, tc, et = segmenter.region_masks(labels, "brats2020")
    assert wt.tolist() == [False, True, True, True, True]
    assert tc.tolist() == [False, True, False, False, True]
    assert et.tolist() == [False, False, False, False, True]
    wt, tc, et = segmenter.region_masks(labels, "brats2023")  # enhancing tumour renumbered to 3
    assert tc.tolist() == [False, True, False, True, False]
    assert et.tolist() == [False, False, False, True, False]


def cube(shape=(30, 30, 30), start=(10, 10, 10), size=10) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def test_region_scores_of_identical_and_shifted_masks():
    same = downstream.region_scores(cube(), cube(), (1.0, 1.0, 1.0))
    assert same == pytest.approx({"dice": 1.0, "hd95": 0.0})
    shifted = downstream.region_scores(cube(start=(13, 10, 10)), cube(), (2.0, 1.0, 1.0))
    assert shifted["dice"] == pytest.approx(2 * 700 / 2000)  # overlap 7x10x10 of two 1000-voxel cubes
    assert shifted["hd95"] == pytest.approx(6.0)  # 3 voxels along an axis of 2 mm spacing


def test_region_scores_follow_brats_rules_for_empty_masks():
    empty = np.zeros((30, 30, 30), dtype=bool)
    assert downstream.region_scores(empty, empty, (1.0,) * 3) == {"dice": 1.0, "hd95": 0.0}
    assert downstream.region_scores(cube(), empty, (1.0,) * 3) == {"dice": 0.0, "hd95": downstream.HD95_EMPTY_PENALTY}
    assert downstream.region_scores(empty, cube(), (1.0,) * 3) == {"dice": 0.0, "hd95": downstream.HD95_EMPTY_PENALTY}


def test_recovery_is_the_share_of_the_lost_dice_given_back():
    assert downstream.recovery(0.8, zeros=0.2, real=0.9) == pytest.approx(0.6 / 0.7)
    assert downstream.recovery(0.1, zeros=0.2, real=0.9) < 0  # worse than leaving the sequence out
    assert downstream.recovery(0.5, zeros=0.87, real=0.9) is None  # too little was lost for a share to mean anything


class FlairThreshold(torch.nn.Module):
    """A stand-in segmenter: every region is 'normalised FLAIR above 0.6'."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x[:, 3:4] > 0.6).float() * 20 - 10).repeat(1, 3, 1, 1)


@pytest.mark.parametrize("affine", [None, np.diag([1.0, 1.0, 1.0, 1.0])])
def test_segment_puts_regions_back_on_the_input_grid(tmp_path, affine):
    case = find_case(write_case(tmp_path, affine=affine))
    volumes, geometry = read_images(case.modalities)
    mask = segmenter.case_mask(volumes)
    prepared = segmenter.prepare_inputs(volumes, geometry.affine, mask)
    regions = segmenter.segment(FlairThreshold(), prepared, mask)
    flair = prepared.layout.to_volume(prepared.slices[3])  # normalised FLAIR back on the input grid
    expected = (flair > 0.6) & mask
    assert regions.shape == (3, *geometry.shape)
    assert expected.sum() > 50
    for region in regions:
        np.testing.assert_array_equal(region, expected)


def fake_quality_run(root: Path) -> Path:
    """A quality.py work folder in miniature: 2 training cases, 1 test case, a 'copy' FLAIR contender."""
    run = root / "run"
    for i in range(2):
        write_case(run / "cases" / "train", case_id=f"Train_{i:03d}", seed=i + 1, shape=(40, 40, 12))
    test_dir = write_case(run / "cases" / "test", case_id="Test_001", seed=7, shape=(40, 40, 12))
    predictions = run / "predictions" / "copy" / "flair"
    predictions.mkdir(parents=True)
    shutil.copyfile(test_dir / "Test_001_t2.nii.gz", predictions / "Test_001_flair.nii.gz")
    report = {"command": "quality.py --test", "contenders": [{"id": "copy", "targets": {"flair": {}}}]}
    (run / "quality.json").write_text(json.dumps(report))
    return run


@pytest.mark.slow
def test_downstream_script_scores_real_contender_and_zeros(tmp_path, capsys):
    run = fake_quality_run(tmp_path)
    out = tmp_path / "out"
    args = ["--quality-run", str(run), "--minutes", "0.002", "--threads", "1", "--out", str(out)]
    assert downstream.main(args) == 0
    with (out / "downstream.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["target"], r["condition"]) for r in rows[::3]] == [("-", "real"), ("flair", "copy"), ("flair", "zeros")]
    assert [r["region"] for r in rows[:3]] == ["WT", "TC", "ET"]
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    summary = json.loads((out / "downstream.json").read_text())["summary"]
    assert set(summary["recovery"]) == {f"flair|copy|{r}" for r in segmenter.REGIONS}
    text = (out / "downstream.md").read_text()
    assert "| flair | copy |" in text and "| flair | zeros |" in text and "**flair** missing costs" in text
    capsys.readouterr()
    assert downstream.main(args) == 0  # the finished segmenter is reused, not retrained
    assert "reusing the reference segmenter" in capsys.readouterr().out
    (out / "downstream.md").unlink()
    assert downstream.main(args + ["--rescore"]) == 0  # tables again from the saved rows, nothing segmented
    assert "| flair | copy |" in (out / "downstream.md").read_text()
    assert "reusing the reference segmenter" not in capsys.readouterr().out


def test_downstream_refuses_a_folder_that_is_not_a_quality_run(tmp_path):
    with pytest.raises(SystemExit, match="quality.json: not found"):
        downstream.main(["--quality-run", str(tmp_path)])
