"""benchmarks/ablation.py: the protocol's brain PSNR, a bias sign that means 'too bright', and --resume."""
from __future__ import annotations

import json
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


def test_resume_continues_the_run_keeps_its_settings_and_the_earlier_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_case(tmp_path / "q" / "cases" / "test")
    calls = []

    def fake_train(config, data_root, run_dir, resume=False):
        calls.append((config, resume))
        return run_dir / "best.pt"

    class FakeSynthesizer:
        @staticmethod
        def from_checkpoint(*args, **kwargs):
            return FakeSynthesizer()

        def predict(self, case, missing):
            return None

    monkeypatch.setattr(ablation, "use_cache_dir", lambda *args: None)  # leave the environment alone
    monkeypatch.setattr(ablation.torch, "set_num_threads", lambda n: None)  # and this process's threads
    monkeypatch.setattr(ablation, "train", fake_train)
    monkeypatch.setattr(ablation, "Synthesizer", FakeSynthesizer)
    monkeypatch.setattr(ablation, "write_result", lambda *args, **kwargs: None)
    monkeypatch.setattr(ablation, "brain_scores", lambda *args: [{"case": "Case_001", "psnr": 20.0, "mae": 0.1, "bias": 0.0}])
    common = ["--quality-run", str(tmp_path / "q"), "--name", "v", "--out", str(tmp_path / "out"), "--minutes", "5"]

    ablation.main([*common, "--set", '{"ema_decay": 0.5}'])
    assert calls[-1] == ({"model": "lite_vae_unet", "target": "any", "max_minutes": 5.0, "epochs": 100, "val_slices": 128,
                          "device": "cpu", "ema_decay": 0.5}, False)
    first = (tmp_path / "out" / "v" / "scores.json").read_text()

    ablation.main([*common, "--epochs", "33", "--resume", "--set", '{"ignored": 1}'])
    assert calls[-1] == ({"max_minutes": 5.0, "epochs": 33}, True)
    assert (tmp_path / "out" / "v" / "scores_before_resume.json").read_text() == first
    report = json.loads((tmp_path / "out" / "v" / "scores.json").read_text())
    assert report["settings"] == {"ema_decay": 0.5} and report["resumed"] is True
