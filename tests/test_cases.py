"""Case discovery: both naming schemes, nesting, the case-355 quirk, duplicates, missing files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import real_data_or_skip

from mrisynth.cases import Case, discover_cases, find_case, format_table
from mrisynth.errors import DataError, UsageError
from mrisynth.modalities import MODALITIES, SCHEMES


def touch(folder: Path, *names: str) -> Path:
    """Discovery only looks at names: empty files are enough (and fast)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def names_for(case_id: str, scheme: str, mods=(*MODALITIES, "seg"), ext: str = ".nii.gz") -> list[str]:
    return [SCHEMES[scheme].filename(case_id, m, ext) for m in mods]


@pytest.mark.parametrize(
    "case_id, scheme, ext",
    [
        ("BraTS20_Training_001", "brats2020", ".nii"),
        ("Brats18_CBICA_ABM_1", "brats2020", ".nii.gz"),
        ("BraTS-GLI-00000-000", "brats2023", ".nii.gz"),
        ("BraTS-MEN-00004-000", "brats2023", ".nii"),
    ],
)
def test_discovers_both_schemes(tmp_path, case_id, scheme, ext):
    folder = touch(tmp_path / case_id, *names_for(case_id, scheme, ext=ext))
    cases = discover_cases(tmp_path)
    assert len(cases) == 1
    case = cases[0]
    assert (case.id, case.scheme, case.folder) == (case_id, scheme, folder)
    assert case.modalities == {m: folder / SCHEMES[scheme].filename(case_id, m, ext) for m in MODALITIES}
    assert case.seg == folder / SCHEMES[scheme].filename(case_id, "seg", ext)
    assert case.missing == [] and case.problems == []


def test_root_can_be_the_case_folder_itself(case_factory):
    folder = case_factory(case_id="Solo_1")
    case = find_case(folder)
    assert case.id == "Solo_1" and case.folder == folder and not case.missing


def test_kaggle_nesting_and_csv_files_ignored(tmp_path):
    top = tmp_path / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData"
    touch(top, "name_mapping.csv", "survival_info.csv")
    for i in (1, 2, 10):
        cid = f"BraTS20_Training_{i:03d}"
        touch(top / cid, *names_for(cid, "brats2020", ext=".nii"))
    cases = discover_cases(tmp_path)
    assert [c.id for c in cases] == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_010"]
    assert all(c.folder.parent == top and not c.missing and c.seg and not c.problems for c in cases)


def test_brats2020_case_355_segmentation_quirk(tmp_path):
    cid = "BraTS20_Training_355"
    folder = touch(tmp_path / cid, *names_for(cid, "brats2020", MODALITIES, ".nii"), "W39_1998.09.19_Segm.nii")
    touch(tmp_path / "BraTS20_Training_354", *names_for("BraTS20_Training_354", "brats2020", ext=".nii"))
    by_id = {c.id: c for c in discover_cases(tmp_path)}
    assert set(by_id) == {"BraTS20_Training_354", cid}  # the quirky file makes no case of its own
    assert by_id[cid].seg == folder / "W39_1998.09.19_Segm.nii"
    assert by_id[cid].problems == [] and by_id[cid].missing == []


def test_quirky_segmentation_does_not_replace_a_real_one(tmp_path):
    cid = "X"
    folder = touch(tmp_path / cid, *names_for(cid, "brats2020"), "W39_Segm.nii")
    (case,) = discover_cases(tmp_path)
    assert case.seg == folder / "X_seg.nii.gz"
    assert any("W39_Segm.nii" in p for p in case.notes)


def test_unrecognised_nifti_next_to_a_case_is_a_problem(tmp_path):
    touch(tmp_path / "X", *names_for("X", "brats2020", ("t1", "t1ce", "t2")), "X_flari.nii.gz", "notes.txt")
    (case,) = discover_cases(tmp_path)
    assert case.missing == ["flair"]
    assert case.problems == [] and case.notes == ["unrecognised NIfTI file in the folder: X_flari.nii.gz"]


@pytest.mark.parametrize(
    "names, modality",
    [
        (["X_t1.nii", "X_t1.nii.gz"], "t1"),
        (["X_flair.nii.gz", "X_FLAIR.nii.gz"], "flair"),
        (["X_seg.nii", "X_seg.nii.gz"], "seg"),
    ],
)
def test_two_files_for_one_modality_is_a_problem_naming_both(tmp_path, names, modality):
    others = [n for n in names_for("X", "brats2020") if not n.lower().startswith(f"x_{modality}.")]
    touch(tmp_path / "X", *others, *names)
    (case,) = discover_cases(tmp_path)
    assert len(case.problems) == 1
    problem = case.problems[0]
    assert f"two files for {modality}" in problem
    assert all(n in problem for n in names)


def test_mixed_schemes_in_one_case_is_a_problem(tmp_path):
    touch(tmp_path / "X", "X_t1.nii.gz", "X_t1ce.nii.gz", "X_t2.nii.gz", "X-t2f.nii.gz")
    (case,) = discover_cases(tmp_path)
    assert case.scheme == "brats2020" and case.missing == []
    assert any("mixed naming schemes" in p and "X-t2f.nii.gz" in p for p in case.problems)


