"""Recipe ablation: one training setting changed, the rest of the quality benchmark kept.

Why: ``quality.py`` compares contenders at their recipes; choosing a recipe needs paired runs
that differ in one setting only. This script trains ``lite_vae_unet`` (any target) with the
given overrides on the training cases of a ``quality.py`` work folder, for a wall-clock budget
with the epoch cap out of the way (so every run trains for the same minutes), predicts the
four targets of the held-out cases, and scores the brain PSNR and MAE exactly as
``mrisynth evaluate`` does (``normalise_percentile`` on the inputs' brain mask), plus the mean
signed error after that scaling (``bias``: > 0 means the synthesis comes out too bright once
scaled by its own percentiles, the sign of a compressed top end).

    python benchmarks/ablation.py --quality-run /tmp/runs/quality_flair --name median25 \\
        --set '{"preprocess": {"median_level": 0.25}}'            # ~15 min, one thread
    python benchmarks/ablation.py --quality-run /tmp/runs/quality_flair --name base --set '{}'
    python benchmarks/ablation.py --quality-run /tmp/runs/quality_flair --name base --resume \
        --minutes 30 --epochs 33    # finish a run the budget stopped (a busy machine) at its epoch cap

Results: ``--out`` (default ``benchmarks/results/ablation``) / NAME / ``scores.json``, with the
run folder and predictions beside it. Single runs vary by about 1 dB from seed to seed and with
the budget; compare runs made the same way.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS_DIR, command_line, commit_line, git_commit, machine_info, machine_line, use_cache_dir
from mrisynth.cases import discover_cases
from mrisynth.evaluate import pair_predictions, read_pair
from mrisynth.metrics import brain_errors, normalise_percentile
from mrisynth.modalities import MODALITIES
from mrisynth.predict import Synthesizer, write_result
from mrisynth.train import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train lite_vae_unet with one setting changed; brain PSNR on 4 targets.")
    p.add_argument("--quality-run", type=Path, required=True, help="a quality.py work folder (its cases/train and cases/test)")
    p.add_argument("--name", required=True, help="name of this variant (its folder under --out)")
    p.add_argument("--set", default="{}", help="JSON of training settings over the recipe, e.g. '{\"lr\": 1e-3}'")
    p.add_argument("--minutes", type=float, default=12.0, help="training budget, wall clock (default 12)")
    p.add_argument("--epochs", type=int, default=100, help="epoch cap, high so the budget stops training (default 100)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "ablation")
    p.add_argument("--cache-dir", type=Path, default=None, help="slice cache (default: the user cache)")
    p.add_argument("--resume", action="store_true",
                   help="continue NAME's run (one the budget stopped before its epoch cap) with a fresh --minutes, "
                        "then predict and score; --set is ignored (the run keeps its settings)")
    return p.parse_args(argv)


def brain_scores(pred_dir: Path, test_root: Path, target: str) -> list[dict]:
    """Per case: brain PSNR, MAE and mean signed error after the protocol's percentile scaling."""
    pairs, _ = pair_predictions(pred_dir, test_root, modality=target)
    rows = []
    for pair in pairs:
        data = read_pair(pair)
        ref_n, pred_n = (normalise_percentile(v, data.mask) for v in (data.reference, data.prediction))
        rows.append({"case": pair.case_id, **brain_errors(ref_n, pred_n, data.mask)})
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    use_cache_dir(args.cache_dir, args.quality_run)
    folder = args.out / args.name
    earlier = folder / "scores.json"
    if args.resume:  # the run keeps its settings; the stopped run's scores are kept beside the new ones
        overrides = json.loads(earlier.read_text())["settings"] if earlier.exists() else {}
        if earlier.exists():
            earlier.replace(folder / "scores_before_resume.json")
        config = {"max_minutes": args.minutes, "epochs": args.epochs}
    else:
        overrides = json.loads(args.set)
        config = {"model": "lite_vae_unet", "target": "any", "max_minutes": args.minutes, "epochs": args.epochs,
                  "val_slices": 128, "device": "cpu", **overrides}
    start = time.perf_counter()
    best = train(config, args.quality_run / "cases" / "train", folder / "run", resume=args.resume)
    train_s = time.perf_counter() - start
    synthesizer = Synthesizer.from_checkpoint(best, device="cpu", threads=args.threads)
    test_root = args.quality_run / "cases" / "test"
    scores = {}
    for target in MODALITIES:
        pred_dir = folder / "predictions" / target
        pred_dir.mkdir(parents=True, exist_ok=True)
        for case in discover_cases(test_root):
            write_result(synthesizer.predict(case, missing=target), pred_dir, overwrite=True)
        rows = brain_scores(pred_dir, test_root, target)
        scores[target] = {**{k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "mae", "bias")}, "cases": rows}
        print(f"{args.name} {target}: brain PSNR {scores[target]['psnr']:.2f} dB, MAE {scores[target]['mae']:.4f}, "
              f"bias {scores[target]['bias']:+.3f}", flush=True)
    report = {"name": args.name, "settings": overrides, "train_s": round(train_s, 1), "resumed": args.resume, "command": command_line("ablation.py", argv),
              "commit": commit_line(git_commit()), "machine": machine_line(machine_info(args.threads)), "scores": scores}
    (folder / "scores.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
