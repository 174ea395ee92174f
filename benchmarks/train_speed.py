"""Training throughput on this machine: data-loader time against optimizer-step time.

Why: the founding loader re-read and re-normalised NIfTI volumes for every slice it served, so
the CPU spent more time decoding gzip than training. This times, per batch, (1) mrisynth's loader
(memory-mapped slice cache, the exact DataLoader that ``mrisynth train`` uses) and (2) a seed-style
loader that reads three NIfTI volumes and normalises them for every slice, against the training
step itself (``Trainer.train_step``: forward, L1 + beta*KL, backward, Adam). Target: loader time
under 5% of step time. Timings on shared machines swing 2-5x: compare rows of one run.

    python benchmarks/train_speed.py --cases 4 --steps 20
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mrisynth.cache import load_cached_case
from mrisynth.cases import Case
from mrisynth.distributed import DistEnv
from mrisynth.io import load_volume
from mrisynth.modalities import MODALITIES
from mrisynth.preprocess import PreprocessConfig, brain_mask, normalise
from mrisynth.train import Trainer, resolve_config

from _common import DEFAULT_DATA, complete_cases


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="root of BraTS cases (default ../shared/data/brats18)")
    p.add_argument("--cases", type=int, default=4, help="number of cases to train on (default 4)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop", type=int, default=160)
    p.add_argument("--model", default="vae_unet")
    p.add_argument("--target", default="flair")
    p.add_argument("--seed-batches", type=int, default=2, help="batches timed with the seed-style loader (slow: default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args()


def time_cached_loader(trainer: Trainer, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """(loader seconds, step seconds) per batch, for the batches after the warm-up."""
    trainer.sampler.set_epoch(0)
    trainer.train_set.set_epoch(0)
    trainer.model.train()
    batches = iter(trainer.loader)
    load_times, step_times = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        stack, missing = next(batches)
        t1 = time.perf_counter()
        trainer.train_step(stack, missing, beta=trainer.config["beta"])
        t2 = time.perf_counter()
        if i >= warmup:
            load_times.append(t1 - t0)
            step_times.append(t2 - t1)
    return load_times, step_times


def seed_style_slice(case: Case, inputs: list[str], z_fraction: float, crop: int) -> np.ndarray:
    """One slice the way the seed served it: read the three input volumes, mask, normalise, cut."""
    volumes = [load_volume(case.modalities[m])[0] for m in inputs]
    mask = brain_mask(volumes)
    normalised = [normalise(v, mask)[0] for v in volumes]
    z = int(z_fraction * (volumes[0].shape[2] - 1))
    x0 = max((volumes[0].shape[0] - crop) // 2, 0)
    y0 = max((volumes[0].shape[1] - crop) // 2, 0)
    return np.stack([v[x0 : x0 + crop, y0 : y0 + crop, z] for v in normalised])


def time_seed_loader(cases: list[Case], target: str, batch_size: int, n_batches: int, crop: int) -> list[float]:
    inputs = [m for m in MODALITIES if m != target]
    rng = np.random.default_rng(0)
    times = []
    for _ in range(n_batches):
        t0 = time.perf_counter()
        for _ in range(batch_size):
            case = cases[int(rng.integers(len(cases)))]
            seed_style_slice(case, inputs, float(rng.uniform(0.3, 0.7)), crop)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = complete_cases(args.data, args.cases)
    config = resolve_config({"model": args.model, "target": args.target, "batch_size": args.batch_size,
                             "crop": args.crop, "device": "cpu"})
    preprocess = PreprocessConfig.from_dict(config["preprocess"])

    t0 = time.perf_counter()
    cached = [load_cached_case(c, preprocess) for c in cases]
    cache_s = time.perf_counter() - t0
    trainer = Trainer(config, DistEnv(), cached, cached[:1])
    load_times, step_times = time_cached_loader(trainer, args.steps, args.warmup)
    seed_times = time_seed_loader(cases, config["target"], args.batch_size, args.seed_batches, args.crop)

    step = statistics.median(step_times)
    rows = [
        ("mrisynth: memory-mapped slice cache", statistics.median(load_times), len(load_times)),
        ("seed-style: read + normalise 3 NIfTI per slice", statistics.median(seed_times), len(seed_times)),
    ]
    n_params = sum(p.numel() for p in trainer.net.parameters())
    print(f"# Training throughput: {args.model} ({n_params / 1e6:.1f} M parameters), target {config['target']}, "
          f"batch {args.batch_size}, crop {args.crop}, {len(cases)} cases ({len(trainer.train_set)} slices)\n")
    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} at the end; slice cache ready in {cache_s:.1f} s "
          f"(0 when already cached). Medians; step = forward + loss + backward + Adam.\n")
    print("| loader | batches timed | loader s/batch | step s/batch | loader / step | slices/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, load, n in rows:
        print(f"| {name} | {n} | {load:.4f} | {step:.3f} | {100 * load / step:.2f}% | {args.batch_size / (load + step):.2f} |")
    print(f"\nstep times over {len(step_times)} steps (after {args.warmup} warm-up): "
          f"min {min(step_times):.3f} s, max {max(step_times):.3f} s")
    print("\ncommand: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
