"""Glioma-like lesion of a phantom case: shape, sub-regions, oedema, mass effect and labels.

Why this shape model: BraTS labels three sub-regions (necrotic / non-enhancing core, peritumoral
oedema, enhancing tumour) and a synthesis model is judged inside them, so the phantom must have
all three with plausible geometry: a lumpy ellipsoid 10-35 mm across, a necrotic centre inside an
enhancing rim (or a solid enhancing mass, or a non-enhancing low-grade-like mass), and oedema that
spreads 5-25 mm, mostly through white matter, while the mass pushes the tissue around it away.

Lesion classes take their fraction of each voxel from the normal tissue fractions (partial
volume at every border), so the physics can mix signals voxel by voxel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from mrisynth.phantom.anatomy import SITE_MIN_WM, Template, smooth_noise, template_to_output

KINDS: tuple[str, ...] = ("necrotic", "solid", "low_grade")
KIND_PROBABILITIES: tuple[float, ...] = (0.55, 0.15, 0.30)
MIN_DIAMETER_MM = 10.0
MAX_DIAMETER_MM = 35.0
SHAPE_SIGMA_MM = 5.0  # size of the boundary's lumps
EDEMA_RAMP_MM = 4.0  # width of the oedema's fading edge
# label values in the BraTS 2020 convention; the 2023 one numbers enhancing tumour 3
LABEL_NECROTIC = 1
LABEL_EDEMA = 2
LABEL_ENHANCING = 4


@dataclass(frozen=True)
class TumourPlan:
    """Per-case tumour settings (scalars only: drawn before any array exists)."""

    kind: str  # "necrotic" (core + enhancing rim), "solid" (all enhancing), "low_grade" (no enhancement)
    diameters_mm: tuple[float, float, float]
    orientation: tuple[float, float, float, float]  # quaternion of the ellipsoid's axes
    necrosis_ratio: float  # core radius / lesion radius (necrotic kind)
    lumpiness: float  # relative boundary deformation
    edema_mm: float  # how far oedema reaches beyond the lesion
    edema_gm_weight: float  # oedema in grey matter relative to white matter
    mass_effect_mm: float  # largest push of the surrounding tissue (0: none)

    @property
    def radius_mm(self) -> float:
        return float(np.mean(self.diameters_mm) / 2.0)


def draw_tumour(rng: np.random.Generator) -> TumourPlan:
    """Random tumour: kind, ellipsoid 10-35 mm per axis, oedema 5-25 mm, mass effect in 70 %."""
    kind = str(rng.choice(KINDS, p=KIND_PROBABILITIES))
    mean_diameter = rng.uniform(13.0, 29.0)  # lumps change the volume: margin to 10 and 35 mm
    diameters = np.clip(mean_diameter * rng.uniform(0.75, 1.25, 3), MIN_DIAMETER_MM, MAX_DIAMETER_MM)
    orientation = Rotation.random(random_state=rng).as_quat()
    has_mass_effect = rng.uniform() < 0.7
    radius = float(diameters.mean() / 2.0)
    return TumourPlan(
        kind=kind,
        diameters_mm=tuple(float(d) for d in diameters),
        orientation=tuple(float(q) for q in orientation),
        necrosis_ratio=float(rng.uniform(0.45, 0.8)),
        lumpiness=float(rng.uniform(0.08, 0.2)),
        edema_mm=float(rng.uniform(5.0, 25.0)),
        edema_gm_weight=float(rng.uniform(0.15, 0.35)),
        mass_effect_mm=float(rng.uniform(0.15, 0.45) * radius) if has_mass_effect else 0.0,
    )


def choose_site(
    rng: np.random.Generator,
    template: Template,
    matrix: np.ndarray,
    coords: list[np.ndarray],
    box: tuple[slice, slice, slice],
) -> np.ndarray:
    """Output voxel (float) of the lesion centre: a template white-matter site, mapped out.

    The template's candidate sites are already deep cerebral white matter; the affine part is
    inverted exactly and the displacement by one fixed-point step, then the warped tissue at the
    site is checked, so the centre really lies in white matter of this case.
    """
    start = np.array([s.start for s in box])
    shape = np.array([s.stop - s.start for s in box])
    order = rng.permutation(len(template.sites))[:500]
    for index in order:
        target = template.sites[index].astype(np.float64)
        guess = template_to_output(matrix, target)
        local = np.rint(guess).astype(int) - start
        if np.any(local < 0) or np.any(local >= shape):
            continue
        error = np.array([c[tuple(local)] for c in coords]) - target
        refined = guess - np.linalg.solve(matrix[:3, :3], error)
        local = np.rint(refined).astype(int) - start
        if np.any(local < 0) or np.any(local >= shape):
            continue
        landed = np.rint([c[tuple(local)] for c in coords]).astype(int)
        if np.all(landed >= 0) and np.all(landed < template.maps["wm"].shape):
            if template.maps["wm"][tuple(landed)] >= SITE_MIN_WM:
                return refined
    raise RuntimeError("no white-matter site found for the tumour")


def local_box(center: np.ndarray, half: float, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    """Slices of a cube of half-size ``half`` voxels around ``center``, clipped to ``shape``."""
    lo = np.maximum(np.floor(center - half).astype(int), 0)
    hi = np.minimum(np.ceil(center + half).astype(int) + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def _offsets(center: np.ndarray, region: tuple[slice, slice, slice]) -> list[np.ndarray]:
    """Per-axis offsets (voxels = mm) of a region's voxels from ``center``, as broadcastable arrays."""
    axes = [np.arange(s.start, s.stop, dtype=np.float32) - np.float32(c) for s, c in zip(region, center)]
    return [axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]


