"""Normal anatomy of a phantom case: the ICBM 2009a tissue maps, placed and deformed per case.

Why a template and not geometric shapes: a synthesis model trained or tested on the phantom must
see real cortical folding, ventricles and deep grey matter, or its numbers say nothing about
brains. The template (``data/icbm152_2009a.npz.xz``: an ``.npz`` compressed with xz, made once by
``scripts/make_phantom_template.py``) holds uint8 CSF/GM/WM probabilities on a 1 mm MNI grid.

Each case maps every output voxel ``v`` of the BraTS-like grid to a template voxel::

    template_voxel = B @ v + u(v)

where ``B`` (4x4) chains the output affine (LPS voxel -> RAS mm), a small random affine (rotation,
scale, shift) about the brain centre, and the template's inverse affine, and ``u`` is a smooth
random displacement of a few mm. Because both affines map to RAS millimetres, left/right and
anterior/posterior come out right by construction for the LPS output affine.
"""
from __future__ import annotations

import io
import lzma
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

OUT_SHAPE: tuple[int, int, int] = (240, 240, 155)
# BraTS stores LPS: voxel i grows to the left, j to posterior, k to superior (1 mm voxels).
OUT_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
TISSUES: tuple[str, ...] = ("csf", "gm", "wm")
TEMPLATE_FILE = Path(__file__).parent / "data" / "icbm152_2009a.npz.xz"

# The MNI152 brain is larger than an average adult brain (it was affinely matched to MNI305);
# 0.93 brings it to ~135 x 168 mm (left-right x anterior-posterior), like BraTS brains.
BASE_SCALE = 0.93
TOP_SLICE = 144.0  # output slice of the brain's superior edge at BASE_SCALE: a 10 mm margin
COARSE_STEP = 4  # voxels between the nodes of the coarse displacement grid
BOX_MARGIN = 12  # voxels around the brain's box: room for deformation and mass effect

# Tumour sites: white matter (p > 0.5), >= 20 mm from the brain surface, above MNI z = 0 mm,
# which keeps them in the cerebrum (the cerebellum and brain stem lie below it).
SITE_MIN_WM = 128
SITE_MIN_DEPTH_MM = 20.0
SITE_MIN_Z_MM = 0.0
# Output voxels farther than this from any template brain voxel are skipped when sampling.
NEAR_BRAIN_MM = 10.0


@dataclass(frozen=True)
class Template:
    """Tissue maps (uint8, 0-255) on the template grid, with the geometry the cases need."""

    maps: dict[str, np.ndarray]
    affine: np.ndarray  # template voxel -> MNI RAS mm
    brain_box: tuple[np.ndarray, np.ndarray]  # first and last template voxel of the brain
    center_mm: np.ndarray  # centre of the brain's bounding box, RAS mm
    top_mm: float  # superior edge of the brain, RAS z mm
    sites: np.ndarray  # (n, 3) template voxels where a tumour may be centred
    near_brain: np.ndarray  # bool on every 2nd template voxel: within NEAR_BRAIN_MM of brain


@dataclass(frozen=True)
class Placement:
    """Per-case random affine and deformation settings (scalars only: cheap to draw)."""

    rotation_deg: tuple[float, float, float]
    scale: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    warp_mm: float  # largest length of the smooth displacement
    warp_sigma_mm: float  # smoothness of the displacement


def _mirror(half: np.ndarray) -> np.ndarray:
    """Rebuild a full map from its right half (midline plane first), as the script stored it."""
    return np.concatenate([half[:0:-1], half], axis=0)


@lru_cache(maxsize=1)
def load_template() -> Template:
    """Load the packaged template once per process (about 0.5 s, mostly the site search)."""
    with np.load(io.BytesIO(lzma.decompress(TEMPLATE_FILE.read_bytes()))) as data:  # xz: 0.1 s
        maps = {name: np.ascontiguousarray(_mirror(data[name])) for name in TISSUES}
        affine = np.array(data["affine"], dtype=np.float64)
    brain = (maps["csf"].astype(np.int16) + maps["gm"] + maps["wm"]) >= 128
    idx = np.argwhere(brain)
    lo_mm = _voxel_to_mm(affine, idx.min(0))
    hi_mm = _voxel_to_mm(affine, idx.max(0))
    return Template(
        maps=maps,
        affine=affine,
        brain_box=(idx.min(0), idx.max(0)),
        center_mm=(lo_mm + hi_mm) / 2.0,
        top_mm=float(hi_mm[2]),
        sites=_tumour_sites(maps["wm"], brain, affine),
        near_brain=ndimage.distance_transform_edt(~brain[::2, ::2, ::2], sampling=2.0) <= NEAR_BRAIN_MM,
    )


