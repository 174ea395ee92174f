"""Reading NIfTI volumes with validation, and writing float32 NIfTI with the input's geometry.

Every problem with an input file becomes a one-line :class:`DataError` naming the file, what was
expected and what was found. Outputs are written atomically (temporary file in the destination
folder, then rename), so a reader never sees half a volume, and never over an input file.
"""
from __future__ import annotations

import os
import secrets
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import nibabel as nib
import numpy as np

from .errors import DataError, UsageError

#: Refuse volumes with more voxels than this before allocating them (override with MRISYNTH_MAX_VOXELS).
DEFAULT_MAX_VOXELS = 512 * 512 * 512
AFFINE_TOLERANCE = 1e-3


class OutputExistsError(DataError):
    """The output file exists (or was just written by another process) and overwriting was not asked for."""


@dataclass
class Geometry:
    """Where a volume lives in the scanner: enough to write an output that overlays the input."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header
    source: str  # the file the geometry was read from

    @property
    def axcodes(self) -> tuple[str, ...]:
        return tuple(nib.aff2axcodes(self.affine))

    @property
    def zooms(self) -> tuple[float, ...]:
        return tuple(float(z) for z in self.header.get_zooms()[:3])


def max_voxels() -> int:
    """The voxel limit in force (environment variable MRISYNTH_MAX_VOXELS, else the default)."""
    value = os.environ.get("MRISYNTH_MAX_VOXELS", "").strip()
    if not value:
        return DEFAULT_MAX_VOXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise UsageError(f"MRISYNTH_MAX_VOXELS: expected a positive whole number of voxels, found '{value}'")
    return limit


def open_nifti(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI header (no voxel data yet), turning every failure into a one-line DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: expected a NIfTI file, found a folder")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: expected a NIfTI image, found an empty (0-byte) file")
    try:
        img = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, OSError, EOFError, zlib.error,
            ValueError) as exc:
        raise DataError(f"{path}: expected a NIfTI image, could not read its header ({first_line(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: expected a NIfTI image, found {type(img).__name__}")
    return img


def check_shape(path: str | Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """A 3D shape (a trailing singleton 4th axis is accepted), within the voxel limit."""
    dims = tuple(int(s) for s in shape)
    if len(dims) == 4 and dims[3] == 1:
        dims = dims[:3]
    if len(dims) != 3:
        raise DataError(f"{path}: expected a 3D image, found {len(dims)}D with shape {dims}")
    if min(dims) < 1:
        raise DataError(f"{path}: expected a non-empty 3D image, found shape {dims}")
    n_voxels = int(np.prod(dims, dtype=np.int64))
    if n_voxels > max_voxels():
        raise DataError(
            f"{path}: image of shape {dims} has {n_voxels} voxels, more than the limit of "
            f"{max_voxels()} (set MRISYNTH_MAX_VOXELS to raise it)"
        )
    return dims  # type: ignore[return-value]


def check_dtype(path: str | Path, img: nib.Nifti1Image) -> None:
    """Voxels must be real numbers (integers or floats); complex and RGB images are refused."""
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "biuf":
        raise DataError(f"{path}: expected real-valued voxels (integer or float), found data type {dtype}")


def load_volume(path: str | Path, *, allow_constant: bool = False) -> tuple[np.ndarray, Geometry]:
    """Read a 3D image as float32 with its geometry; refuse 2D/4D, truncated, non-finite or flat data."""
    img = open_nifti(path)
    shape = check_shape(path, img.shape)
    check_dtype(path, img)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except (OSError, EOFError, zlib.error, ValueError, TypeError, nib.spatialimages.HeaderDataError) as exc:
        raise DataError(f"{path}: expected {shape} voxels, the file is truncated or corrupt ({first_line(exc)})") from None
    n_bad = int(np.count_nonzero(~np.isfinite(data)))
    if n_bad:
        raise DataError(f"{path}: expected finite values, found {n_bad} NaN or Inf voxels")
    if not allow_constant and float(data.min()) == float(data.max()):
        raise DataError(f"{path}: expected an image, found a constant volume (every voxel = {float(data.min()):g})")
    return data, geometry_of(img, path)


def geometry_of(img: nib.Nifti1Image, path: str | Path) -> Geometry:
    """The geometry of an opened image (a private copy of its header)."""
    shape = check_shape(path, img.shape)
    return Geometry(shape=shape, affine=np.asarray(img.affine, dtype=np.float64), header=img.header.copy(), source=str(path))


def check_same_grid(reference: Geometry, other: Geometry) -> None:
    """All images of a case must share shape, orientation and affine (within 1e-3)."""
    if reference.shape != other.shape:
        raise DataError(
            f"{other.source}: expected shape {reference.shape} like {Path(reference.source).name}, found {other.shape}"
        )
    if reference.axcodes != other.axcodes:
        raise DataError(
            f"{other.source}: expected orientation {''.join(reference.axcodes)} like "
            f"{Path(reference.source).name}, found {''.join(other.axcodes)}"
        )
    diff = float(np.max(np.abs(reference.affine - other.affine)))
    if diff > AFFINE_TOLERANCE:
        raise DataError(
            f"{other.source}: expected the same affine as {Path(reference.source).name} (within {AFFINE_TOLERANCE}), "
            f"found a difference of {diff:.4g}"
        )


def output_header(geometry: Geometry) -> nib.Nifti1Header:
    """A float32 header with the input's affine and qform/sform codes (no int16 scaling left over)."""
    header = geometry.header.copy()
    header.set_data_dtype(np.float32)
    header["scl_slope"] = np.nan
    header["scl_inter"] = np.nan
    return header


