"""The weights shipped inside the package: a fresh install synthesizes with no training."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open
from scipy import ndimage
from scipy.stats import spearmanr

from mrisynth.calibration import LEVELS, Calibration
from mrisynth.checkpoint import PRETRAINED, load_checkpoint, pretrained_path
from mrisynth.cli import main
from mrisynth.io import load_volume
from mrisynth.modalities import MODALITIES
from mrisynth.preprocess import brain_mask


def test_pretrained_weights_are_safetensors_within_budget_with_metadata():
    path = pretrained_path()
    assert path.suffix == ".safetensors" and path.stat().st_size <= 20 * 1024 * 1024
    with safe_open(str(path), framework="pt") as handle:
        assert "mrisynth" in handle.metadata()
    checkpoint = load_checkpoint(PRETRAINED)
    assert checkpoint["model"]["name"] == "lite_vae_unet" and checkpoint["target"] == "any"
    assert checkpoint["preprocess"]["median_level"] == 0.25  # trained with the recipe's median scaling
    calibration = Calibration.from_dict(checkpoint["calibration"])  # fitted as train does: docs/model_card.md
    assert calibration is not None and calibration.enabled == ["t1ce", "t2", "flair"] and sorted(calibration.templates) == sorted(MODALITIES)


def test_pretrained_t1ce_is_calibrated_and_the_flag_gives_the_raw_output(case_factory, tmp_path):
    case_dir = case_factory(modalities=("t1", "t2", "flair"))
    for name, flags in (("cal", []), ("raw", ["--no-calibration"])):
        assert main(["predict", "--input", str(case_dir), "--output", str(tmp_path / name), "--threads", "1", *flags]) == 0
    calibrated, _ = load_volume(tmp_path / "cal" / "Case_001_t1ce.nii.gz")
    raw, _ = load_volume(tmp_path / "raw" / "Case_001_t1ce.nii.gz")
    brain = raw > 0
    template = np.asarray(load_checkpoint(PRETRAINED)["calibration"]["templates"]["t1ce"])
    assert np.allclose(np.percentile(calibrated[brain], LEVELS), template, atol=0.01)
    assert not np.allclose(np.percentile(raw[brain], LEVELS), template, atol=0.01)


@pytest.mark.parametrize("missing", MODALITIES)
def test_predict_with_the_pretrained_model_fills_any_missing_modality(case_factory, tmp_path, missing):
    case_dir = case_factory(modalities=tuple(m for m in MODALITIES if m != missing))
    out = tmp_path / "out"
    assert main(["predict", "--input", str(case_dir), "--output", str(out)]) == 0  # --model defaults to pretrained
    volume, geometry = load_volume(out / f"Case_001_{missing}.nii.gz")
    reference, _ = load_volume(case_dir / "Case_001_t1.nii.gz" if missing != "t1" else case_dir / "Case_001_t2.nii.gz")
    assert geometry.shape == reference.shape
    brain = reference != 0
    assert np.all(volume[~brain] == 0) and 0 <= volume.min() and volume.max() <= 1
    assert volume[brain].std() > 0.01  # an image, not a constant


def test_pretrained_std_map_is_highest_at_the_edges(case_factory, tmp_path):
    """The shipped model's std map (test-time-augmented posterior draws, no Laplace branch) is
    high where the synthesis hinges on exact position: it rises with the synthesis's gradient."""
    assert not load_checkpoint(PRETRAINED)["model"].get("predict_scale")
    case_dir = case_factory(modalities=("t1", "t1ce", "t2"))
    out = tmp_path / "out"
    assert main(["predict", "--input", str(case_dir), "--output", str(out), "--samples", "4", "--threads", "1"]) == 0
    std, _ = load_volume(out / "Case_001_flair_std.nii.gz", allow_constant=True)
    synthesis, _ = load_volume(out / "Case_001_flair.nii.gz")
    brain = brain_mask([load_volume(case_dir / f"Case_001_{m}.nii.gz")[0] for m in ("t1", "t1ce", "t2")])  # predict's mask
    assert np.isfinite(std).all() and np.all(std[~brain] == 0)
    # the FLAIR calibration maps the synthesis's lowest values flat onto 0: the spread is 0 there only
    assert np.all(std[brain & (synthesis > 0)] > 0) and np.mean(std[brain] > 0) > 0.95
    gradient = np.sqrt(sum(ndimage.sobel(synthesis, axis=a) ** 2 for a in range(3)))
    assert spearmanr(std[brain], gradient[brain]).statistic > 0.3
