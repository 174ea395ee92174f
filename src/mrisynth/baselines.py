"""The trivial baseline every model must beat: copy the most similar available modality.

A synthetic FLAIR is only worth something if it is closer to the real FLAIR than the T2 the user
already has. The copy is normalised the way the network's inputs are (1st-99th percentile of the
brain, scaled to [0, 1], 0 outside the brain), so it is scored on the same footing as a model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .cases import Case
from .errors import DataError
from .io import Geometry, read_images, write_volume
from .modalities import MODALITIES, canonical
from .preprocess import PreprocessConfig, brain_mask, normalise

#: For each target, the available modality whose contrast is closest to it.
MOST_SIMILAR: dict[str, str] = {"flair": "t2", "t2": "flair", "t1": "t1ce", "t1ce": "t1"}


def copy_baseline(case: Case, target: str, config: PreprocessConfig = PreprocessConfig()) -> tuple[np.ndarray, Geometry]:
    """The normalised most-similar modality as a stand-in for ``target``, on the inputs' grid."""
    target = canonical(target)
    inputs = {m: case.modalities[m] for m in MODALITIES if m != target and m in case.modalities}
    source = MOST_SIMILAR[target]
    if source not in inputs:
        raise DataError(f"{case.folder}: case {case.id}: the copy baseline for {target} needs {source}")
    volumes, geometry = read_images(inputs)
    mask = brain_mask(list(volumes.values()))
    volume, _ = normalise(volumes[source], mask, config.low_percentile, config.high_percentile)
    return volume, geometry


def write_copy_baseline(cases: list[Case], target: str, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write the copy baseline of each case into ``out_dir``, named like a prediction of ``target``."""
    from .predict import input_files, output_path

    written = []
    for case in cases:
        volume, geometry = copy_baseline(case, target)
        path = output_path(out_dir, case, canonical(target))  # a case ID cannot leave out_dir
        written.append(write_volume(path, volume, geometry, overwrite=overwrite, protected=input_files(case)))
    return written
