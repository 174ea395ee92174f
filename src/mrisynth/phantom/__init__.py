"""Digital brain-tumour phantom: BraTS-like cases that mrisynth makes itself.

Why: users start without a BraTS download, so the demo needs data with the four sequences, a
tumour and its labels. Each case is real anatomy (the ICBM 2009a template, placed and deformed
at random), a glioma-like lesion with BraTS sub-regions, and MR physics (PD/T1/T2 per tissue,
signal equations, partial volume, gadolinium, bias field, Rician noise). See docs/phantom.md.

Public API::

    make_cohort(out_dir, n_cases, seed=0, naming="brats2020", progress=False) -> list[str]
    make_case(case_id, seed, naming="brats2020") -> dict[str, np.ndarray]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from mrisynth.phantom.files import case_id, check_naming, file_names, write_case
from mrisynth.phantom.synth import PhantomCase, plan_case, synthesize

__all__ = ["make_case", "make_cohort", "case_id", "file_names", "plan_case", "synthesize", "PhantomCase"]

OUTPUT_KEYS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair", "seg", "flair_clean")


def make_case(case_id: str, seed: int, naming: str = "brats2020") -> dict[str, np.ndarray]:
    """One case as arrays (240x240x155, LPS): t1, t1ce, t2, flair, flair_clean (int16), seg (uint8).

    The same (case_id number, seed) always gives the same arrays, whatever the naming; the naming
    only changes the enhancing-tumour label (4 for brats2020, 3 for brats2023).
    """
    check_naming(naming)
    case = synthesize(case_id, seed)
    arrays = dict(case.images)
    seg = case.seg
    if naming == "brats2023":
        seg = np.where(seg == 4, 3, seg).astype(np.uint8)
    arrays["seg"] = seg
    return {key: arrays[key] for key in OUTPUT_KEYS}


def make_cohort(
    out_dir: str | Path, n_cases: int, seed: int = 0, naming: str = "brats2020", progress: bool = False
) -> list[str]:
    """Write ``n_cases`` cases to ``out_dir/<ID>/`` and return their ids (Phantom_001, ...)."""
    check_naming(naming)
    if n_cases < 1:
        raise ValueError(f"n_cases must be at least 1, got {n_cases}")
    ids = []
    for number in range(1, n_cases + 1):
        start = time.perf_counter()
        case = case_id(number, naming)
        write_case(make_case(case, seed, naming), Path(out_dir), case, naming)
        ids.append(case)
        if progress:
            seconds = time.perf_counter() - start
            print(f"phantom {number}/{n_cases}: {case} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    return ids
