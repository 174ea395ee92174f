"""Tests of ``mrisynth.evaluate``, ``mrisynth.report`` and ``mrisynth evaluate`` on small synthetic cases."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import BRATS_AFFINE
from mrisynth.cli import main
from mrisynth.errors import DataError
from mrisynth.evaluate import PROTOCOL, evaluate_folder, pair_predictions, write_outputs
from mrisynth.metrics import normalise_percentile
from mrisynth.preprocess import brain_mask
from mrisynth.report import plot_uncertainty

SHAPE = (40, 44, 16)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """--threads sets torch's process-wide thread count: give other test files theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def write_prediction(path: Path, data: np.ndarray, affine: np.ndarray = BRATS_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return path


def perfect(case_dir: Path, case_id: str, target: str = "flair", sep: str = "_") -> np.ndarray:
    """The reference normalised as the metrics normalise it, inside the inputs' brain mask."""
    target_name = f"{case_id}{sep}{target}.nii.gz"
    inputs = [read(p) for p in case_dir.iterdir() if p.name != target_name and "seg" not in p.name]
    assert len(inputs) == 3
    return normalise_percentile(read(case_dir / target_name), brain_mask(inputs))


def test_pairs_by_case_id_and_ignores_std_maps(case_factory, tmp_path) -> None:
    for i in (1, 2, 3):
        case_factory(case_id=f"Case_00{i}", shape=SHAPE, seed=i)
    pred = tmp_path / "pred"
    noise = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    write_prediction(pred / "Case_002_flair.nii.gz", noise)
    write_prediction(pred / "Case_001_flair.nii.gz", noise)
    write_prediction(pred / "Case_001_flair_std.nii.gz", noise)
    write_prediction(pred / "Case_009_flair.nii.gz", noise)  # no such reference case
    pairs, unmatched = pair_predictions(pred, case_factory.root)
    assert [(p.case_id, p.modality) for p in pairs] == [("Case_001", "flair"), ("Case_002", "flair")]
    assert pairs[0].case.id == "Case_001" and unmatched == ["Case_009_flair.nii.gz"]


def test_perfect_prediction_scores_ssim_one(case_factory, tmp_path) -> None:
    folder = case_factory(case_id="Case_001", shape=SHAPE)
    pred = tmp_path / "pred"
    write_prediction(pred / "Case_001_flair.nii.gz", perfect(folder, "Case_001"))
    evaluation = evaluate_folder(pred, case_factory.root)
    row = evaluation.rows[0]
    assert row["ssim2d"] == pytest.approx(1.0, abs=1e-5)
    assert row["ssim3d"] == pytest.approx(1.0, abs=1e-5)
    assert row["psnr"] > 60 and row["mae"] < 1e-4
    assert row["ssim_tumour"] is not None and row["ssim_nontumour"] is not None


def test_noisy_prediction_scores_lower(case_factory, tmp_path) -> None:
    folder = case_factory(case_id="Case_001", shape=SHAPE)
    good = perfect(folder, "Case_001")
    noisy = np.clip(good + np.random.default_rng(1).normal(0, 0.1, SHAPE), 0, 1) * (good > 0)
    write_prediction(tmp_path / "pred" / "Case_001_flair.nii.gz", noisy)
    row = evaluate_folder(tmp_path / "pred", case_factory.root).rows[0]
    assert 10 < row["psnr"] < 40 and row["ssim2d"] < 0.95


def test_brats2023_names_and_modality_filter(case_factory, tmp_path) -> None:
    folder = case_factory(case_id="BraTS-GLI-00002-000", scheme="brats2023", shape=SHAPE)
    pred = tmp_path / "pred"
    write_prediction(pred / "BraTS-GLI-00002-000-t2f.nii.gz", perfect(folder, "BraTS-GLI-00002-000", "t2f", sep="-"))
    evaluation = evaluate_folder(pred, case_factory.root)
    assert [(r["case"], r["modality"]) for r in evaluation.rows] == [("BraTS-GLI-00002-000", "flair")]
    with pytest.raises(DataError, match="no prediction of t1 matches"):
        evaluate_folder(pred, case_factory.root, modality="t1")


