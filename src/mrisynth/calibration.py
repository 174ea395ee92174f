"""Intensity calibration of a synthesis: its brain histogram mapped onto the training targets'.

Why: a synthesis is (close to) a conditional mean, so its brightest voxels (enhancing tumour,
oedema, vessels) come out dimmer than in a real scan. MRI has no absolute unit, so every
comparison (our brain metrics, BraSyn's, a segmentation network's input normalisation) rescales
each volume by its own percentiles, and a dim top end then stretches the whole brain too bright:
on T1CE the any-target model's raw syntheses scored 9.6 dB brain PSNR on the validation
patients of the benchmark split, and 15.9 dB after this mapping.

What: for each modality, the *template* is the mean, over the training patients, of the brain
quantile curve of the real sequence, normalised exactly as the model's training targets were
(``preprocess.normalise`` with the checkpoint's settings, inside the brain mask of the other three
sequences, as at prediction). A synthesis is calibrated by the monotone piecewise-linear map that
sends its own brain quantiles onto the template (Nyúl-Udupa style histogram standardisation):
voxel ranks are kept, only the intensity scale is reshaped. Nothing of the case's real target is
used: the map depends on the synthesis and on the training patients only.

When: whether the map helps depends on the model and the modality (for the any-target model it
helped T1CE and hurt T1, T2 and FLAIR on the validation patients), so ``mrisynth train`` decides
it per modality on the validation patients (brain PSNR with and without, the benchmark's
measure) and stores the templates, the decision and its figures in the checkpoint. ``predict``
applies it where enabled (``--no-calibration`` gives the network's raw output).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from .cases import Case
from .io import read_images
from .metrics import brain_errors, normalise_percentile
from .modalities import MODALITIES
from .preprocess import PreprocessConfig, brain_mask, normalise_with

#: the brain quantiles (percent) that define a curve: every half percent
LEVELS = np.linspace(0.0, 100.0, 201)


@dataclass
class Calibration:
    """Per-modality templates, which modalities are calibrated, and the validation figures behind it."""

    templates: dict[str, list[float]]  # modality -> quantile curve at LEVELS, in the model's [0, 1] scale
    enabled: list[str] = field(default_factory=list)
    validation: dict[str, dict[str, Any]] = field(default_factory=dict)  # modality -> PSNR without / with, cases

    def applies_to(self, modality: str) -> bool:
        return modality in self.enabled and modality in self.templates

    def to_dict(self) -> dict:
        templates = {m: [float(v) for v in curve] for m, curve in self.templates.items()}  # plain floats: a safe checkpoint
        return {"levels": len(LEVELS), "templates": templates, "enabled": list(self.enabled),
                "validation": self.validation}

    @classmethod
    def from_dict(cls, data: Any) -> "Calibration | None":
        """The calibration stored in a checkpoint (None when it has none); ValueError when malformed."""
        if data is None:
            return None
        if not isinstance(data, dict) or data.get("levels") != len(LEVELS):
            raise ValueError(f"expected a calibration on {len(LEVELS)} quantile levels")
        templates = data.get("templates")
        if not isinstance(templates, dict) or not all(
            m in MODALITIES and isinstance(c, list) and len(c) == len(LEVELS) for m, c in templates.items()
        ):
            raise ValueError(f"expected one curve of {len(LEVELS)} values per modality in the calibration")
        enabled = [m for m in data.get("enabled") or [] if m in templates]
        return cls({m: [float(v) for v in c] for m, c in templates.items()}, enabled, dict(data.get("validation") or {}))


def brain_quantiles(values: np.ndarray) -> np.ndarray:
    """The quantile curve (at :data:`LEVELS`) of a set of brain voxel values."""
    return np.percentile(np.asarray(values, dtype=np.float64), LEVELS)


def _strictly_increasing(points: np.ndarray) -> np.ndarray:
    """Quantiles made strictly increasing (ties nudged apart by 1e-9), as ``np.interp`` needs."""
    return np.maximum.accumulate(points) + np.arange(len(points)) * 1e-9


def quantile_map(volume: np.ndarray, mask: np.ndarray, template: Iterable[float]) -> Callable[[np.ndarray], np.ndarray]:
    """The monotone map that sends ``volume``'s brain quantiles onto ``template``."""
    source = _strictly_increasing(brain_quantiles(volume[mask]))
    target = np.asarray(list(template), dtype=np.float64)

    def apply(values: np.ndarray) -> np.ndarray:
        return np.interp(values, source, target).astype(np.float32)

    return apply


