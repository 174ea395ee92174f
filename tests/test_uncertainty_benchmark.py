"""benchmarks/uncertainty.py: Spearman(std, |error|) both ways, on a tiny any-target model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import uncertainty  # noqa: E402
from conftest import write_case  # noqa: E402
from test_calibration import SHAPE, _checkpoint  # noqa: E402
from mrisynth.cases import find_case  # noqa: E402
from mrisynth.io import load_volume  # noqa: E402
from mrisynth.predict import Synthesizer  # noqa: E402
from mrisynth.preprocess import normalise  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_output_scale_correlation_uses_the_reference_scaled_like_training_targets(tmp_path: Path) -> None:
    case_dir = write_case(tmp_path / "cases", "Case_1", shape=SHAPE)
    checkpoint = _checkpoint(tmp_path / "m.pt", None)
    out = tmp_path / "u.json"
    code = uncertainty.main(["--model", str(checkpoint), "--cases", str(case_dir), "--samples", "3",
                             "--threads", "1", "--figure", str(tmp_path / "u.png"), "--out", str(out)])
    assert code == 0 and (tmp_path / "u.png").is_file()
    report = json.loads(out.read_text())
    row = report["cases"][0]
    assert set(report["summary"]) >= {"mean", "output_scale_mean", "n"}

    synth = Synthesizer.from_checkpoint(checkpoint, device="cpu")
    result = synth.predict(find_case(case_dir), missing="flair", samples=3)
    reference, _ = load_volume(find_case(case_dir).modalities["flair"])
    brain = result.volume > 0
    scaled, _ = normalise(reference, brain)
    expected = spearmanr(result.std[brain], np.abs(result.volume - scaled)[brain]).statistic
    assert row["spearman_output_scale"] == pytest.approx(expected, abs=1e-6)
    assert row["spearman_output_scale"] != pytest.approx(row["spearman"], abs=1e-4)
