"""Does the posterior std map track the error? Spearman correlation over brain voxels.

With ``mrisynth predict --samples K`` a VAE writes a per-voxel standard deviation beside its
synthesis. It is only useful if it is high where the synthesis is wrong. For each held-out case:
K posterior samples of the target, and the Spearman rank correlation between std and |error|
over the brain voxels (all of them, per case; the figure is the mean over cases), with the error
measured two ways:

* ``spearman``: |normalised prediction - normalised reference|, each scaled by its own brain
  percentiles (mrisynth.metrics.normalise_percentile, as the brain metrics do);
* ``spearman_output_scale``: |prediction - reference scaled as the model's training targets were|
  (mrisynth.preprocess.normalise with the checkpoint's settings), i.e. the error in the units the
  std map is written in, without the whole-volume rescaling of the first.

One figure shows a std map beside its (first) error map.

    python benchmarks/uncertainty.py --model RUN/best.pt --cases CASE_DIR [CASE_DIR ...] --target flair
    python benchmarks/uncertainty.py --quality-run /tmp/runs/quality_flair   # the quality benchmark's held-out cases
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from _common import command_line, commit_line, machine_info, machine_line
from mrisynth.cases import find_case
from mrisynth.io import load_volume
from mrisynth.metrics import normalise_percentile
from mrisynth.predict import Synthesizer
from mrisynth.preprocess import normalise_with
from mrisynth.report import plot_uncertainty


def case_correlation(synth: Synthesizer, case_dir: Path, target: str, samples: int) -> tuple[dict, tuple]:
    """Spearman(std, |error|) over one case's brain voxels, and the arrays for a figure."""
    case = find_case(case_dir)
    start = time.perf_counter()
    result = synth.predict(case, missing=target, samples=samples)
    seconds = time.perf_counter() - start
    reference, _ = load_volume(case.modalities[target])
    brain = mask = result.volume > 0  # the inputs' brain: predict writes 0 outside it, sigmoid > 0 inside
    error = np.abs(normalise_percentile(result.volume, mask) - normalise_percentile(reference, mask))
    reference_model, _ = normalise_with(reference, mask, synth.config)
    error_output = np.abs(result.volume - reference_model)
    rho = float(spearmanr(result.std[brain], error[brain]).statistic)
    rho_output = float(spearmanr(result.std[brain], error_output[brain]).statistic)
    row = {"case": case.id, "spearman": rho, "spearman_output_scale": rho_output, "voxels": int(brain.sum()),
           "mean_std": float(result.std[brain].mean()), "mean_error": float(error[brain].mean()),
           "calibrated": result.calibrated, "seconds": round(seconds, 1)}
    return row, (result.std, error, result.geometry.affine, mask)


def quality_run_inputs(run: Path, target: str) -> tuple[Path, list[Path]]:
    """The any-target lite model and the held-out case folders of a quality.py work folder."""
    split = json.loads((run / "split.json").read_text())
    checkpoint = run / "runs" / "lite_vae_unet-any" / "best.pt"
    test_root = run / "cases" / "test"
    cases = [test_root / case_id for case_id in split["test"]]
    return checkpoint, cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint of a model that can synthesize --target")
    parser.add_argument("--cases", type=Path, nargs="*", default=[], help="held-out case folders (with the real target)")
    parser.add_argument("--quality-run", type=Path, help="take the model and held-out cases from a quality.py work folder")
    parser.add_argument("--target", default="flair")
    parser.add_argument("--samples", type=int, default=8, help="posterior samples per case (default 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--figure", type=Path, help="PNG of the first case's std map beside its error map (default: none)")
    parser.add_argument("--out", type=Path, help="JSON with the per-case figures")
    args = parser.parse_args(argv)
    if args.quality_run:
        args.model, args.cases = quality_run_inputs(args.quality_run, args.target)
    if not args.model or not args.cases:
        parser.error("give --model and --cases, or --quality-run")

    synth = Synthesizer.from_checkpoint(args.model, device="cpu", threads=args.threads)
    rows, first = [], None
    for case_dir in args.cases:
        row, arrays = case_correlation(synth, case_dir, args.target, args.samples)
        rows.append(row)
        if args.figure and first is None:  # the volumes are kept only for the figure
            first = (row["case"], arrays)
        print(f"{row['case']}: Spearman {row['spearman']:.3f} (output scale {row['spearman_output_scale']:.3f}) over {row['voxels']:,} brain voxels "
              f"(mean std {row['mean_std']:.4f}, mean |error| {row['mean_error']:.4f}, {row['seconds']} s)", flush=True)
    summary = {}
    for key, name in (("spearman", ""), ("spearman_output_scale", "output_scale_")):
        rhos = [r[key] for r in rows]
        summary[f"{name}mean"] = statistics.mean(rhos)
        summary[f"{name}sd"] = statistics.stdev(rhos) if len(rhos) > 1 else 0.0
    summary["n"] = len(rows)
    if args.figure:
        case_id, (std, error, affine, mask) = first
        plot_uncertainty(std, error, args.figure, affine=affine, mask=mask,
                         title=f"{case_id}: {args.target} posterior std ({args.samples} samples) vs |error|, "
                               f"Spearman {rows[0]['spearman']:.2f}")
    print()
    print(f"command: {command_line('uncertainty.py', argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {machine_line(machine_info(args.threads))}; {commit_line(__import__('_common').git_commit())}")
    print(f"model: {args.model}; target {args.target}; {args.samples} posterior samples")
    print(f"Spearman(std, |error|) over brain voxels: {summary['mean']:.3f} ± {summary['sd']:.3f} after percentile scaling, "
          f"{summary['output_scale_mean']:.3f} ± {summary['output_scale_sd']:.3f} in the output's scale (n = {summary['n']} cases)")
    if args.figure:
        print(f"figure: {args.figure}")
    if args.out:
        args.out.write_text(json.dumps({"cases": rows, "summary": summary, "target": args.target,
                                        "samples": args.samples, "model": str(args.model)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
