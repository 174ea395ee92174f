"""Slices per second: mrisynth's slice cache versus the seed's per-slice loader.

The seed served every training slice by re-reading three whole NIfTI volumes with nibabel,
normalising each to its brain's 1st-99th percentiles, then taking the slice and centre-cropping it
to 160x160. mrisynth decodes and normalises each case once into a float16 cache, memory-maps it,
and serves slices from there (:class:`mrisynth.dataset.SliceDataset`).

    .venv/bin/python benchmarks/loader_speed.py [--data ../shared/data/brats18] [--seed-slices 10]
        [--cache-slices 2000]

The cache is built in a temporary folder (its build time is reported separately) and removed at
the end. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from mrisynth.cache import load_cached_case
from mrisynth.cases import discover_cases
from mrisynth.dataset import SliceDataset
from mrisynth.preprocess import PreprocessConfig

from _common import DEFAULT_DATA, command_line, cpu_model

SEED_INPUTS = ("t1", "t1ce", "t2")  # the seed's three input volumes (FLAIR was its target)
CROP = 160


def seed_slice(case, z: int) -> np.ndarray:
    """The seed's way: three whole volumes decoded and normalised for one [3, 160, 160] slice."""
    channels = []
    for m in SEED_INPUTS:
        volume = nib.load(str(case.modalities[m])).get_fdata(dtype=np.float32)
        brain = volume != 0
        lo, hi = np.percentile(volume[brain], [1, 99])
        normalised = np.zeros_like(volume)
        normalised[brain] = (np.clip(volume[brain], lo, hi) - lo) / (hi - lo)
        image = normalised[:, :, z]
        x0 = (image.shape[0] - CROP) // 2
        y0 = (image.shape[1] - CROP) // 2
        channels.append(image[x0 : x0 + CROP, y0 : y0 + CROP])
    return np.stack(channels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of BraTS cases")
    parser.add_argument("--seed-slices", type=int, default=10, help="random slices timed the seed's way")
    parser.add_argument("--cache-slices", type=int, default=2000, help="random slices timed from the cache")
    parser.add_argument("--rng", type=int, default=0, help="random seed for the slice draws")
    args = parser.parse_args(argv)

    cases = [c for c in discover_cases(args.data) if not c.missing]
    if not cases:
        print(f"no complete cases under {args.data}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.rng)
    config = PreprocessConfig()

    with tempfile.TemporaryDirectory(prefix="mrisynth-bench-") as cache_dir:
        build_times = []
        cached = []
        for case in cases:
            t0 = time.perf_counter()
            cached.append(load_cached_case(case, config, cache_dir=cache_dir))
            build_times.append(time.perf_counter() - t0)
        cache_bytes = sum(p.stat().st_size for p in Path(cache_dir).rglob("*") if p.is_file())

        # the cache's way: random items of the training dataset (random crop, random missing modality)
        dataset = SliceDataset(cached, "any", crop=CROP, train=True, seed=0)
        dataset[0]  # first touch of the memory map
        cache_times = []
        for i in rng.integers(len(dataset), size=args.cache_slices):
            t0 = time.perf_counter()
            dataset[int(i)]
            cache_times.append(time.perf_counter() - t0)
        reuse_t0 = time.perf_counter()
        for case in cases:  # a second run finds every case built
            load_cached_case(case, config, cache_dir=cache_dir)
        reuse_time = time.perf_counter() - reuse_t0

    # the seed's way: random (case, brain slice) pairs
    seed_times = []
    for _ in range(args.seed_slices):
        k = int(rng.integers(len(cases)))
        z = int(rng.choice(cached[k].meta["brain_slices"]))
        t0 = time.perf_counter()
        seed_slice(cases[k], z)
        seed_times.append(time.perf_counter() - t0)

    seed_median = statistics.median(seed_times)
    cache_median = statistics.median(cache_times)
    n_slices = sum(c.n_slices for c in cached)
    command = command_line("loader_speed.py", argv)

    print(f"Command: `{command}`  ")
    print(f"Machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}, "
          f"Python {platform.python_version()}, numpy {np.__version__}, nibabel {nib.__version__}; "
          "the machine is shared with other users, so timings are noisy.  ")
    print(f"Data: {len(cases)} cases from {args.data}, {n_slices} brain slices in the cache.")
    print()
    print("| loader | slices timed | median time per slice | slices/s (1 / median) |")
    print("|---|---:|---:|---:|")
    print(f"| seed: re-read + re-normalise 3 volumes per slice | {len(seed_times)} | {seed_median * 1e3:,.0f} ms "
          f"| {1 / seed_median:.2f} |")
    print(f"| mrisynth: `SliceDataset` from the slice cache | {len(cache_times)} | {cache_median * 1e3:.3f} ms "
          f"| {1 / cache_median:,.0f} |")
    print()
    print(f"Speed-up (ratio of medians): **{seed_median / cache_median:,.0f}×**.  ")
    print(f"Cache build (one time, all 4 modalities): {sum(build_times):.1f} s for {len(cases)} cases "
          f"(median {statistics.median(build_times):.2f} s/case); cache size {cache_bytes / 2**20:.0f} MiB "
          f"({cache_bytes / 2**20 / len(cases):.1f} MiB/case); reopening the built cache: "
          f"{reuse_time * 1e3 / len(cases):.1f} ms/case.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
