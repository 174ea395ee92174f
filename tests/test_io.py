"""Validated NIfTI reading (one-line DataErrors naming the file) and atomic float32 writing."""
from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrisynth import io
from mrisynth.errors import DataError, UsageError
from mrisynth.io import load_volume, read_images, read_segmentation, write_volume

AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
SHAPE = (12, 10, 8)


def volume(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 100, shape).astype(np.float32)


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE, qcode: int = 2, scode: int = 1) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return path


def expect_data_error(path: Path, match: str, **kw) -> str:
    with pytest.raises(DataError, match=match) as info:
        load_volume(path, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    assert info.value.exit_code == 1
    return message


# --------------------------------------------------------------------------- reading: bad inputs


def test_missing_file(tmp_path):
    expect_data_error(tmp_path / "absent_t1.nii.gz", "file not found")


def test_folder_instead_of_file(tmp_path):
    (tmp_path / "x.nii.gz").mkdir()
    expect_data_error(tmp_path / "x.nii.gz", "found a folder")


@pytest.mark.parametrize("name", ["empty.nii", "empty.nii.gz"])
def test_zero_byte_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    expect_data_error(tmp_path / name, "empty")


@pytest.mark.parametrize("name", ["text.nii.gz", "text.nii", "tiny.nii"])
def test_not_nifti(tmp_path, name):
    (tmp_path / name).write_text("this is not an image\n" * (30 if name.startswith("text") else 1))
    expect_data_error(tmp_path / name, "expected a NIfTI image")


def test_corrupt_header_field(tmp_path):
    """A header whose data type code is garbage (nibabel raises HeaderDataError)."""
    path = save(tmp_path / "x.nii", volume())
    raw = bytearray(path.read_bytes())
    raw[70:72] = (1234).to_bytes(2, "little")  # datatype field
    path.write_bytes(bytes(raw))
    expect_data_error(path, "expected a NIfTI image")


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_truncated_file(tmp_path, ext):
    path = save(tmp_path / f"x{ext}", volume((30, 30, 30)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    expect_data_error(path, "truncated or corrupt")


@pytest.mark.parametrize("shape, found", [((10, 10), "2D"), ((10, 10, 5, 2), "4D"), ((4, 4, 4, 1, 2), "5D")])
def test_wrong_dimensionality(tmp_path, shape, found):
    path = save(tmp_path / "x.nii.gz", np.random.default_rng(0).random(shape).astype(np.float32))
    message = expect_data_error(path, "expected a 3D image")
    assert found in message


def test_trailing_singleton_4th_axis_accepted(tmp_path):
    data = volume()
    path = save(tmp_path / "x.nii.gz", data[..., None])
    out, geometry = load_volume(path)
    assert out.shape == SHAPE and geometry.shape == SHAPE
    np.testing.assert_array_equal(out, data)


@pytest.mark.parametrize("bad, count", [(np.nan, 3), (np.inf, 2), (-np.inf, 1)])
def test_non_finite_voxels(tmp_path, bad, count):
    data = volume()
    data.flat[[5, 17, 99][:count]] = bad
    path = save(tmp_path / "x.nii.gz", data)
    message = expect_data_error(path, "NaN or Inf")
    assert f"found {count} " in message


@pytest.mark.parametrize("value", [0.0, 7.5])
def test_constant_volume(tmp_path, value):
    path = save(tmp_path / "x.nii.gz", np.full(SHAPE, value, dtype=np.float32))
    expect_data_error(path, "constant volume")
    data, _ = load_volume(path, allow_constant=True)  # segmentations may be constant
    assert np.all(data == value)


@pytest.mark.parametrize("dtype", [np.complex64])
def test_complex_voxels_refused(tmp_path, dtype):
    path = save(tmp_path / "x.nii", (volume() + 1j).astype(dtype))
    expect_data_error(path, "real-valued")


def test_rgb_voxels_refused(tmp_path):
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "x.nii"
    nib.save(nib.Nifti1Image(rgb, AFFINE), str(path))
    expect_data_error(path, "real-valued")


def test_voxel_limit(tmp_path, monkeypatch):
    path = save(tmp_path / "x.nii.gz", volume())
    monkeypatch.setenv("MRISYNTH_MAX_VOXELS", str(int(np.prod(SHAPE)) - 1))
    message = expect_data_error(path, "more than the limit")
    assert "MRISYNTH_MAX_VOXELS" in message
    monkeypatch.setenv("MRISYNTH_MAX_VOXELS", str(int(np.prod(SHAPE))))
    assert load_volume(path)[0].shape == SHAPE


def tiny_file_with_huge_header(path: Path, shape) -> Path:
    """A valid header declaring ``shape`` followed by a few bytes: reading its voxels would fail."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    with open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\1" * 64)
    return path


def test_voxel_limit_checked_before_reading_voxels(tmp_path, monkeypatch):
    path = tiny_file_with_huge_header(tmp_path / "huge.nii", (2000, 2000, 1000))
    assert path.stat().st_size < 1000
    # the default limit refuses it from the header alone (reading would say "truncated")
    expect_data_error(path, "4000000000 voxels, more than the limit")
    monkeypatch.setenv("MRISYNTH_MAX_VOXELS", "100")
    small = tiny_file_with_huge_header(tmp_path / "small.nii", (5, 5, 5))
    expect_data_error(small, "125 voxels, more than the limit of 100")
    # and under the limit the same kind of file is read, and found truncated
    monkeypatch.setenv("MRISYNTH_MAX_VOXELS", "1000")
    expect_data_error(small, "truncated")


def test_voxel_limit_checked_before_decoding_in_read_images(tmp_path, monkeypatch):
    path = save(tmp_path / "x.nii.gz", volume())
    monkeypatch.setenv("MRISYNTH_MAX_VOXELS", "10")
    monkeypatch.setattr(io, "load_volume", lambda *a, **k: pytest.fail("decoded voxels over the limit"))
    with pytest.raises(DataError, match="more than the limit"):
        read_images({"t1": path})


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1e9"])
def test_bad_voxel_limit_setting_is_a_usage_error(tmp_path, monkeypatch, value):
    path = save(tmp_path / "x.nii.gz", volume())
    monkeypatch.setenv("MRISYNTH_MAX_VOXELS", value)
    with pytest.raises(UsageError, match="MRISYNTH_MAX_VOXELS"):
        load_volume(path)


# --------------------------------------------------------------------------- reading: good inputs


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.float32, np.float64])
@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_accepted_dtypes_and_extensions(tmp_path, dtype, ext):
    data = np.random.default_rng(1).integers(0, 200, SHAPE).astype(dtype)
    path = save(tmp_path / f"x{ext}", data)
    out, geometry = load_volume(path)
    assert out.dtype == np.float32 and out.shape == SHAPE
    np.testing.assert_array_equal(out, data.astype(np.float32))
    np.testing.assert_array_equal(geometry.affine, AFFINE)
    assert geometry.axcodes == ("L", "P", "S") and geometry.source == str(path)
    assert geometry.zooms == (1.0, 1.0, 1.0)


def test_scaled_int16_is_read_with_its_scaling(tmp_path):
    data = np.random.default_rng(2).integers(0, 1000, SHAPE).astype(np.int16)
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, str(tmp_path / "x.nii.gz"))
    out, _ = load_volume(tmp_path / "x.nii.gz")
    np.testing.assert_allclose(out, data * 0.5 + 10.0)


# --------------------------------------------------------------------------- one grid per case


def write_pair(tmp_path, second_affine=AFFINE, second_shape=SHAPE) -> dict[str, Path]:
    return {
        "t1": save(tmp_path / "X_t1.nii.gz", volume()),
        "t2": save(tmp_path / "X_t2.nii.gz", volume(second_shape, seed=1), second_affine),
    }


def shifted(dx: float) -> np.ndarray:
    affine = AFFINE.copy()
    affine[0, 3] += dx
    return affine


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"second_shape": (12, 10, 9)}, r"expected shape \(12, 10, 8\) like X_t1.nii.gz, found \(12, 10, 9\)"),
        ({"second_affine": shifted(0.01)}, "expected the same affine as X_t1.nii.gz"),
        ({"second_affine": np.diag([1.0, -1, 1, 1])}, "expected orientation LPS like X_t1.nii.gz, found RPS"),
    ],
)
def test_read_images_refuses_mismatched_grids(tmp_path, monkeypatch, kw, match):
    paths = write_pair(tmp_path, **kw)
    # the headers are compared before any voxel data is decoded
    monkeypatch.setattr(io, "load_volume", lambda *a, **k: pytest.fail("decoded before checking headers"))
    with pytest.raises(DataError, match=match) as info:
        read_images(paths)
    assert str(paths["t2"]) in str(info.value) and "\n" not in str(info.value)


def test_read_images_accepts_affines_within_tolerance(tmp_path):
    paths = write_pair(tmp_path, second_affine=shifted(0.0004))
    volumes, geometry = read_images(paths)
    assert set(volumes) == {"t1", "t2"} and geometry.source == str(paths["t1"])
    np.testing.assert_array_equal(volumes["t1"], volume())


def test_read_images_empty_and_bad_member(tmp_path):
    with pytest.raises(DataError, match="at least one"):
        read_images({})
    paths = write_pair(tmp_path)
    paths["t2"].write_bytes(b"")
    with pytest.raises(DataError, match="X_t2.nii.gz"):
        read_images(paths)


def test_read_segmentation(tmp_path):
    paths = write_pair(tmp_path)
    _, geometry = read_images(paths)
    labels = np.zeros(SHAPE, dtype=np.float32)
    labels[2:4, 2:4, 2:4] = 4
    seg = read_segmentation(save(tmp_path / "X_seg.nii.gz", labels), geometry)
    assert seg.dtype == np.int16 and seg.max() == 4
    empty = read_segmentation(save(tmp_path / "X0_seg.nii.gz", np.zeros(SHAPE, np.float32)), geometry)
    assert not empty.any()  # a tumour-free segmentation is fine
    with pytest.raises(DataError, match="expected shape"):
        read_segmentation(save(tmp_path / "Xb_seg.nii.gz", np.zeros((3, 3, 3), np.float32)), geometry)


# --------------------------------------------------------------------------- writing


@pytest.fixture
def source(tmp_path) -> tuple[Path, io.Geometry]:
    """A BraTS-like int16 input with qform code 2, sform code 1 and an int16 scaling."""
    data = np.random.default_rng(3).integers(0, 1000, SHAPE).astype(np.int16)
    img = nib.Nifti1Image(data, AFFINE)
    img.set_qform(AFFINE, code=2)
    img.set_sform(AFFINE, code=1)
    img.header.set_slope_inter(2.0, 1.0)
    path = tmp_path / "in" / "X_t1.nii.gz"
    path.parent.mkdir()
    nib.save(img, str(path))
    _, geometry = load_volume(path)
    return path, geometry


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_write_keeps_geometry_and_values(tmp_path, source, ext):
    _, geometry = source
    data = np.random.default_rng(4).normal(0, 1, SHAPE).astype(np.float32)
    out = write_volume(tmp_path / "out" / f"X_flair{ext}", data, geometry)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.float32
    assert img.header.get_qform(coded=True)[1] == 2 and img.header.get_sform(coded=True)[1] == 1
    np.testing.assert_array_equal(img.affine, geometry.affine)
    np.testing.assert_array_equal(img.header.get_qform(), AFFINE)
    # no int16 scaling leaks from the input header: values come back exactly
    slope, inter = img.header.get_slope_inter()
    assert slope in (None, 1.0) and inter in (None, 0.0)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    back, back_geometry = load_volume(out)
    np.testing.assert_array_equal(back, data)
    assert back_geometry.shape == SHAPE and back_geometry.zooms == geometry.zooms


def test_write_casts_to_float32(tmp_path, source):
    _, geometry = source
    data = np.arange(np.prod(SHAPE), dtype=np.float64).reshape(SHAPE)
    out = write_volume(tmp_path / "X_flair.nii.gz", data, geometry)
    assert nib.load(str(out)).get_data_dtype() == np.float32
    np.testing.assert_array_equal(load_volume(out)[0], data.astype(np.float32))


def test_write_refuses_wrong_shape(tmp_path, source):
    with pytest.raises(ValueError, match="does not match"):
        write_volume(tmp_path / "X_flair.nii.gz", np.zeros((3, 3, 3), np.float32), source[1])


def test_write_refuses_to_overwrite_unless_asked(tmp_path, source):
    _, geometry = source
    target = tmp_path / "X_flair.nii.gz"
    target.write_bytes(b"keep me")
    with pytest.raises(DataError, match="output exists") as info:
        write_volume(target, volume(), geometry)
    assert str(target) in str(info.value)
    assert target.read_bytes() == b"keep me"
    write_volume(target, volume(), geometry, overwrite=True)
    np.testing.assert_array_equal(load_volume(target)[0], volume())


def test_write_never_over_a_protected_input(tmp_path, source):
    src, geometry = source
    before = src.read_bytes()
    for target in (src, src.parent / ".." / "in" / src.name):
        with pytest.raises(DataError, match="refusing to write over an input file"):
            write_volume(target, volume(), geometry, overwrite=True, protected=[src])
    # also through a symbolic link to the input
    link = tmp_path / "link.nii.gz"
    link.symlink_to(src)
    with pytest.raises(DataError, match="input file"):
        write_volume(link, volume(), geometry, overwrite=True, protected=[str(src)])
    assert src.read_bytes() == before


def test_write_leaves_no_temporary_files(tmp_path, source):
    _, geometry = source
    out_dir = tmp_path / "out"
    write_volume(out_dir / "X_flair.nii.gz", volume(), geometry)
    write_volume(out_dir / "X_flair.nii.gz", volume(seed=2), geometry, overwrite=True)
    assert sorted(p.name for p in out_dir.iterdir()) == ["X_flair.nii.gz"]


def test_written_file_has_ordinary_permissions(tmp_path, source):
    """Not the 0600 of a private temporary file: the umask decides, as for any new file."""
    _, geometry = source
    old = os.umask(0o022)
    try:
        out = write_volume(tmp_path / "X_flair.nii.gz", volume(), geometry)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def half_save_then_fail(img, filename):
    """Stand-in for nib.save that dies half way, like a full disk."""
    with open(filename, "wb") as f:
        f.write(gzip.compress(b"\0" * 4000)[:50])
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("existing", [False, True])
def test_write_is_atomic(tmp_path, source, monkeypatch, existing):
    _, geometry = source
    out_dir = tmp_path / "out"
    target = out_dir / "X_flair.nii.gz"
    if existing:
        write_volume(target, volume(), geometry)
    monkeypatch.setattr(io.nib, "save", half_save_then_fail)
    with pytest.raises(DataError, match="could not write the output") as info:
        write_volume(target, volume(seed=5), geometry, overwrite=True)
    assert str(target) in str(info.value) and "No space left" in str(info.value)
    monkeypatch.undo()
    if existing:  # the previous output is intact
        np.testing.assert_array_equal(load_volume(target)[0], volume())
    else:
        assert not target.exists()
    assert [p.name for p in out_dir.iterdir()] == (["X_flair.nii.gz"] if existing else [])


def test_write_other_failures_leave_nothing(tmp_path, source, monkeypatch):
    _, geometry = source

    def boom(img, filename):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(io.nib, "save", boom)
    with pytest.raises(RuntimeError):
        write_volume(tmp_path / "X_flair.nii.gz", volume(), geometry)
    assert list(tmp_path.glob("*flair*")) == [] and list(tmp_path.glob(".*")) == []


def test_write_into_unwritable_place_is_a_data_error(tmp_path, source):
    _, geometry = source
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="could not create the output folder"):
        write_volume(blocker / "sub" / "X_flair.nii.gz", volume(), geometry)