def write_volume(
    path: str | Path,
    data: np.ndarray,
    geometry: Geometry,
    *,
    overwrite: bool = False,
    protected: Iterable[str | Path] = (),
) -> Path:
    """Write ``data`` as float32 NIfTI in ``geometry``, atomically; never over an input file.

    ``protected`` lists input files that must not be replaced. An existing output is kept unless
    ``overwrite`` is true.
    """
    path = Path(path)
    if tuple(data.shape) != tuple(geometry.shape):
        raise ValueError(f"volume of shape {data.shape} does not match the geometry {geometry.shape}")
    target = path.resolve()
    for p in protected:
        if Path(p).resolve() == target:
            raise DataError(f"{path}: refusing to write over an input file")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: output exists (use --overwrite to replace it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{path.parent}: could not create the output folder ({exc.strerror or first_line(exc)})") from None
    header = output_header(geometry)
    qform, qcode = geometry.header.get_qform(coded=True)
    sform, scode = geometry.header.get_sform(coded=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), geometry.affine, header=header)
    img.set_qform(qform if qform is not None else geometry.affine, code=int(qcode) if qcode is not None else 1)
    img.set_sform(sform if sform is not None else geometry.affine, code=int(scode) if scode is not None else 1)
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp{suffix}"
    try:
        create_temp_file(tmp)
        nib.save(img, str(tmp))
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_clobber(tmp, path)
    except FileExistsError:  # written meanwhile by another process
        raise OutputExistsError(f"{path}: output exists (use --overwrite to replace it)") from None
    except OSError as exc:
        raise DataError(f"{path}: could not write the output ({exc.strerror or first_line(exc)})") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def create_temp_file(tmp: Path) -> Path:
    """Create an empty temporary file for an atomic write, with mode 0666 minus the umask like any
    new file (mkstemp's 0600 would leave outputs unreadable to the rest of a group)."""
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def temp_path_beside(path: Path) -> Path:
    """A fresh hidden temporary file in ``path``'s folder (same file system: rename is atomic)."""
    return create_temp_file(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")


def _rename_no_clobber(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (FileExistsError), atomically where the
    file system has hard links: another process writing the same output meanwhile is not overwritten."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network or FAT file systems): plain rename
        if os.path.lexists(path):
            raise FileExistsError(str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception message (or its type name), for one-line errors; with
    ``limit``, a long line is cut to its first sentence and then to ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    if limit is not None and len(line) > limit:
        line = line.split(". ")[0][:limit]
    return line


def read_images(paths: dict[str, str | Path]) -> tuple[dict[str, np.ndarray], Geometry]:
    """Read the modalities of one case; they must share one grid. Geometry comes from the first."""
    if not paths:
        raise DataError("expected at least one image, found none")
    volumes: dict[str, np.ndarray] = {}
    reference: Geometry | None = None
    # check all headers before decoding any voxel data: a mismatch costs nothing to find
    headers = {name: geometry_of(open_nifti(p), p) for name, p in paths.items()}
    for geometry in headers.values():
        reference = reference or geometry
        check_same_grid(reference, geometry)
    for name, path in paths.items():
        volumes[name], _ = load_volume(path)
    return volumes, reference  # type: ignore[return-value]


#: The labels a BraTS segmentation may hold, by naming scheme: 2018-2021 use 1 necrosis, 2 oedema,
#: 4 enhancing tumour; 2023+ renumbered enhancing tumour to 3.
BRATS_LABELS: dict[str, tuple[int, ...]] = {"brats2020": (0, 1, 2, 4), "brats2023": (0, 1, 2, 3)}


def label_problem(path: str | Path, data: np.ndarray, allowed: Iterable[int]) -> str | None:
    """One line naming ``path`` when ``data`` holds values outside the label set ``allowed``, else None.

    Non-integer values (a segmentation resampled with interpolation) are outside any label set.
    """
    allowed = tuple(sorted(int(a) for a in allowed))
    values = np.unique(data)
    bad = values[~np.isin(values, np.asarray(allowed, dtype=values.dtype))]
    if bad.size == 0:
        return None
    shown = ", ".join(f"{float(v):g}" for v in bad[:6]) + (f", ... ({bad.size} values)" if bad.size > 6 else "")
    n_voxels = int(np.count_nonzero(~np.isin(data, np.asarray(allowed, dtype=data.dtype))))
    return (
        f"{path}: expected segmentation labels {{{', '.join(map(str, allowed))}}}, "
        f"found {shown} in {n_voxels} voxel{'s' if n_voxels != 1 else ''}"
    )


def read_segmentation(
    path: str | Path,
    geometry: Geometry,
    *,
    labels: Iterable[int] | None = None,
    strict: bool = False,
    warn: Callable[[str], None] | None = None,
) -> np.ndarray:
    """A label volume on the case's grid, as int16 (a constant, tumour-free one is allowed).

    With ``labels`` (e.g. ``BRATS_LABELS[case.scheme]``), values outside that set are reported:
    a :class:`DataError` when ``strict``, else one line passed to ``warn`` (default: stderr).
    """
    check_same_grid(geometry, geometry_of(open_nifti(path), path))  # from the header: nothing decoded for a wrong grid
    data, _ = load_volume(path, allow_constant=True)
    if labels is not None:
        problem = label_problem(path, data, labels)
        if problem and strict:
            raise DataError(problem)
        if problem:
            (warn or _print_warning)(problem)
    return np.rint(data).astype(np.int16)


def _print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
