"""Tests of ``mrisynth.calibration``: the quantile map, its storage, its fitting and its use in predict."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import write_case
from mrisynth.calibration import LEVELS, Calibration, brain_quantiles, calibrate, fit_calibration, templates_for
from mrisynth.cases import find_case
from mrisynth.checkpoint import checkpoint_metadata, load_checkpoint, save_checkpoint
from mrisynth.cli import main
from mrisynth.dataset import in_channels_for
from mrisynth.io import read_images
from mrisynth.models import build_model
from mrisynth.modalities import MODALITIES
from mrisynth.predict import Synthesizer
from mrisynth.preprocess import PreprocessConfig, brain_mask, normalise

SHAPE = (40, 48, 16)


def _volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((20, 20, 10), dtype=bool)
    mask[3:17, 4:16, 2:8] = True
    volume = np.where(mask, rng.uniform(0.05, 0.6, mask.shape), 0).astype(np.float32)
    return volume, mask


def test_calibrated_brain_has_the_template_quantiles_and_keeps_voxel_ranks() -> None:
    volume, mask = _volume()
    template = np.sort(np.random.default_rng(1).beta(2, 5, len(LEVELS)))  # any increasing curve in [0, 1]
    out, _ = calibrate(volume, mask, template)
    assert np.allclose(brain_quantiles(out[mask]), template, atol=2e-3)
    assert (out[~mask] == 0).all()
    order = np.argsort(volume[mask], kind="stable")
    assert (np.diff(out[mask][order]) >= -1e-7).all()  # monotone: brighter stays brighter


def test_std_is_carried_through_the_maps_slope() -> None:
    volume, mask = _volume()
    template = 0.1 + 1.5 * brain_quantiles(volume[mask])  # the map is v -> 0.1 + 1.5 v inside the range
    std = np.where(mask, 0.001, 0).astype(np.float32)
    out, std_out = calibrate(volume, mask, template, std)
    inside = mask & (volume > 0.1) & (volume < 0.55)  # away from the ends, where the map is clamped
    assert np.allclose(out[inside], 0.1 + 1.5 * volume[inside], atol=1e-4)
    assert np.allclose(std_out[inside], 0.0015, atol=1e-5)
    assert (std_out[~mask] == 0).all()


def test_ties_in_the_synthesis_do_not_break_the_map() -> None:
    volume, mask = _volume()
    volume[mask] = np.round(volume[mask], 1)  # few distinct values: many equal quantiles
    out, _ = calibrate(volume, mask, np.linspace(0, 1, len(LEVELS)))
    assert np.isfinite(out).all() and out[mask].min() >= 0 and out[mask].max() <= 1


def test_calibration_round_trips_and_refuses_malformed_data() -> None:
    cal = Calibration({"t1ce": list(np.linspace(0, 1, len(LEVELS))), "t1": [0.0] * len(LEVELS)}, ["t1ce", "flair"])
    back = Calibration.from_dict(cal.to_dict())
    assert back is not None and back.templates == cal.templates
    assert back.enabled == ["t1ce"]  # flair has no template: never applied
    assert back.applies_to("t1ce") and not back.applies_to("t1")
    assert Calibration.from_dict(None) is None  # a checkpoint without one
    with pytest.raises(ValueError, match="quantile levels"):
        Calibration.from_dict({"levels": 11, "templates": {}})  # another quantile grid
    with pytest.raises(ValueError, match="one curve"):
        Calibration.from_dict({"levels": len(LEVELS), "templates": {"t1ce": [0.0, 1.0]}})


def test_a_malformed_calibration_in_a_checkpoint_is_a_one_line_data_error(tmp_path) -> None:
    from mrisynth.errors import DataError

    path = _checkpoint(tmp_path / "bad.pt", None)
    checkpoint = load_checkpoint(path)
    checkpoint["calibration"] = {"levels": len(LEVELS), "templates": {"t1ce": [0.5]}, "enabled": ["t1ce"]}
    save_checkpoint(path, checkpoint)
    with pytest.raises(DataError, match="bad.pt: the checkpoint's intensity calibration is malformed"):
        Synthesizer.from_checkpoint(path, device="cpu")


def test_templates_are_the_mean_normalised_brain_curve_of_the_training_cases(tmp_path) -> None:
    cases = [find_case(write_case(tmp_path, f"Case_{i}", shape=SHAPE, seed=i)) for i in range(2)]
    config = PreprocessConfig(min_window=32, median_level=0.25)
    templates = templates_for(cases, ["flair", "t1"], config)
    assert set(templates) == {"flair", "t1"}
    curves = []
    for case in cases:
        volumes, _ = read_images(case.modalities)
        mask = brain_mask([volumes[m] for m in ("t1", "t1ce", "t2")])
        values, _ = normalise(volumes["flair"], mask, median_level=0.25)
        curves.append(np.percentile(values[mask], LEVELS))
    assert np.allclose(templates["flair"], np.mean(curves, axis=0), atol=1e-5)
    assert templates["flair"][100] == pytest.approx(0.25, abs=1e-3)  # the median level


class FakeSynthesizer:
    """Returns a fixed monotone distortion of the real target (what calibration can undo), or the
    target plus noise (what it cannot improve)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.config = PreprocessConfig(min_window=32)

    def predict(self, case, missing, calibrated=True):
        volumes, _ = read_images(case.modalities)
        mask = brain_mask([volumes[m] for m in MODALITIES if m != missing])
        target, _ = normalise(volumes[missing], mask)
        if self.kind == "squashed":
            volume = np.sqrt(target) * 0.3
        else:
            volume = target + np.random.default_rng(0).normal(0, 0.02, target.shape)
        return SimpleNamespace(volume=np.where(mask, np.clip(volume, 1e-3, 1), 0).astype(np.float32))


