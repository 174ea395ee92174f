"""The two contenders that are not networks: ``copy`` and ``voxel-regression``.

Why they are in every benchmark: a network is only worth its training if it beats (1) handing the
user the available sequence that already looks most like the missing one, and (2) a classical
per-voxel regression that sees a little neighbourhood. Both get exactly the inputs the networks
get: the three other modalities, each scaled to [0, 1] between its 1st and 99th brain percentiles
by :func:`mrisynth.preprocess.normalise` with the brain mask :func:`mrisynth.preprocess.brain_mask`
computes from them (the code ``mrisynth predict`` runs), and their output is, like the networks',
in [0, 1] on the input grid and 0 outside that brain mask.

* ``copy``: the normalised most similar modality (T2 for FLAIR, T1CE for T1, T1 for T1CE, FLAIR
  for T2), written as the prediction.
* ``voxel-regression``: a ``sklearn.ensemble.HistGradientBoostingRegressor`` per voxel on 12
  features (the three normalised inputs and their Gaussian-smoothed copies at sigma 1, 2 and 4
  voxels), fitted on a random sample of brain voxels from the training cases against the
  normalised real target, then applied to every brain voxel of a test case.

Used by ``quality.py`` (fit on the training cases, scored on the held-out ones) and ``speed.py``
(seconds per volume, next to the networks).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

from mrisynth.cases import Case
from mrisynth.io import Geometry, read_images
from mrisynth.modalities import MODALITIES
from mrisynth.preprocess import PreprocessConfig, brain_mask, normalise

from _common import MOST_SIMILAR

SIGMAS = (1.0, 2.0, 4.0)
DEFAULT_VOXELS = 200_000


@dataclass
class BaselinePrediction:
    """A synthesized volume on the input grid (like :class:`mrisynth.predict.SynthesisResult`)."""

    modality: str
    volume: np.ndarray  # float32, [0, 1], 0 outside the inputs' brain mask
    geometry: Geometry
    case: Case
    std: None = None  # write_result() expects it: baselines have no uncertainty map
    timings: dict[str, float] = field(default_factory=dict)  # seconds: read, preprocess, compute


def input_modalities(target: str) -> list[str]:
    """The three modalities a model sees when ``target`` is missing, in the standard order."""
    return [m for m in MODALITIES if m != target]


def read_normalised(
    case: Case, inputs: list[str], config: PreprocessConfig, timings: dict[str, float], target: str | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray, Geometry]:
    """The ``inputs`` (and ``target`` when given) read and normalised exactly as model inputs are.

    The brain mask is computed from the inputs alone, as ``mrisynth predict`` does, so a baseline
    never looks at the target it is asked to synthesize; the target (for fitting) is normalised
    over that same mask. ``timings`` receives the seconds spent reading and preprocessing.
    """
    wanted = [*inputs, *([target] if target else [])]
    start = time.perf_counter()
    volumes, geometry = read_images({m: case.modalities[m] for m in wanted})
    timings["read"] = time.perf_counter() - start
    start = time.perf_counter()
    mask = brain_mask([volumes[m] for m in inputs])
    normalised = {m: normalise(volumes[m], mask, config.low_percentile, config.high_percentile)[0] for m in wanted}
    timings["preprocess"] = time.perf_counter() - start
    return normalised, mask, geometry


def copy_predict(case: Case, target: str, config: PreprocessConfig = PreprocessConfig()) -> BaselinePrediction:
    """The trivial baseline: the normalised available modality most similar to ``target``."""
    timings: dict[str, float] = {}
    normalised, _mask, geometry = read_normalised(case, input_modalities(target), config, timings)
    start = time.perf_counter()
    volume = np.ascontiguousarray(normalised[MOST_SIMILAR[target]], dtype=np.float32)
    timings["compute"] = time.perf_counter() - start
    return BaselinePrediction(target, volume, geometry, case, timings=timings)


def voxel_features(normalised: dict[str, np.ndarray], order: list[str], flat_index: np.ndarray,
                   sigmas: tuple[float, ...] = SIGMAS) -> np.ndarray:
    """[n, 3 * (1 + len(sigmas))] float32: each input at the chosen voxels, then its smoothed copies.

    Why smoothed copies: a voxel's own three intensities cannot tell oedema from grey matter as
    well as its surroundings can; Gaussian blurs at a few scales give a per-voxel model that
    context cheaply (the networks see much more of it).
    """
    columns = []
    for m in order:
        volume = normalised[m]
        columns.append(volume.ravel()[flat_index])
        for sigma in sigmas:
            columns.append(gaussian_filter(volume, sigma=sigma).ravel()[flat_index])
    return np.stack(columns, axis=1).astype(np.float32, copy=False)


class VoxelRegression:
    """Per-voxel gradient-boosted regression from the three inputs (and their blurs) to the target."""

    def __init__(
        self,
        target: str,
        n_voxels: int = DEFAULT_VOXELS,
        sigmas: tuple[float, ...] = SIGMAS,
        seed: int = 0,
        max_iter: int = 200,
        early_stopping: bool = True,
        config: PreprocessConfig = PreprocessConfig(),
    ) -> None:
        self.target = target
        self.inputs = input_modalities(target)
        self.n_voxels = n_voxels
        self.sigmas = tuple(sigmas)
        self.seed = seed
        self.max_iter = max_iter
        self.early_stopping = early_stopping  # off in speed.py: always max_iter trees, the slowest case
        self.config = config
        self.regressor = None

    def settings(self) -> dict:
        """What was fitted, for the benchmark's JSON."""
        return {"target": self.target, "inputs": self.inputs, "n_voxels": self.n_voxels, "sigmas": list(self.sigmas),
                "seed": self.seed, "max_iter": self.max_iter, "early_stopping": self.early_stopping,
                "estimator": "sklearn.ensemble.HistGradientBoostingRegressor (other settings default)"}

    def sample(self, cases: list[Case]) -> tuple[np.ndarray, np.ndarray]:
        """Features and normalised targets of ``n_voxels`` random brain voxels, an equal share per case."""
        rng = np.random.default_rng(self.seed)
        per_case = math.ceil(self.n_voxels / len(cases))
        features, targets = [], []
        for case in cases:
            timings: dict[str, float] = {}
            normalised, mask, _ = read_normalised(case, self.inputs, self.config, timings, target=self.target)
            brain = np.flatnonzero(mask)
            chosen = np.sort(rng.choice(brain, size=min(per_case, brain.size), replace=False))
            features.append(voxel_features(normalised, self.inputs, chosen, self.sigmas))
            targets.append(normalised[self.target].ravel()[chosen])
        return np.concatenate(features)[: self.n_voxels], np.concatenate(targets)[: self.n_voxels]

    def fit(self, cases: list[Case]) -> dict:
        """Fit on a voxel sample of ``cases``; returns seconds spent and iterations run."""
        from sklearn.ensemble import HistGradientBoostingRegressor

        start = time.perf_counter()
        x, y = self.sample(cases)
        sampled = time.perf_counter()
        self.regressor = HistGradientBoostingRegressor(
            max_iter=self.max_iter, early_stopping=self.early_stopping, random_state=self.seed
        )
        self.regressor.fit(x, y)
        done = time.perf_counter()
        return {"cases": len(cases), "voxels": int(len(y)), "sample_s": round(sampled - start, 2),
                "fit_s": round(done - sampled, 2), "iterations": int(self.regressor.n_iter_)}

    def predict(self, case: Case) -> BaselinePrediction:
        """Every brain voxel of ``case`` through the regressor; 0 outside the brain, clipped to [0, 1]."""
        if self.regressor is None:
            raise RuntimeError("VoxelRegression.predict() before fit()")
        timings: dict[str, float] = {}
        normalised, mask, geometry = read_normalised(case, self.inputs, self.config, timings)
        start = time.perf_counter()
        brain = np.flatnonzero(mask)
        values = self.regressor.predict(voxel_features(normalised, self.inputs, brain, self.sigmas))
        volume = np.zeros(mask.shape, dtype=np.float32)
        volume[mask] = np.clip(values, 0.0, 1.0)  # boolean indexing visits voxels in flatnonzero order
        timings["compute"] = time.perf_counter() - start
        return BaselinePrediction(self.target, volume, geometry, case, timings=timings)
