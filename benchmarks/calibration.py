"""What the intensity calibration does, per model and target: validation decision and held-out scores.

For each checkpoint (trained on a ``quality.py`` work folder's training cases, with its run's
``splits.json`` beside it), this fits the calibration exactly as ``mrisynth train`` does
(``mrisynth.calibration.fit_calibration``: templates from the run's training patients, on/off per
target by the validation patients' brain PSNR), then scores the held-out cases' syntheses
without and with the map, with ``mrisynth evaluate``'s metrics (brain PSNR and SSIM, BraSyn
SSIM). It shows both columns whatever the decision, for every model, the seed's ``vae_unet``
included: the map is not specific to one network, so the comparison between models is made
both ways.

    python benchmarks/calibration.py --quality-run /tmp/runs/quality_flair \\
        --model lite=RUN/best.pt --model vae_unet-flair=/tmp/runs/quality_flair/runs/vae_unet-flair/best.pt
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import command_line, commit_line, git_commit, machine_info, machine_line
from mrisynth.calibration import calibrate, fit_calibration
from mrisynth.cases import discover_cases
from mrisynth.io import BRATS_LABELS, read_images, read_segmentation
from mrisynth.metrics import evaluate_volumes
from mrisynth.modalities import MODALITIES
from mrisynth.predict import Synthesizer
from mrisynth.preprocess import brain_mask
from mrisynth.train import cases_of_split

METRICS = ("psnr", "ssim3d", "ssim_tumour", "ssim_nontumour")  # the printed table; the JSON keeps every metric


def held_out_scores(synth: Synthesizer, cases: list, modality: str, template: list[float]) -> dict[str, list[dict]]:
    """``evaluate``'s metrics of each held-out case, raw and calibrated."""
    rows: dict[str, list[dict]] = {"raw": [], "calibrated": []}
    for case in cases:
        result = synth.predict(case, missing=modality, calibrated=False)
        volumes, geometry = read_images({m: case.modalities[m] for m in MODALITIES})
        mask = brain_mask([volumes[m] for m in MODALITIES if m != modality])
        seg = read_segmentation(case.seg, geometry, labels=BRATS_LABELS[case.scheme]) if case.seg else None
        mapped, _ = calibrate(result.volume, mask, template)
        for name, volume in (("raw", result.volume), ("calibrated", mapped)):
            scores = evaluate_volumes(volumes[modality], volume, mask, seg)
            rows[name].append({"case": case.id, **scores})
    return rows


def mean(rows: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in rows if r[key] is not None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quality-run", type=Path, required=True, help="a quality.py work folder (cases/train, cases/test)")
    p.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT (its run folder holds splits.json)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="JSON with every figure")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_cases = discover_cases(args.quality_run / "cases" / "train")
    test_cases = discover_cases(args.quality_run / "cases" / "test")
    report, lines = {}, []
    for spec in args.model:
        name, _, path = spec.partition("=")
        checkpoint = Path(path)
        split = json.loads((checkpoint.parent / "splits.json").read_text())
        synth = Synthesizer.from_checkpoint(checkpoint, device="cpu", threads=args.threads)
        modalities = synth.modalities  # all four for an any-target model
        start = time.perf_counter()
        calibration = fit_calibration(
            synth, modalities, cases_of_split(train_cases, split["train"], "training split"),
            cases_of_split(train_cases, split["val"], "validation split"), log=print,
        )
        for modality in modalities:
            rows = held_out_scores(synth, test_cases, modality, calibration.templates[modality])
            val = calibration.validation[modality]
            report.setdefault(name, {})[modality] = {"validation": val, "on": modality in calibration.enabled, "test": rows}
            figures = " | ".join(f"{mean(rows['raw'], k):.{2 if k == 'psnr' else 4}f} → {mean(rows['calibrated'], k):.{2 if k == 'psnr' else 4}f}"
                                 for k in METRICS)
            lines.append(f"| {name} | {modality} | {val['psnr_raw']:.2f} → {val['psnr_calibrated']:.2f} | "
                         f"{'on' if modality in calibration.enabled else 'off'} | {figures} |")
            print(lines[-1], flush=True)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print(f"command: {command_line('calibration.py', argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {machine_line(machine_info(args.threads))}; {commit_line(git_commit())}")
    print(f"held out: {len(test_cases)} cases; raw → calibrated")
    print("| model | target | validation brain PSNR | decision | held-out brain PSNR | brain SSIM 3D | BraSyn SSIM tumour | BraSyn SSIM non-tumour |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