@pytest.mark.parametrize("kind, enabled", [("squashed", ["flair"]), ("faithful", [])])
def test_a_modality_is_calibrated_only_when_it_helps_the_validation_cases(tmp_path, kind, enabled) -> None:
    cases = [find_case(write_case(tmp_path, f"Case_{i}", shape=SHAPE, seed=i)) for i in range(3)]
    cal = fit_calibration(FakeSynthesizer(kind), ["flair"], cases[:2], cases[2:])
    assert cal.enabled == enabled
    scores = cal.validation["flair"]
    assert (scores["psnr_calibrated"] > scores["psnr_raw"]) == bool(enabled)
    assert "flair" in cal.templates


def test_without_validation_cases_nothing_is_enabled(tmp_path) -> None:
    cases = [find_case(write_case(tmp_path, "Case_0", shape=SHAPE))]
    cal = fit_calibration(FakeSynthesizer("squashed"), ["flair"], cases, [])
    assert cal.enabled == [] and "flair" in cal.templates


# --- in predict ---------------------------------------------------------------------------


def _checkpoint(path: Path, calibration: Calibration | None) -> Path:
    torch.manual_seed(0)
    model = build_model("lite_vae_unet", in_channels=in_channels_for("any"), base_channels=4,
                        latent_channels=2, local_latent_channels=2)
    extra = {"calibration": calibration.to_dict()} if calibration else {}
    metadata = checkpoint_metadata(model, "any", PreprocessConfig(min_window=32).to_dict(), **extra)
    return save_checkpoint(path, {**metadata, "state_dict": model.state_dict()})


@pytest.fixture
def calibrated_checkpoint(tmp_path) -> Path:
    template = list(np.linspace(0.0, 0.9, len(LEVELS)) ** 2)
    return _checkpoint(tmp_path / "cal.pt", Calibration({"flair": template, "t1": template}, ["flair"]))


def test_predict_applies_the_calibration_only_where_enabled(case_factory, calibrated_checkpoint) -> None:
    synth = Synthesizer.from_checkpoint(calibrated_checkpoint, device="cpu")
    case = find_case(case_factory(shape=SHAPE, modalities=("t1", "t1ce", "t2")))
    raw = synth.predict(case, calibrated=False)
    done = synth.predict(case)
    mask = raw.volume > 0
    assert done.calibrated and not raw.calibrated
    assert np.allclose(brain_quantiles(done.volume[mask]), synth.calibration.templates["flair"], atol=5e-3)
    assert np.allclose(done.volume, calibrate(raw.volume, mask, synth.calibration.templates["flair"])[0])
    case_t1 = find_case(case_factory(case_id="Case_t1", shape=SHAPE, modalities=("t1ce", "t2", "flair")))
    assert not synth.predict(case_t1).calibrated  # a template, but not enabled for t1


def test_cli_no_calibration_writes_the_raw_synthesis(case_factory, calibrated_checkpoint, tmp_path) -> None:
    case_dir = case_factory(shape=SHAPE, modalities=("t1", "t1ce", "t2"))
    outputs = {}
    for name, flags in (("cal", []), ("raw", ["--no-calibration"])):
        code = main(["predict", "--model", str(calibrated_checkpoint), "--input", str(case_dir),
                     "--output", str(tmp_path / name), *flags])
        assert code == 0
        outputs[name] = np.asarray(nib.load(str(next((tmp_path / name).glob("*flair*")))).dataobj)
    synth = Synthesizer.from_checkpoint(calibrated_checkpoint, device="cpu")
    raw = synth.predict(find_case(case_dir), calibrated=False).volume
    assert np.allclose(outputs["raw"], raw, atol=1e-6)
    assert not np.allclose(outputs["cal"], outputs["raw"], atol=1e-3)


def test_train_stores_the_calibration_in_best_checkpoint(tmp_path, monkeypatch) -> None:
    from mrisynth.train import train

    root = tmp_path / "data"
    for i in range(3):
        write_case(root, f"Case_{i}", shape=SHAPE, seed=i)
    config = {"model": "lite_vae_unet", "model_options": {"base_channels": 4, "latent_channels": 2,
              "local_latent_channels": 2}, "epochs": 1, "batch_size": 4, "crop": 32, "val_cases": 1,
              "device": "cpu", "preprocess": {"min_window": 32}}
    best = train(config, root, tmp_path / "run")
    checkpoint = load_checkpoint(best)
    cal = Calibration.from_dict(checkpoint["calibration"])
    assert cal is not None and sorted(cal.templates) == sorted(MODALITIES)
    assert set(cal.validation) == set(MODALITIES) and all(v["cases"] == 1 for v in cal.validation.values())
    exported = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert exported["calibration"] == checkpoint["calibration"]
    assert "calibration" not in load_checkpoint(tmp_path / "run" / "last.pt")  # fitted once, on best
