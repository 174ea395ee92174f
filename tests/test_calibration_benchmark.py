"""benchmarks/calibration.py: the decision and both held-out columns, for a tiny any-target model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import calibration as calibration_benchmark  # noqa: E402
from conftest import write_case  # noqa: E402
from test_calibration import SHAPE, _checkpoint  # noqa: E402
from mrisynth.cases import find_case  # noqa: E402
from mrisynth.io import read_images  # noqa: E402
from mrisynth.metrics import evaluate_volumes  # noqa: E402
from mrisynth.modalities import MODALITIES  # noqa: E402
from mrisynth.predict import Synthesizer  # noqa: E402
from mrisynth.preprocess import brain_mask  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_both_columns_are_evaluate_metrics_of_the_raw_and_the_mapped_synthesis(tmp_path: Path) -> None:
    quality = tmp_path / "quality"
    for i in range(3):
        write_case(quality / "cases" / "train", f"Case_{i}", shape=SHAPE, seed=i)
    test_dir = write_case(quality / "cases" / "test", "Case_9", shape=SHAPE, seed=9)
    run = tmp_path / "run"
    run.mkdir()
    (run / "splits.json").write_text(json.dumps({"train": ["Case_0", "Case_1"], "val": ["Case_2"], "seed": 0}))
    checkpoint = _checkpoint(run / "best.pt", None)

    out = tmp_path / "report.json"
    assert calibration_benchmark.main(["--quality-run", str(quality), "--model", f"tiny={checkpoint}", "--out", str(out)]) == 0
    report = json.loads(out.read_text())["tiny"]
    assert sorted(report) == sorted(MODALITIES)
    flair = report["flair"]
    assert flair["validation"]["cases"] == 1
    assert flair["on"] == (flair["validation"]["psnr_calibrated"] > flair["validation"]["psnr_raw"])

    # the raw column is exactly what evaluate gives the network's output
    synth = Synthesizer.from_checkpoint(checkpoint, device="cpu")
    case = find_case(test_dir)
    raw = synth.predict(case, missing="flair", calibrated=False).volume
    volumes, _ = read_images(case.modalities)
    mask = brain_mask([volumes[m] for m in ("t1", "t1ce", "t2")])
    expected = evaluate_volumes(volumes["flair"], raw, mask)
    assert flair["test"]["raw"][0]["psnr"] == pytest.approx(expected["psnr"], abs=1e-6)
    assert flair["test"]["raw"][0]["mae"] == pytest.approx(expected["mae"], abs=1e-6)  # every metric, not the table's four
    assert flair["test"]["raw"][0]["psnr"] != pytest.approx(flair["test"]["calibrated"][0]["psnr"], abs=1e-3)
    assert np.isfinite(flair["test"]["calibrated"][0]["ssim3d"])
