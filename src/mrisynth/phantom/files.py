"""Case ids, file names and NIfTI writing for phantom cases, in BraTS 2020 or 2023 naming.

Why its own gzip call: nibabel's default compression level has changed between releases, and
level 9 would make writing the slowest part of a case. Measured for one case's six files:
level 1 takes 0.67 s for 11.8 MB, level 9 2.66 s for 11.2 MB (docs/phantom.md).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from mrisynth.modalities import MODALITIES, SCHEMES
from mrisynth.phantom.anatomy import OUT_AFFINE

COMPRESS_LEVEL = 1
CLEAN_SUFFIX = "_clean"  # flair_clean: "<ID>_flair_clean" / "<ID>-t2f_clean", no modality suffix


def check_naming(naming: str) -> None:
    if naming not in SCHEMES:
        raise ValueError(f"unknown naming '{naming}'. Valid: {', '.join(sorted(SCHEMES))}")


def case_id(number: int, naming: str = "brats2020") -> str:
    """``Phantom_001`` (BraTS 2020 style) or ``Phantom-00001-000`` (BraTS 2023 style)."""
    check_naming(naming)
    if naming == "brats2020":
        return f"Phantom_{number:03d}"
    return f"Phantom-{number:05d}-000"


def file_names(case: str, naming: str = "brats2020") -> dict[str, str]:
    """File name of every output of a case, keyed like ``make_case``'s arrays."""
    check_naming(naming)
    scheme = SCHEMES[naming]
    names = {name: scheme.filename(case, name) for name in (*MODALITIES, "seg")}
    flair_stem = scheme.filename(case, "flair", ext="")
    names["flair_clean"] = f"{flair_stem}{CLEAN_SUFFIX}.nii.gz"
    return names


def save_nifti(array: np.ndarray, path: Path) -> None:
    """Write ``array`` with the BraTS LPS affine (qform and sform code 1), gzip level 1."""
    image = nib.Nifti1Image(array, OUT_AFFINE)
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(OUT_AFFINE, code=1)
    image.set_sform(OUT_AFFINE, code=1)
    with gzip.open(path, "wb", compresslevel=COMPRESS_LEVEL) as stream:
        stream.write(image.to_bytes())


def write_case(arrays: dict[str, np.ndarray], out_dir: Path, case: str, naming: str = "brats2020") -> Path:
    """Write one case into ``out_dir/<ID>/`` and return that folder."""
    folder = Path(out_dir) / case
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in file_names(case, naming).items():
        save_nifti(arrays[key], folder / name)
    return folder
