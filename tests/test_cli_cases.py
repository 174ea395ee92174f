"""``mrisynth cases``: the table, --json, exit codes, and a --help that does not import torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mrisynth.cli import build_parser, main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def env() -> dict[str, str]:
    """The test's environment, with the source tree importable even without an editable install."""
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def touch_case(root: Path, case_id: str, names: list[str]) -> None:
    (root / case_id).mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / case_id / name).write_bytes(b"")


@pytest.fixture
def cohort(tmp_path) -> Path:
    root = tmp_path / "cohort"
    touch_case(root, "A_1", [f"A_1_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")])
    touch_case(root, "BraTS-GLI-00001-000", [f"BraTS-GLI-00001-000-{m}.nii.gz" for m in ("t1n", "t2w", "t2f")])
    touch_case(root, "C_3", ["C_3_t1.nii", "C_3_t1.nii.gz", "C_3_t1ce.nii", "C_3_t2.nii", "C_3_flair.nii"])
    return root


def test_table(cohort, capsys):
    assert main(["cases", str(cohort)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == ""
    assert lines[0].split() == ["case", "scheme", "modalities", "seg", "problems"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert set(rows) == {"A_1", "BraTS-GLI-00001-000", "C_3"}
    assert rows["A_1"].split() == ["A_1", "brats2020", "t1", "t1ce", "t2", "flair", "yes", "-"]
    assert rows["BraTS-GLI-00001-000"].split() == ["BraTS-GLI-00001-000", "brats2023", "t1", "t2", "flair", "no", "-"]
    assert "two files for t1: C_3_t1.nii and C_3_t1.nii.gz" in rows["C_3"]
    assert lines[-1] == "3 cases: 2 with all four modalities, 1 with problems"


def test_json(cohort, capsys):
    assert main(["cases", str(cohort), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in data] == ["A_1", "BraTS-GLI-00001-000", "C_3"]
    for d in data:
        assert set(d) == {"id", "scheme", "modalities", "seg", "problems", "notes", "folder"}
    a, b, c = data
    assert a["scheme"] == "brats2020" and b["scheme"] == "brats2023"
    assert a["folder"] == str(cohort / "A_1")
    assert a["modalities"] == {m: str(cohort / "A_1" / f"A_1_{m}.nii.gz") for m in ("t1", "t1ce", "t2", "flair")}
    assert a["seg"] == str(cohort / "A_1" / "A_1_seg.nii.gz") and b["seg"] is None
    assert sorted(b["modalities"]) == ["flair", "t1", "t2"]
    assert a["problems"] == [] and len(c["problems"]) == 1


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["cases", str(tmp_path / "empty")]) == 0
    assert "no BraTS cases found" in capsys.readouterr().out
    assert main(["cases", str(tmp_path / "empty"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_nonexistent_root_exits_2_with_one_line(tmp_path, capsys, extra):
    missing = tmp_path / "no_such_folder"
    assert main(["cases", str(missing), *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("mrisynth cases: error: ")
    assert str(missing) in err and "folder not found" in err


def test_root_is_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "f.nii.gz").write_bytes(b"")
    assert main(["cases", str(tmp_path / "f.nii.gz")]) == 2
    assert "expected a folder of cases" in capsys.readouterr().err


def test_missing_argument_is_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["cases"])
    assert info.value.code == 2


def test_through_a_real_process(cohort, tmp_path):
    cmd = [sys.executable, "-m", "mrisynth.cli", "cases", str(cohort), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert [d["id"] for d in json.loads(done.stdout)] == ["A_1", "BraTS-GLI-00001-000", "C_3"]
    bad = subprocess.run(cmd[:4] + [str(tmp_path / "nope")], capture_output=True, text=True, env=env(), timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().endswith("nope: folder not found") and bad.stderr.count("\n") == 1


def test_help_does_not_import_torch():
    code = "import sys, mrisynth.cli; mrisynth.cli.build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_help_lists_the_cases_command(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["cases", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--json" in out and "root" in out
