"""One phantom case, end to end: plan -> anatomy -> tumour -> four sequences, labels.

Why a plan first: every random scalar of a case (pose, tumour kind and size, field strength,
protocols, noise levels) is drawn from its own stream before any array exists, so a case's
settings can be read cheaply (``plan_case``) and array sizes never shift the scalars. Arrays
(deformations, lumps, noise) come from two further streams. All three streams are spawned from
``SeedSequence([seed, case number])``: a case depends only on (seed, case number).

Work happens inside the output box that can hold brain (about 60 % of the 240x240x155 grid);
the images are pasted into zero volumes at the end (skull-stripped: 0 outside the brain).
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from mrisynth.phantom import anatomy, physics, tumour
from mrisynth.phantom.anatomy import OUT_SHAPE

SEQUENCES = physics.SEQUENCES
_PHANTOM_ID = re.compile(r"^Phantom[_-](\d+)")


@dataclass(frozen=True)
class CasePlan:
    """All random scalars of one case."""

    case_id: str
    seed: int
    placement: anatomy.Placement
    tumour: tumour.TumourPlan
    physics: physics.Physics


@dataclass
class PhantomCase:
    """A synthesised case: full-size outputs plus the in-box internals the tests check."""

    plan: CasePlan
    box: tuple[slice, slice, slice]  # output region all the in-box arrays cover
    center: np.ndarray  # lesion centre, output voxel
    brain: np.ndarray  # bool, in the box: voxels whose class fractions add up to >= 0.5
    fractions: dict[str, np.ndarray]  # class fractions in the box (physics.CLASSES)
    ideal: dict[str, np.ndarray]  # noise- and bias-free signal per sequence, at brain voxels (1-D)
    images: dict[str, np.ndarray]  # full-size int16: t1, t1ce, t2, flair, flair_clean
    seg: np.ndarray  # full-size uint8, BraTS 2020 labels (0, 1, 2, 4)


def case_number(case_id: str) -> int:
    """The number a case's randomness is keyed on: the phantom id's number, else a CRC32.

    Keying on the number (not the id string) makes ``Phantom_003`` and ``Phantom-00003-000``
    the same case, so the two namings hold the same images.
    """
    match = _PHANTOM_ID.match(case_id)
    if match:
        return int(match.group(1))
    return zlib.crc32(case_id.encode("utf-8"))


def _streams(case_id: str, seed: int) -> list[np.random.Generator]:
    """Independent generators for: scalars, random fields, noise."""
    root = np.random.SeedSequence([int(seed), case_number(case_id)])
    return [np.random.default_rng(child) for child in root.spawn(3)]


def plan_case(case_id: str, seed: int) -> CasePlan:
    """Draw every scalar of a case (fast: no arrays)."""
    rng = _streams(case_id, seed)[0]
    placement = anatomy.draw_placement(rng)
    tumour_plan = tumour.draw_tumour(rng)
    return CasePlan(case_id, int(seed), placement, tumour_plan, physics.draw_physics(rng, tumour_plan.kind))


def synthesize(case_id: str, seed: int) -> PhantomCase:
    """Build one case (about 2-3 s on one core)."""
    plan = plan_case(case_id, seed)
    _, field_rng, noise_rng = _streams(case_id, seed)
    template = anatomy.load_template()
    matrix = anatomy.sampling_matrix(template, plan.placement)
    box = anatomy.output_box(template, matrix)
    shape = tuple(s.stop - s.start for s in box)
    displacement = anatomy.random_displacement(field_rng, shape, plan.placement)
    coords = anatomy.sampling_coordinates(matrix, box, displacement)
    del displacement
    center = tumour.choose_site(field_rng, template, matrix, coords, box)
    center_in_box = center - np.array([s.start for s in box])
    tumour.push_tissue(plan.tumour, center_in_box, matrix, coords)
    tissues = anatomy.warp_tissues(template, coords)
    del coords
    fractions = tumour.add_tumour(plan.tumour, field_rng, center_in_box, tissues)
    brain = sum(fractions.values()) >= 0.5
    voxels = np.stack([fractions[name][brain] for name in physics.CLASSES])  # (classes, n)
    ideal, images = {}, {}
    for name in SEQUENCES:
        ideal[name], noisy, clean = _sequence(plan.physics, name, voxels, brain, field_rng, noise_rng)
        images[name] = _paste(noisy, box, brain)
        if name == "flair":
            images["flair_clean"] = _paste(clean, box, brain)
    seg = np.zeros(OUT_SHAPE, dtype=np.uint8)
    seg[box] = np.where(brain, tumour.labels(fractions), 0)
    return PhantomCase(plan, box, center, brain, fractions, ideal, images, seg)


def _sequence(
    phys: physics.Physics,
    name: str,
    voxels: np.ndarray,
    brain: np.ndarray,
    field_rng: np.random.Generator,
    noise_rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ideal signal, and int16 noisy and noise-free values, at the brain voxels only.

    Only brain voxels are computed (about a third of the box): the rest is 0 (skull-stripped).
    """
    signals = physics.class_signals(phys, name)
    ideal = physics.mix(voxels, signals)
    biased = ideal * physics.bias_field(field_rng, brain.shape, phys.bias[name])[brain]
    noisy = physics.rician(noise_rng, biased, phys.noise[name] * signals["wm"])
    scale = phys.max_value[name] / max(float(np.percentile(noisy, 99.9)), 1e-12)
    return ideal, _to_int16(noisy, scale), _to_int16(biased, scale)


def _to_int16(image: np.ndarray, scale: float) -> np.ndarray:
    """Scale a non-negative image and round it to int16 (x + 0.5 truncated: rounds half up)."""
    out = image * np.float32(scale)
    out += np.float32(0.5)
    np.minimum(out, np.float32(32767), out=out)
    return out.astype(np.int16)


def _paste(values: np.ndarray, box: tuple[slice, slice, slice], brain: np.ndarray) -> np.ndarray:
    """Full-size volume holding ``values`` at the brain voxels of the box, 0 elsewhere."""
    full = np.zeros(OUT_SHAPE, dtype=values.dtype)
    inside = full[box]  # a view: writing into it writes into ``full``
    inside[brain] = values
    return full
