"""The demo pipeline and the copy baseline it reports beside the model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from mrisynth import demo
from mrisynth.baselines import MOST_SIMILAR, copy_baseline, write_copy_baseline
from mrisynth.cases import discover_cases, find_case
from mrisynth.cli import main
from mrisynth.errors import UsageError
from mrisynth.io import load_volume
from mrisynth.modalities import MODALITIES


@pytest.mark.parametrize("target", MODALITIES)
def test_copy_baseline_is_the_normalised_most_similar_modality(case_factory, target):
    case = find_case(case_factory())
    volume, geometry = copy_baseline(case, target)
    source, _ = load_volume(case.modalities[MOST_SIMILAR[target]])
    brain = source != 0
    assert geometry.shape == source.shape
    assert volume.min() == 0.0 and volume.max() == 1.0
    assert np.all(volume[~brain] == 0)
    # monotone in the source inside the brain: a rescaled copy, not a different image
    order = np.argsort(source[brain])
    assert np.all(np.diff(volume[brain][order]) >= -1e-6)


def test_copy_baseline_is_written_like_a_prediction(case_factory, tmp_path):
    case = find_case(case_factory(scheme="brats2023", case_id="BraTS-GLI-00001-000"))
    (path,) = write_copy_baseline([case], "flair", tmp_path / "out")
    assert path.name == "BraTS-GLI-00001-000-t2f.nii.gz"


@pytest.mark.parametrize("cases,test_cases,minutes", [(3, 2, 1.0), (8, 0, 1.0), (8, 2, 0.0)])
def test_demo_refuses_settings_it_cannot_run(tmp_path, cases, test_cases, minutes):
    settings = demo.DemoSettings(out=tmp_path, cases=cases, test_cases=test_cases, minutes=minutes)
    with pytest.raises(UsageError):
        demo.check_settings(settings)


def test_demo_bad_usage_exits_2(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--cases", "2"]) == 2
    assert "expected at least" in capsys.readouterr().err


def test_metrics_table_has_one_row_per_contender():
    summary = {"summary": {"psnr": {"mean": 20.0, "sd": 1.0, "n": 2}, "ssim_tumour": {"mean": None, "sd": None, "n": 0}}}
    table = demo.metrics_table({"model": summary, "baseline": summary, "ceiling": summary})
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert "20.00 ± 1.00" in lines[2] and "n/a" in lines[2]


@pytest.mark.slow
def test_demo_runs_end_to_end_on_phantoms(tmp_path, monkeypatch):
    """Three phantoms, a tiny model and a few seconds of training: every output is produced."""
    monkeypatch.setattr(demo, "DEMO_MODEL_OPTIONS", {"base_channels": 4})
    out = tmp_path / "demo"
    settings = demo.DemoSettings(out=out, cases=3, test_cases=1, minutes=0.05)
    report = demo.run_demo(settings, log=lambda message: None)
    text = report.read_text()
    assert "noise ceiling" in text and "![Phantom_003_flair]" in text
    results = json.loads((out / "results.json").read_text())
    model, ceiling = results["model"]["summary"], results["ceiling"]["summary"]
    # the noise-free truth is closer to the noisy reference than a briefly trained model
    assert ceiling["psnr"]["mean"] > model["psnr"]["mean"]
    assert (out / "predictions" / "Phantom_003_flair.nii.gz").is_file()
    assert (out / "figures" / "Phantom_003_flair.png").stat().st_size > 10_000
    assert [c.id for c in discover_cases(out / "data" / "test")] == ["Phantom_003"]
    saved = yaml.safe_load((out / "run" / "config.yaml").read_text())  # the demo's pins over the recipe
    assert (saved["mse_weight"], saved["ema_decay"], saved["preprocess"]["median_level"]) == (0, 0, 0)


@pytest.mark.slow
def test_demo_phantoms_are_reused_for_the_same_cohort_and_regenerated_for_another_seed(tmp_path):
    settings = demo.DemoSettings(out=tmp_path / "demo", cases=2, test_cases=1, seed=0)
    train_root, test_root = demo.make_phantom_cohort(settings, log=lambda message: None)
    flair = next((test_root / "Phantom_002").glob("*_flair.nii.gz"))
    first = load_volume(flair)[0]
    stamp = flair.stat().st_mtime_ns
    demo.make_phantom_cohort(settings, log=lambda message: None)
    assert flair.stat().st_mtime_ns == stamp  # same cohort: not written again
    demo.make_phantom_cohort(demo.DemoSettings(out=tmp_path / "demo", cases=2, test_cases=1, seed=1), log=lambda message: None)
    assert not np.array_equal(load_volume(flair)[0], first)  # another seed: other phantoms