def push_tissue(plan: TumourPlan, center: np.ndarray, matrix: np.ndarray, coords: list[np.ndarray]) -> None:
    """Mass effect, in place on the sampling coordinates: tissue is pushed radially away.

    The image at ``x`` shows the tissue that was at ``x - m(x)``, with the radial field
    ``m(x) = A (x - c)/L exp(1/2 - |x - c|^2 / 2L^2)``: largest (A) at ``|x - c| = L`` (the lesion
    radius), gone by ~3L. ``A <= 0.45 L`` keeps the map one-to-one (its slope at c is 1.65 A/L < 1).
    Since the coordinates are affine in ``x`` up to a smooth warp, ``coords(x - m) ~ coords(x) - B m``.
    """
    if plan.mass_effect_mm <= 0:
        return
    scale = plan.radius_mm
    region = local_box(center, 3.0 * scale + 2.0, coords[0].shape)
    dx = _offsets(center, region)
    r2 = dx[0] ** 2 + dx[1] ** 2 + dx[2] ** 2
    gain = np.float32(plan.mass_effect_mm / scale) * np.exp(np.float32(0.5) - r2 / np.float32(2.0 * scale * scale))
    for d in range(3):
        row = matrix[d, :3].astype(np.float32)
        coords[d][region] -= gain * (row[0] * dx[0] + row[1] * dx[1] + row[2] * dx[2])


def lesion_fractions(
    plan: TumourPlan, rng: np.random.Generator, center: np.ndarray, region: tuple[slice, slice, slice]
) -> tuple[np.ndarray, np.ndarray]:
    """Lesion and inner-core fractions (float32, 0-1) in ``region``: a lumpy ellipsoid.

    The boundary radius along each direction is the ellipsoid's times ``1 + lumpiness * n``
    (smooth noise ``n``, clipped to +-1.5), and the fraction ramps over 1 mm across it: partial
    volume. The necrotic core is the same shape shrunk by ``necrosis_ratio``, with lumps of its
    own so the enhancing rim's thickness varies.
    """
    dx = _offsets(center, region)
    axes = Rotation.from_quat(plan.orientation).as_matrix().astype(np.float32)
    semi = np.array(plan.diameters_mm, dtype=np.float32) / 2.0
    r = np.sqrt(dx[0] ** 2 + dx[1] ** 2 + dx[2] ** 2)
    rho2 = np.zeros(r.shape, dtype=np.float32)
    for a in range(3):  # coordinate along the ellipsoid's axis a, in units of its semi-axis
        along = axes[0, a] * dx[0] + axes[1, a] * dx[1] + axes[2, a] * dx[2]
        rho2 += (along / semi[a]) ** 2
    rho = np.sqrt(rho2)
    shape = tuple(s.stop - s.start for s in region)
    lumpiness = np.float32(plan.lumpiness)
    lumps = np.clip(smooth_noise(rng, shape, SHAPE_SIGMA_MM, 2), -1.5, 1.5)
    core_lumps = np.clip(smooth_noise(rng, shape, SHAPE_SIGMA_MM, 2), -1.5, 1.5)
    boundary = np.where(rho > 0, r / np.maximum(rho, 1e-6), semi.max()) * (1.0 + lumpiness * lumps)
    lesion = np.clip(np.float32(0.5) + boundary - r, 0.0, 1.0)
    core_boundary = np.float32(plan.necrosis_ratio) * boundary * (1.0 + lumpiness * core_lumps)
    core = np.minimum(np.clip(np.float32(0.5) + core_boundary - r, 0.0, 1.0), lesion)
    return lesion.astype(np.float32), core.astype(np.float32)


