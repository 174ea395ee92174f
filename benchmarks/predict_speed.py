"""How long one real BraTS case takes to synthesize on this machine, end to end, stage by stage.

Stages: read (decode the three input NIfTI files), preprocess (brain mask, percentile scaling,
reorientation, windowing), network (every brain slice through the model, batched), restore
(slices back into the input grid, masking) and write (compressed float32 NIfTI, atomic).
Model loading is timed once, apart. The model is the default-size ``vae_unet`` with UNTRAINED
weights: the arithmetic, hence the time, is the same as for a trained one.

Usage::

    python benchmarks/predict_speed.py [--case DIR] [--threads N] [--batch-size B] [--runs 3]
"""
from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mrisynth.cases import find_case
from mrisynth.checkpoint import checkpoint_metadata, save_checkpoint
from mrisynth.dataset import in_channels_for
from mrisynth.models import build_model
from mrisynth.predict import SynthesisResult, Synthesizer, set_threads, write_result
from mrisynth.preprocess import PreprocessConfig

from _common import DEFAULT_DATA as DATA
STAGES = ("read", "preprocess", "network", "restore", "write")


def untrained_checkpoint(folder: Path, target: str = "flair", model_name: str = "vae_unet") -> Path:
    """A default-size checkpoint of ``model_name`` with random weights (timing does not depend on training).

    ``target`` is a modality (a fixed-target model) or ``"any"`` (one model for all four targets).
    """
    torch.manual_seed(0)
    model = build_model(model_name, in_channels=in_channels_for(target))
    checkpoint = {**checkpoint_metadata(model, target, PreprocessConfig().to_dict()), "state_dict": model.state_dict()}
    name = "untrained.pt" if (model_name, target) == ("vae_unet", "flair") else f"untrained-{model_name}-{target}.pt"
    return save_checkpoint(folder / name, checkpoint)


def time_one_run(
    synth: Synthesizer, case_dir: Path, out: Path, batch_size: int, samples: int, missing: str = "flair"
) -> tuple[dict[str, float], SynthesisResult]:
    """Seconds per stage for one full synthesis of ``missing`` (FLAIR: from T1, T1CE and T2)."""
    start = time.perf_counter()
    case = find_case(case_dir)
    result = synth.predict(case, missing=missing, samples=samples, batch_size=batch_size)
    timings = dict(result.timings)
    timings["read"] += time.perf_counter() - start - sum(result.timings.values())  # case discovery
    start = time.perf_counter()
    write_result(result, out, overwrite=True)
    timings["write"] = time.perf_counter() - start
    timings["total"] = sum(timings[s] for s in STAGES)
    return timings, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=None, help=f"a BraTS case folder (default: the first under {DATA})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    case_dir = args.case or next(p for p in sorted(DATA.iterdir()) if p.is_dir())
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        start = time.perf_counter()
        synth = Synthesizer.from_checkpoint(untrained_checkpoint(tmp_path), device=args.device)
        load_s = time.perf_counter() - start
        runs = []
        for _ in range(args.runs):
            timings, result = time_one_run(synth, case_dir, tmp_path / "out", args.batch_size, args.samples)
            runs.append(timings)

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(f"`{command}`\n")
    print(f"case {case_dir.name}, grid {result.geometry.shape}, {result.n_slices} brain slices, "
          f"window {result.window[0]}x{result.window[1]}; vae_unet default size, UNTRAINED weights; "
          f"device {synth.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, samples {args.samples}; {platform.processor() or platform.machine()}; "
          f"median of {args.runs} runs (machine shared with other users: expect noise)\n")
    print("| stage | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    for stage in (*STAGES, "total"):
        values = [r[stage] for r in runs]
        print(f"| {stage} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    print(f"| (model load, once) | {load_s:.2f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
