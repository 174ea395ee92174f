"""benchmarks/ablation.py's scoring: the protocol's brain PSNR, and a bias sign that means 'too bright'."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ablation  # noqa: E402
from conftest import write_case  # noqa: E402
from mrisynth.evaluate import evaluate_folder  # noqa: E402


def test_brain_scores_match_mrisynth_evaluate_and_sign_the_bias(tmp_path: Path) -> None:
    case_dir = write_case(tmp_path / "ref")
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    real = nib.load(case_dir / "Case_001_flair.nii.gz")
    data = np.asarray(real.dataobj, dtype=np.float32)
    # a synthesis with a compressed top end: its own 99th percentile is low, so scaling brightens it
    brain = data > 0
    top = np.percentile(data[brain], 90)
    squashed = np.where(brain, np.minimum(data, top), 0).astype(np.float32)
    nib.save(nib.Nifti1Image(squashed, real.affine, real.header), pred_dir / "Case_001_flair.nii.gz")

    rows = ablation.brain_scores(pred_dir, tmp_path / "ref", "flair")
    expected = evaluate_folder(pred_dir, tmp_path / "ref", modality="flair").rows[0]
    assert rows[0]["case"] == "Case_001"
    assert rows[0]["psnr"] == pytest.approx(expected["psnr"], abs=1e-4)
    assert rows[0]["mae"] == pytest.approx(expected["mae"], abs=1e-6)
    assert rows[0]["bias"] > 0.01

    shutil.copy(case_dir / "Case_001_flair.nii.gz", pred_dir / "Case_001_flair.nii.gz")
    exact = ablation.brain_scores(pred_dir, tmp_path / "ref", "flair")[0]
    assert exact["psnr"] == float("inf")
    assert exact["bias"] == 0