@pytest.mark.parametrize("absent", MODALITIES)
def test_case_missing_one_modality(tmp_path, absent):
    touch(tmp_path / "X", *names_for("X", "brats2023", [m for m in MODALITIES if m != absent]))
    (case,) = discover_cases(tmp_path)
    assert case.missing == [absent]
    assert absent not in case.modalities and case.seg is None and case.problems == []


def test_missing_lists_in_standard_order(tmp_path):
    touch(tmp_path / "X", "X_t2.nii.gz")
    (case,) = discover_cases(tmp_path)
    assert case.missing == ["t1", "t1ce", "flair"]


def test_two_cases_in_one_folder_and_sorted_ids(tmp_path):
    touch(tmp_path, *names_for("B", "brats2020"), *names_for("A", "brats2020", ("t1",)))
    cases = discover_cases(tmp_path)
    assert [(c.id, len(c.modalities)) for c in cases] == [("A", 1), ("B", 4)]


def test_hidden_files_and_folders_are_skipped(tmp_path):
    """macOS '._X_t1.nii' resource forks and checkpoint folders must not make cases."""
    touch(tmp_path / "X", *names_for("X", "brats2020"), *("._" + n for n in names_for("X", "brats2020")))
    touch(tmp_path / "X" / ".ipynb_checkpoints", *names_for("X", "brats2020"))
    (case,) = discover_cases(tmp_path)
    assert case.id == "X" and case.problems == [] and case.folder == tmp_path / "X"


def test_symlink_loop_does_not_hang(tmp_path):
    touch(tmp_path / "data" / "X", *names_for("X", "brats2020"))
    os.symlink(tmp_path / "data", tmp_path / "data" / "X" / "loop")
    cases = discover_cases(tmp_path / "data")
    assert [c.id for c in cases] == ["X"]


@pytest.mark.parametrize("make", ["missing", "file"])
def test_bad_root_is_a_usage_error(tmp_path, make):
    root = tmp_path / "nope"
    if make == "file":
        root.write_text("x")
    with pytest.raises(UsageError, match="nope") as info:
        discover_cases(root)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_find_case_errors(tmp_path):
    touch(tmp_path / "empty", "readme.txt")
    with pytest.raises(DataError, match="found none"):
        find_case(tmp_path / "empty")
    touch(tmp_path / "two", *names_for("A", "brats2020"), *names_for("B", "brats2020"))
    with pytest.raises(DataError, match=r"expected one case, found 2 \(A, B\)"):
        find_case(tmp_path / "two")
    with pytest.raises(UsageError):
        find_case(tmp_path / "absent")


@pytest.mark.parametrize(
    "scheme, modality, suffix, expected",
    [
        ("brats2020", "flair", "", "X_flair.nii.gz"),
        ("brats2020", "t1ce", "_std", "X_t1ce_std.nii.gz"),
        ("brats2023", "flair", "", "X-t2f.nii.gz"),
        ("brats2023", "t1c", "_std", "X-t1c_std.nii.gz"),
        ("brats2023", "t1", "", "X-t1n.nii.gz"),
    ],
)
def test_output_name_keeps_the_scheme(scheme, modality, suffix, expected):
    case = Case(id="X", scheme=scheme, folder=Path("."))
    assert case.output_name(modality, suffix) == expected


def test_to_json_and_format_table(tmp_path):
    touch(tmp_path / "A", *names_for("A", "brats2020"))
    touch(tmp_path / "Bcase", *names_for("Bcase", "brats2023", ("t1", "t2", "flair")), "Bcase-t1n.nii")
    cases = discover_cases(tmp_path)
    data = json.loads(json.dumps([c.to_json() for c in cases]))
    assert [set(d) for d in data] == [{"id", "scheme", "folder", "modalities", "seg", "problems", "notes"}] * 2
    assert data[0]["modalities"]["t1ce"] == str(tmp_path / "A" / "A_t1ce.nii.gz")
    assert data[0]["seg"] == str(tmp_path / "A" / "A_seg.nii.gz") and data[1]["seg"] is None
    assert data[1]["scheme"] == "brats2023" and len(data[1]["problems"]) == 1

    lines = format_table(cases).splitlines()
    assert lines[0].split() == ["case", "scheme", "modalities", "seg", "problems"]
    assert lines[1].split() == ["A", "brats2020", "t1", "t1ce", "t2", "flair", "yes", "-"]
    assert lines[2].split()[:6] == ["Bcase", "brats2023", "t1", "t2", "flair", "no"]
    assert "two files for t1" in lines[2]
    assert lines[-1] == "2 cases: 1 with all four modalities, 1 with problems"
    # columns line up: the scheme column starts at the same place on every row
    assert len({line.index("brats") for line in lines[1:3]}) == 1


@pytest.mark.realdata
def test_real_brats18_cases():
    root = real_data_or_skip()
    cases = discover_cases(root)
    assert len(cases) == 20
    assert all(not c.missing and c.seg is not None and not c.problems for c in cases)
    assert {c.scheme for c in cases} == {"brats2020"}

