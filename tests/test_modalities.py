"""The modality table: aliases, both BraTS naming schemes, and exact-suffix file-name parsing."""
from __future__ import annotations

import pytest

from mrisynth.modalities import (
    MODALITIES,
    SCHEMES,
    canonical,
    modality_index,
    parse_filename,
    strip_nifti_extension,
)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("t1", "t1"), ("t1ce", "t1ce"), ("t2", "t2"), ("flair", "flair"), ("seg", "seg"),
        ("t1n", "t1"), ("t1c", "t1ce"), ("t2w", "t2"), ("t2f", "flair"),
        ("T1CE", "t1ce"), (" Flair ", "flair"), ("T2F", "flair"),
    ],
)
def test_canonical_accepts_names_and_aliases(name, expected):
    assert canonical(name) == expected


@pytest.mark.parametrize("name", ["t3", "", "t1 ce", "pd", "t1_ce"])
def test_canonical_refuses_unknown_names_listing_valid_ones(name):
    with pytest.raises(ValueError, match="unknown modality") as info:
        canonical(name)
    assert "t1ce" in str(info.value) and "t2f" in str(info.value)


def test_modality_order_and_index():
    assert MODALITIES == ("t1", "t1ce", "t2", "flair")
    assert [modality_index(m) for m in ("t1n", "t1c", "t2w", "t2f")] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "scheme, modality, ext, expected",
    [
        ("brats2020", "t1", ".nii.gz", "X_t1.nii.gz"),
        ("brats2020", "t1ce", ".nii.gz", "X_t1ce.nii.gz"),
        ("brats2020", "t2", ".nii", "X_t2.nii"),
        ("brats2020", "flair", ".nii.gz", "X_flair.nii.gz"),
        ("brats2020", "seg", ".nii.gz", "X_seg.nii.gz"),
        ("brats2020", "t2f", ".nii.gz", "X_flair.nii.gz"),  # an alias in, the scheme's name out
        ("brats2023", "t1", ".nii.gz", "X-t1n.nii.gz"),
        ("brats2023", "t1ce", ".nii.gz", "X-t1c.nii.gz"),
        ("brats2023", "t2", ".nii.gz", "X-t2w.nii.gz"),
        ("brats2023", "flair", ".nii", "X-t2f.nii"),
        ("brats2023", "seg", ".nii.gz", "X-seg.nii.gz"),
        ("brats2023", "t1ce", ".nii.gz", "X-t1c.nii.gz"),
    ],
)
def test_scheme_file_names(scheme, modality, ext, expected):
    assert SCHEMES[scheme].filename("X", modality, ext) == expected


@pytest.mark.parametrize(
    "filename, expected",
    [
        ("X_t1.nii.gz", ("X", "brats2020", "t1")),
        ("X_t1ce.nii.gz", ("X", "brats2020", "t1ce")),
        ("X_t1.nii", ("X", "brats2020", "t1")),
        ("X_t1ce.nii", ("X", "brats2020", "t1ce")),
        ("X_t2.nii.gz", ("X", "brats2020", "t2")),
        ("X_flair.nii.gz", ("X", "brats2020", "flair")),
        ("X_seg.nii.gz", ("X", "brats2020", "seg")),
        ("X-t1n.nii.gz", ("X", "brats2023", "t1")),
        ("X-t1c.nii.gz", ("X", "brats2023", "t1ce")),
        ("X-t2w.nii.gz", ("X", "brats2023", "t2")),
        ("X-t2f.nii.gz", ("X", "brats2023", "flair")),
        ("X-seg.nii", ("X", "brats2023", "seg")),
        ("X_T1CE.NII.GZ", ("X", "brats2020", "t1ce")),
        ("BraTS20_Training_001_t1ce.nii", ("BraTS20_Training_001", "brats2020", "t1ce")),
        ("BraTS20_Training_001_t1.nii", ("BraTS20_Training_001", "brats2020", "t1")),
        ("BraTS-GLI-00000-000-t1c.nii.gz", ("BraTS-GLI-00000-000", "brats2023", "t1ce")),
        ("BraTS-GLI-00000-000-t1n.nii.gz", ("BraTS-GLI-00000-000", "brats2023", "t1")),
        ("Brats18_CBICA_ABM_1_flair.nii.gz", ("Brats18_CBICA_ABM_1", "brats2020", "flair")),
        ("my-case_t2.nii.gz", ("my-case", "brats2020", "t2")),
        ("my_case-t2w.nii.gz", ("my_case", "brats2023", "t2")),
    ],
)
def test_parse_filename(filename, expected):
    assert parse_filename(filename) == expected


@pytest.mark.parametrize(
    "filename",
    [
        "X_t1.txt", "X_t1.nii.gz.bak", "X_t1.csv", "name_mapping.csv", "X_t1.mgz", "X_t1.gz",
        "X_t1ce2.nii.gz",  # not an exact suffix
        "X_t1c.nii.gz",  # 2023 suffix with the 2020 separator
        "X-t1ce.nii.gz",  # 2020 suffix with the 2023 separator
        "X_t1w.nii.gz", "t1.nii.gz", "_t1.nii.gz", "X.nii.gz",
        "W39_1998.09.19_Segm.nii",  # the BraTS 2020 case-355 quirk is handled by discovery, not here
    ],
)
def test_parse_filename_rejects(filename):
    assert parse_filename(filename) is None


def test_t1_never_matches_t1ce():
    """The t1 pattern must not swallow t1ce (and its id must not end in 'ce')."""
    for name in ("A_t1ce.nii.gz", "A_t1ce.nii", "A_t1CE.nii.gz"):
        case_id, _scheme, modality = parse_filename(name)
        assert (case_id, modality) == ("A", "t1ce")
    assert parse_filename("A_t1.nii.gz")[2] == "t1"


@pytest.mark.parametrize(
    "filename, expected",
    [("a.nii.gz", "a"), ("a.nii", "a"), ("a.NII.GZ", "a"), ("a.nii.gz.nii", "a.nii.gz"), ("a.gz", None), ("a", None)],
)
def test_strip_nifti_extension(filename, expected):
    assert strip_nifti_extension(filename) == expected