def test_prediction_on_another_grid_is_a_one_line_error(case_factory, tmp_path) -> None:
    case_factory(case_id="Case_001", shape=SHAPE)
    write_prediction(tmp_path / "pred" / "Case_001_flair.nii.gz", np.ones((40, 44, 15), np.float32))
    evaluation = evaluate_folder(tmp_path / "pred", case_factory.root)
    assert evaluation.rows == []
    (case_id, error), = evaluation.failed
    assert case_id == "Case_001" and "expected shape (40, 44, 16)" in error and "\n" not in error


def test_json_csv_and_figures_are_written(case_factory, tmp_path, capsys) -> None:
    for i in (1, 2):
        case_factory(case_id=f"Case_00{i}", shape=SHAPE, seed=i)
    pred = tmp_path / "pred"
    for i in (1, 2):
        good = perfect(case_factory.root / f"Case_00{i}", f"Case_00{i}")
        write_prediction(pred / f"Case_00{i}_flair.nii.gz", np.clip(good * 0.9 + 0.05, 0, 1) * (good > 0))
    out = tmp_path / "report" / "scores.json"
    figures = tmp_path / "figs"
    code = main(["evaluate", "--pred", str(pred), "--ref", str(case_factory.root), "--out", str(out), "--figures", str(figures)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [c["case"] for c in report["cases"]] == ["Case_001", "Case_002"]
    assert report["summary"]["psnr"]["n"] == 2 and report["protocol"] == PROTOCOL
    with open(out.with_suffix(".csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["case"] for r in rows] == ["Case_001", "Case_002"] and float(rows[0]["ssim2d"]) > 0.5
    for name in ("Case_001_flair.png", "Case_002_flair.png", "summary.png"):
        assert (figures / name).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "mean ± sd (n=2)" in printed and "Case_002" in printed


def test_infinite_psnr_is_written_as_standard_json(case_factory, tmp_path) -> None:
    folder = case_factory(case_id="Case_001", shape=SHAPE)
    reference = read(folder / "Case_001_flair.nii.gz")
    write_prediction(tmp_path / "pred" / "Case_001_flair.nii.gz", reference)  # identical: PSNR inf
    evaluation = evaluate_folder(tmp_path / "pred", case_factory.root)
    json_path, _ = write_outputs(evaluation, tmp_path / "e.json")
    text = json_path.read_text()
    assert "Infinity" not in text and json.loads(text)["cases"][0]["psnr"] == "inf"


def test_no_pairs_exits_1(case_factory, tmp_path) -> None:
    case_factory(case_id="Case_001", shape=SHAPE)
    empty = tmp_path / "pred"
    empty.mkdir()
    assert main(["evaluate", "--pred", str(empty), "--ref", str(case_factory.root)]) == 1
    assert main(["evaluate", "--pred", str(tmp_path / "absent"), "--ref", str(case_factory.root)]) == 2
    assert main(["evaluate", "--pred", str(empty), "--ref", str(case_factory.root), "--modality", "t5"]) == 2


def test_plot_uncertainty_writes_a_png(tmp_path) -> None:
    rng = np.random.default_rng(0)
    std = rng.random(SHAPE).astype(np.float32)
    path = plot_uncertainty(std, std * 2, tmp_path / "u.png", affine=BRATS_AFFINE, title="test")
    assert path.stat().st_size > 1000


def test_predict_then_evaluate_end_to_end(case_factory, tmp_path) -> None:
    from test_predict import make_checkpoint

    folder = case_factory(case_id="Case_001", shape=(48, 56, 20))
    checkpoint = make_checkpoint(tmp_path / "flair.pt", "flair")
    out = tmp_path / "pred"
    args = ["predict", "--model", str(checkpoint), "--input", str(folder), "--output", str(out), "--missing", "flair"]
    assert main(args + ["--threads", "1"]) == 0
    assert main(["evaluate", "--pred", str(out), "--ref", str(case_factory.root), "--out", str(tmp_path / "e.json")]) == 0
    row = json.loads((tmp_path / "e.json").read_text())["cases"][0]
    assert row["case"] == "Case_001" and np.isfinite(row["psnr"])