def _voxel_to_mm(affine: np.ndarray, voxel: np.ndarray) -> np.ndarray:
    """RAS mm of voxel index vectors: one (3,) or many (n, 3)."""
    return np.asarray(voxel, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def _tumour_sites(wm: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Template voxels deep in cerebral white matter (every 2nd voxel: plenty, and cheap)."""
    depth = ndimage.distance_transform_edt(brain[::2, ::2, ::2], sampling=2.0)
    idx = np.argwhere((wm[::2, ::2, ::2] >= SITE_MIN_WM) & (depth >= SITE_MIN_DEPTH_MM)) * 2
    z_mm = _voxel_to_mm(affine, idx)[:, 2]
    return idx[z_mm >= SITE_MIN_Z_MM]


def draw_placement(rng: np.random.Generator) -> Placement:
    """Random pose and size: +-5 deg rotations, +-5 % scale per axis, +-3 mm shift, 2.5-4 mm warp."""
    return Placement(
        rotation_deg=tuple(float(a) for a in rng.uniform(-5.0, 5.0, 3)),
        scale=tuple(float(s) for s in BASE_SCALE * rng.uniform(0.95, 1.05, 3)),
        shift_mm=tuple(float(t) for t in rng.uniform(-3.0, 3.0, 3)),
        warp_mm=float(rng.uniform(2.5, 4.0)),
        warp_sigma_mm=float(rng.uniform(10.0, 14.0)),
    )


def output_center_mm(template: Template) -> np.ndarray:
    """RAS mm of the output point where the template's brain centre lands (before the random pose).

    x, y: the middle of the 240 x 240 plane; z: such that the top of the brain is at TOP_SLICE
    for the base scale, so the brain stem (cut in the template) runs out at the bottom slices.
    """
    k = TOP_SLICE - BASE_SCALE * (template.top_mm - template.center_mm[2])
    center_voxel = np.array([(OUT_SHAPE[0] - 1) / 2.0, (OUT_SHAPE[1] - 1) / 2.0, k])
    return OUT_AFFINE[:3, :3] @ center_voxel + OUT_AFFINE[:3, 3]


def sampling_matrix(template: Template, placement: Placement) -> np.ndarray:
    """4x4 map from an output voxel to the template voxel it shows (affine part only).

    In mm: ``q = c_t + M^-1 (p - c_o - shift)``, with ``M = R @ diag(scale)`` the case's pose.
    """
    rotation = Rotation.from_euler("xyz", placement.rotation_deg, degrees=True).as_matrix()
    pose = rotation @ np.diag(placement.scale)
    world_to_template = np.eye(4)
    world_to_template[:3, :3] = np.linalg.inv(pose)
    offset = output_center_mm(template) + np.array(placement.shift_mm)
    world_to_template[:3, 3] = template.center_mm - world_to_template[:3, :3] @ offset
    return np.linalg.inv(template.affine) @ world_to_template @ OUT_AFFINE


def output_box(template: Template, matrix: np.ndarray) -> tuple[slice, slice, slice]:
    """Output region that can hold brain: the template's brain box mapped out, plus a margin."""
    lo, hi = template.brain_box
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    out = (np.linalg.inv(matrix) @ corners.T)[:3]
    start = np.maximum(np.floor(out.min(1)).astype(int) - BOX_MARGIN, 0)
    stop = np.minimum(np.ceil(out.max(1)).astype(int) + 1 + BOX_MARGIN, OUT_SHAPE)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))  # type: ignore[return-value]


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, step: int) -> np.ndarray:
    """Smooth Gaussian random field (float32, zero mean, unit std) on a 3-D ``shape``.

    White noise on nodes ``step`` voxels apart (reaching 2 sigma past the edges) is spread with
    a Gaussian kernel of width ``sigma`` voxels, one axis at a time (three small matrix
    products), evaluated on every 2nd voxel and linearly upsampled: the field varies over
    ``sigma`` >= 5 voxels, so nothing is lost. Why not ``ndimage.gaussian_filter`` on a
    full-size noise volume: with sigma ~12 voxels over 5 M voxels that takes seconds.
    """
    half_shape = tuple((n + 1) // 2 + 1 for n in shape)
    weights = []
    for n_half in half_shape:
        nodes = np.arange(-2.0 * sigma, 2 * n_half + 2.0 * sigma + step, step, dtype=np.float32)
        offset = 2.0 * np.arange(n_half, dtype=np.float32)[:, None] - nodes[None, :]
        weights.append(np.exp(-0.5 * (offset / np.float32(sigma)) ** 2))
    coarse = rng.standard_normal(tuple(w.shape[1] for w in weights)).astype(np.float32)
    field = coarse @ weights[2].T  # (m0, m1, h2)
    field = np.matmul(weights[1], field)  # (m0, h1, h2)
    field = (weights[0] @ field.reshape(field.shape[0], -1)).reshape(half_shape)
    field = _upsample2(field, shape)
    field -= np.float32(field.mean())
    field /= np.float32(max(float(field.std()), 1e-6))
    return field


def _upsample2(field: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear upsampling by 2 along every axis (even voxels copied, odd ones averaged), cropped."""
    for axis, n in enumerate(shape):
        size = field.shape[axis]
        out_shape = list(field.shape)
        out_shape[axis] = 2 * size - 1
        out = np.empty(out_shape, dtype=field.dtype)
        even, odd, first, rest = ([slice(None)] * field.ndim for _ in range(4))
        even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
        first[axis], rest[axis] = slice(0, size - 1), slice(1, size)
        out[tuple(even)] = field
        np.add(field[tuple(first)], field[tuple(rest)], out=out[tuple(odd)])
        out[tuple(odd)] *= np.float32(0.5)
        keep = [slice(None)] * field.ndim
        keep[axis] = slice(0, n)
        field = out[tuple(keep)]
    return np.ascontiguousarray(field)


def random_displacement(
    rng: np.random.Generator, shape: tuple[int, int, int], placement: Placement
) -> list[np.ndarray]:
    """Smooth displacement (template voxels = mm) whose longest vector is ``placement.warp_mm``."""
    fields = [smooth_noise(rng, shape, placement.warp_sigma_mm, COARSE_STEP) for _ in range(3)]
    length = np.sqrt(sum(f * f for f in fields))
    factor = np.float32(placement.warp_mm / max(float(length.max()), 1e-6))
    return [f * factor for f in fields]


def sampling_coordinates(
    matrix: np.ndarray, box: tuple[slice, slice, slice], displacement: list[np.ndarray]
) -> list[np.ndarray]:
    """Template voxel coordinates of every output voxel in ``box`` (three float32 arrays)."""
    axes = [np.arange(s.start, s.stop, dtype=np.float32) for s in box]
    i, j, k = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    coords = []
    for d in range(3):
        m = matrix[d].astype(np.float32)
        coords.append(m[0] * i + m[1] * j + m[2] * k + m[3] + displacement[d])
    return coords


def warp_tissues(template: Template, coords: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Tissue fractions (float32, 0-1) at the output voxels (trilinear: order 1).

    Only voxels that may hold brain are interpolated (about 45 % of the box): a voxel is kept
    when the node of a 4-voxel lattice at or below it lands within NEAR_BRAIN_MM of the
    template's brain. The margin covers the node's distance (up to 3*sqrt(3) output voxels,
    ~6 template mm at the smallest scale) plus the lookup's 2 mm rounding; checked in
    tests/test_phantom.py against interpolating every voxel.
    """
    keep = _may_hold_brain(template, coords)
    points = [c[keep] for c in coords]
    out = {}
    for name in TISSUES:
        values = ndimage.map_coordinates(template.maps[name], points, order=1, output=np.float32, cval=0.0)
        full = np.zeros(keep.shape, dtype=np.float32)
        full[keep] = values * np.float32(1.0 / 255.0)
        out[name] = full
    return out


def _may_hold_brain(template: Template, coords: list[np.ndarray]) -> np.ndarray:
    """Boolean mask of the output voxels to interpolate (see ``warp_tissues``)."""
    lattice = tuple(slice(0, None, 4) for _ in range(3))
    near = template.near_brain
    # nodes past the template's edge look up the nearest edge voxel: their blocks may reach in
    index = [np.clip(np.rint(c[lattice] / 2.0).astype(np.int64), 0, n - 1) for c, n in zip(coords, near.shape)]
    nodes = near[index[0], index[1], index[2]]
    blocks = nodes.repeat(4, axis=0).repeat(4, axis=1).repeat(4, axis=2)
    shape = coords[0].shape
    return blocks[: shape[0], : shape[1], : shape[2]]


def template_to_output(matrix: np.ndarray, template_voxel: np.ndarray) -> np.ndarray:
    """Output voxel (float) that the affine part maps onto ``template_voxel``."""
    point = np.append(np.asarray(template_voxel, dtype=np.float64), 1.0)
    return (np.linalg.inv(matrix) @ point)[:3]
