"""benchmarks/paired.py: paired per-case differences of two contenders, per pair and pooled."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import paired  # noqa: E402


def _evaluation(path: Path, rows: dict[str, dict[str, float]]) -> Path:
    """A file shaped like `mrisynth evaluate --out`: per-case rows under "cases"."""
    path.write_text(json.dumps({"cases": [{"case": case, "modality": "flair", **values} for case, values in rows.items()],
                                "summary": {}}))
    return path


def test_paired_differences_counts_and_pooling(tmp_path: Path) -> None:
    a0 = _evaluation(tmp_path / "a0.json", {"A": {"psnr": 16.0, "mae": 0.10}, "B": {"psnr": 14.0, "mae": 0.20}})
    b0 = _evaluation(tmp_path / "b0.json", {"B": {"psnr": 15.0, "mae": 0.25}, "A": {"psnr": 15.0, "mae": 0.05}})
    a1 = _evaluation(tmp_path / "a1.json", {"A": {"psnr": 18.0, "mae": 0.1}, "B": {"psnr": 18.0, "mae": 0.1}})
    b1 = _evaluation(tmp_path / "b1.json", {"A": {"psnr": 15.0, "mae": 0.1}, "B": {"psnr": 18.0, "mae": 0.2}})
    result = paired.compare([("seed 0", a0, b0), ("seed 1", a1, b1)], ["psnr", "mae"])

    seed0 = result["pairs"][0]["metrics"]
    assert seed0["psnr"] == {"first": 15.0, "second": 15.0, "difference": 0.0, "better": 1, "n": 2}  # +1 on A, -1 on B
    assert seed0["mae"]["better"] == 1 and seed0["mae"]["difference"] == pytest.approx(0.0)  # lower mae wins: B only
    assert result["pooled"]["psnr"] == {"difference": 0.75, "better": 2, "n": 4, "worst_pair": 0.0}  # (1 - 1 + 3 + 0) / 4
    assert result["pooled"]["mae"]["better"] == 2  # B at seed 0, B at seed 1 (the tie at A counts for neither)
    assert result["pooled"]["mae"]["worst_pair"] == pytest.approx(0.0)  # seed 0's 0 is worse than seed 1's -0.05


def test_main_writes_the_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _evaluation(tmp_path / "a.json", {"A": {"psnr": 17.0}})
    b = _evaluation(tmp_path / "b.json", {"A": {"psnr": 15.5}})
    out = tmp_path / "p.json"
    assert paired.main(["--pair", "seed 0", str(a), str(b), "--metric", "psnr", "--out", str(out)]) == 0
    assert "| seed 0 | 17.0000 / 15.5000 / +1.5000 (1/1) |" in capsys.readouterr().out
    assert json.loads(out.read_text())["pooled"]["psnr"]["difference"] == 1.5


@pytest.mark.parametrize("second_rows, expected", [
    ({"A": {"psnr": 1.0}, "C": {"psnr": 1.0}}, "expected the same cases, found 2 in one only (B, C)"),
    ({"A": {"psnr": 1.0}, "B": {"mae": 1.0}}, "case B has no number for psnr"),
    ({"A": {"psnr": 1.0}, "B": {"psnr": "n/a"}}, "case B has no number for psnr"),
])
def test_cases_that_cannot_be_paired_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 second_rows: dict, expected: str) -> None:
    a = _evaluation(tmp_path / "a.json", {"A": {"psnr": 1.0}, "B": {"psnr": 2.0}})
    b = _evaluation(tmp_path / "b.json", second_rows)
    assert paired.main(["--pair", "s", str(a), str(b), "--metric", "psnr"]) == 1
    assert expected in capsys.readouterr().err


def test_a_file_that_is_not_an_evaluation_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _evaluation(tmp_path / "a.json", {"A": {"psnr": 1.0}})
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert paired.main(["--pair", "s", str(a), str(bad), "--metric", "psnr"]) == 1
    assert f"{bad}: expected the JSON file of `mrisynth evaluate --out`" in capsys.readouterr().err


def test_an_infinite_psnr_as_evaluate_writes_it_is_a_number_and_malformed_rows_are_named(tmp_path: Path,
                                                                                         capsys: pytest.CaptureFixture) -> None:
    a = _evaluation(tmp_path / "a.json", {"A": {"psnr": "inf"}})
    b = _evaluation(tmp_path / "b.json", {"A": {"psnr": 20.0}})
    assert paired.compare([("s", a, b)], ["psnr"])["pooled"]["psnr"]["difference"] == float("inf")
    bad = tmp_path / "bad.json"
    bad.write_text('{"cases": [7]}')
    assert paired.main(["--pair", "s", str(a), str(bad), "--metric", "psnr"]) == 1
    assert f"{bad}: expected per-case rows with a case name, found 7" in capsys.readouterr().err