def edema_reach(plan: TumourPlan, rng: np.random.Generator, lesion: np.ndarray) -> np.ndarray:
    """Oedema weight 0-1 around the lesion: 1 near it, fading at an irregular distance.

    Distance is Euclidean from the lesion's surface; the reach varies by +-30 % with smooth
    noise so the oedema front is irregular, and fades over EDEMA_RAMP_MM.
    """
    distance = ndimage.distance_transform_edt(lesion < 0.5).astype(np.float32)
    variation = np.clip(smooth_noise(rng, lesion.shape, 8.0, 2), -2.0, 2.0)
    reach = np.float32(plan.edema_mm) * (1.0 + np.float32(0.3) * variation)
    return np.clip((reach - distance) / np.float32(EDEMA_RAMP_MM) + 0.5, 0.0, 1.0)


def add_tumour(
    plan: TumourPlan, rng: np.random.Generator, center: np.ndarray, tissues: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """All class fractions: csf, gm, wm, edema, enhancing, core (necrosis or non-enhancing).

    The lesion replaces the normal fractions inside it, restricted to brain (it takes a share of
    whatever brain fraction the voxel has); oedema then takes ``weight * wm`` and
    ``weight * edema_gm_weight * gm`` of what is left, so it runs along white matter.
    ``tissues`` (csf, gm, wm) is updated in place and returned with the three new classes.
    """
    out = dict(tissues)
    for name in ("edema", "enhancing", "core"):
        out[name] = np.zeros_like(tissues["wm"])
    half = 1.3 * max(plan.diameters_mm) / 2.0 + plan.edema_mm * 1.6 + EDEMA_RAMP_MM + 2.0
    region = local_box(center, half, tissues["wm"].shape)
    csf, gm, wm = (tissues[name][region].copy() for name in ("csf", "gm", "wm"))
    brain = csf + gm + wm
    lesion, core = lesion_fractions(plan, rng, center, region)
    if plan.kind == "necrotic":
        out["core"][region] = core * brain
        out["enhancing"][region] = (lesion - core) * brain
    elif plan.kind == "solid":
        out["enhancing"][region] = lesion * brain
    else:
        out["core"][region] = lesion * brain
    keep = 1.0 - lesion
    weight = edema_reach(plan, rng, lesion)
    wm_edema = weight * wm * keep
    gm_edema = weight * np.float32(plan.edema_gm_weight) * gm * keep
    out["edema"][region] = wm_edema + gm_edema
    out["wm"][region] = wm * keep - wm_edema
    out["gm"][region] = gm * keep - gm_edema
    out["csf"][region] = csf * keep
    return out


def labels(fractions: dict[str, np.ndarray], naming: str = "brats2020") -> np.ndarray:
    """BraTS labels (uint8) from the fractions: the class holding most of each brain voxel.

    Normal tissue counts as one class (label 0), so a voxel is tumour when a tumour class
    outweighs all normal tissue together. Enhancing tumour is 4 (BraTS 2020) or 3 (2023).
    Only the box around the tumour classes is examined: they are zero elsewhere.
    """
    seg = np.zeros(fractions["wm"].shape, dtype=np.uint8)
    tumour_any = (fractions["edema"] > 0) | (fractions["core"] > 0) | (fractions["enhancing"] > 0)
    if not tumour_any.any():
        return seg
    idx = np.nonzero(tumour_any)
    region = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    normal = fractions["csf"][region] + fractions["gm"][region] + fractions["wm"][region]
    stack = np.stack([normal, fractions["edema"][region], fractions["core"][region], fractions["enhancing"][region]])
    enhancing = LABEL_ENHANCING if naming == "brats2020" else 3
    values = np.array([0, LABEL_EDEMA, LABEL_NECROTIC, enhancing], dtype=np.uint8)
    local = values[np.argmax(stack, axis=0)]
    local[stack.sum(0) < 0.5] = 0
    seg[region] = local
    return seg