def calibrate(
    volume: np.ndarray, mask: np.ndarray, template: Iterable[float], std: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``volume`` (0 outside ``mask``) with its brain voxels mapped onto ``template``; ``std`` (when
    given) carried through the same map: half the mapped width of mean +- std, i.e. std times the
    map's local slope."""
    mapping = quantile_map(volume, mask, template)
    out = np.zeros_like(volume, dtype=np.float32)
    out[mask] = mapping(volume[mask])
    if std is None:
        return out, None
    mean, spread = volume[mask], std[mask]
    std_out = np.zeros_like(std, dtype=np.float32)
    std_out[mask] = 0.5 * (mapping(mean + spread) - mapping(mean - spread))
    return out, std_out


# --- fitting at the end of training ------------------------------------------------------------


def templates_for(cases: list[Case], modalities: list[str], config: PreprocessConfig) -> dict[str, list[float]]:
    """Per modality, the mean brain quantile curve over ``cases``, normalised as training targets
    are (inside the brain mask of the other three sequences, as at prediction). Each case is read once."""
    curves: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    for case in cases:
        volumes, _ = read_images({m: case.modalities[m] for m in MODALITIES})
        for modality in modalities:
            mask = brain_mask([volumes[m] for m in MODALITIES if m != modality])
            values, _ = normalise_with(volumes[modality], mask, config)
            curves[modality].append(brain_quantiles(values[mask]))
    return {m: [round(float(v), 6) for v in np.mean(curves[m], axis=0)] for m in modalities}


def validation_psnr(synthesizer: Any, cases: list[Case], templates: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """Per modality, the mean brain PSNR (the benchmark's measure) of the raw and the calibrated
    syntheses of ``cases``. Each case's four sequences are read once for all modalities."""
    scores: dict[str, list[tuple[float, float]]] = {m: [] for m in templates}
    for case in cases:
        volumes, _ = read_images({m: case.modalities[m] for m in MODALITIES})
        for modality, template in templates.items():
            result = synthesizer.predict(case, missing=modality, calibrated=False)
            mask = brain_mask([volumes[m] for m in MODALITIES if m != modality])
            ref_n = normalise_percentile(volumes[modality], mask)
            mapped, _ = calibrate(result.volume, mask, template)
            scores[modality].append(tuple(  # type: ignore[arg-type]
                brain_errors(ref_n, normalise_percentile(volume, mask), mask)["psnr"] for volume in (result.volume, mapped)
            ))
    return {m: (float(np.mean([r for r, _ in rows])), float(np.mean([c for _, c in rows]))) for m, rows in scores.items()}


def fit_calibration(
    synthesizer: Any,
    modalities: list[str],
    train_cases: list[Case],
    val_cases: list[Case],
    log: Callable[[str], None] = lambda message: None,
) -> Calibration:
    """Templates from ``train_cases``; each modality enabled iff it raised the mean brain PSNR of
    ``val_cases`` (none is enabled without validation cases)."""
    calibration = Calibration(templates=templates_for(train_cases, modalities, synthesizer.config))
    if not val_cases:
        return calibration
    for modality, (raw, calibrated) in validation_psnr(synthesizer, val_cases, calibration.templates).items():
        use = calibrated > raw
        calibration.validation[modality] = {"psnr_raw": round(raw, 3), "psnr_calibrated": round(calibrated, 3),
                                            "cases": len(val_cases)}
        if use:
            calibration.enabled.append(modality)
        log(f"calibration of {modality}: validation brain PSNR {raw:.2f} dB raw, {calibrated:.2f} dB calibrated "
            f"({len(val_cases)} patients): {'on' if use else 'off'}")
    return calibration
