"""Downstream check: does a synthetic sequence keep tumour segmentation working? (BraSyn's criterion)

Image similarity can hide a blurred or shifted tumour; what users need is that a segmenter fed the
completed set still finds the tumour. This script takes a finished ``benchmarks/quality.py`` work
folder (its split, held-out cases and every contender's predictions), trains a reference segmenter
(``benchmarks/segmenter.py``) on the same training pool with the real four sequences and their
labels, and segments every held-out case:

* ``real``: all four real sequences (the ceiling, one per case);
* for every target the quality run synthesized, the real target replaced by each contender's
  prediction (``copy`` and ``voxel-regression`` baselines included), and by ``zeros`` (the floor:
  the sequence is simply missing).

Scores per region (whole tumour, tumour core, enhancing tumour): Dice and 95 % Hausdorff distance in
mm from MONAI (``compute_dice``, ``compute_hausdorff_distance`` with the voxel spacing), empty
regions handled the BraTS way: both empty -> Dice 1, HD95 0; exactly one empty -> Dice 0, HD95
373.13 mm (the BraTS 2021+ penalty, the diagonal of the 240x240x155 grid). Then, per target and
region, how much of the Dice lost to a missing sequence the synthetic one recovers:
``(contender - zeros) / (real - zeros)`` on the mean Dice.

    .venv/bin/python benchmarks/quality.py --all-targets --out /tmp/q          # first: the contenders' predictions
    .venv/bin/python benchmarks/downstream.py --quality-run /tmp/q --publish  # then: about 40 min on a 2-core CPU

Outputs go to ``--out`` (default ``QUALITY_RUN/downstream``): ``segmenter.pt`` (reused when present
and trained with the same settings), ``downstream.csv`` (a row per case, target, condition,
region), ``downstream.json`` and ``downstream.md``; ``--publish`` copies the last three to
``docs/results/downstream-<date>.*``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import (
    PUBLISH_DIR, command_line, commit_line, git_commit, load_average, machine_info, machine_line, print_summary, write_results,
)
from mrisynth.cases import Case, discover_cases
from mrisynth.io import BRATS_LABELS, check_same_grid, load_volume, read_images, read_segmentation
from mrisynth.modalities import MODALITIES
from mrisynth.predict import output_path
from segmenter import (
    REGIONS, case_mask, load_segmenter, prepare_inputs, region_masks, save_segmenter, segment,
    train_segmenter,
)

HD95_EMPTY_PENALTY = 373.13  # mm: BraTS 2021+ value when exactly one of prediction / reference is empty
REAL, ZEROS = "real", "zeros"


# --- metrics -------------------------------------------------------------------------------------


def region_scores(predicted: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    """Dice and HD95 (mm) of one binary region, with BraTS's rules for empty masks."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    has_pred, has_ref = bool(predicted.any()), bool(reference.any())
    if not has_pred and not has_ref:
        return {"dice": 1.0, "hd95": 0.0}
    if has_pred != has_ref:
        return {"dice": 0.0, "hd95": HD95_EMPTY_PENALTY}
    box = _bounding_box(predicted | reference, margin=2)  # distances are unchanged inside this box
    p = torch.from_numpy(np.ascontiguousarray(predicted[box]))[None, None]
    r = torch.from_numpy(np.ascontiguousarray(reference[box]))[None, None]
    dice = compute_dice(p, r, include_background=True, ignore_empty=False)
    hd95 = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=list(spacing))
    return {"dice": float(dice), "hd95": float(hd95)}


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


#: below this loss of mean Dice, missing the sequence costs the segmenter too little for a share of it
#: to mean anything (with 5 cases, a few hundredths of Dice is case-to-case noise)
MIN_LOSS = 0.05


def recovery(contender: float, zeros: float, real: float, min_loss: float = MIN_LOSS) -> float | None:
    """Share of the Dice lost to a missing sequence that ``contender`` gives back (None: nothing lost)."""
    lost = real - zeros
    return None if lost < min_loss else (contender - zeros) / lost


# --- the quality run -----------------------------------------------------------------------------


def read_quality_run(run: Path) -> dict[str, Any]:
    """Split, held-out and training cases, and the contenders' prediction folders of a quality run."""
    report_path = run / "quality.json"
    if not report_path.is_file():
        sys.exit(f"{report_path}: not found; give the --out folder of a finished benchmarks/quality.py run")
    report = json.loads(report_path.read_text())
    conditions: dict[str, dict[str, Path]] = {}  # target -> contender id -> prediction folder
    for contender in report["contenders"]:
        for target in contender["targets"]:
            folder = run / "predictions" / contender["id"].replace(":", "-") / target
            if not folder.is_dir():
                sys.exit(f"{folder}: predictions of {contender['id']} for {target} are missing from the quality run")
            conditions.setdefault(target, {})[contender["id"]] = folder
    return {
        "report": report,
        "train": discover_cases(run / "cases" / "train"),
        "test": discover_cases(run / "cases" / "test"),
        "conditions": {t: conditions[t] for t in MODALITIES if t in conditions},
    }


def segmenter_for(train_cases: list[Case], args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """Train the reference segmenter, or reuse the one in ``--out`` trained with the same settings."""
    path = args.out / "segmenter.pt"
    wanted = {"minutes": args.minutes, "seed": args.seed, "cases": [c.id for c in train_cases]}
    if path.is_file():
        model, info = load_segmenter(path)
        if all(info.get(k) == v for k, v in wanted.items()):
            print(f"reusing the reference segmenter {path} ({info['steps']} steps)", flush=True)
            return model, {**info, "reused": True}
        sys.exit(f"{path} was trained with other settings or cases: delete it or choose another --out")
    print(f"training the reference segmenter for {args.minutes:g} min on {len(train_cases)} cases", flush=True)
    model, info = train_segmenter(train_cases, args.minutes, seed=args.seed, log=lambda m: print(m, flush=True))
    save_segmenter(model, info, path)
    return model, info


# --- one held-out case ---------------------------------------------------------------------------


def score_case(model: torch.nn.Module, case: Case, conditions: dict[str, dict[str, Path]]) -> list[dict]:
    """Rows (condition, target, region, dice, hd95) of every condition of one held-out case."""
    volumes, geometry = read_images(case.modalities)
    labels = read_segmentation(case.seg, geometry, labels=BRATS_LABELS[case.scheme], strict=True)
    reference = region_masks(labels, case.scheme)
    spacing = tuple(float(s) for s in geometry.header.get_zooms()[:3])
    mask = case_mask(volumes)

    def run(condition: str, target: str, replaced: dict[str, np.ndarray]) -> list[dict]:
        start = time.perf_counter()
        predicted = segment(model, prepare_inputs(replaced, geometry.affine, mask), mask)
        rows = [{"case": case.id, "target": target, "condition": condition, "region": region,
                 **region_scores(predicted[i], reference[i], spacing)} for i, region in enumerate(REGIONS)]
        print(f"  {case.id} {target:5s} {condition:22s} Dice " + " ".join(f"{r['region']} {r['dice']:.3f}" for r in rows)
              + f" ({time.perf_counter() - start:.1f} s)", flush=True)
        return rows

    rows = run(REAL, "-", volumes)
    for target, contenders in conditions.items():
        for contender, folder in contenders.items():
            path = output_path(folder, case, target)
            synthetic, synthetic_geometry = load_volume(path, allow_constant=True)
            check_same_grid(geometry, synthetic_geometry)
            rows += run(contender, target, {**volumes, target: synthetic})
        rows += run(ZEROS, target, {**volumes, target: np.zeros_like(volumes[target])})
    return rows


# --- summary -------------------------------------------------------------------------------------


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Mean and sd of Dice and HD95 per (target, condition, region); recovery per contender."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["target"], row["condition"], row["region"]), []).append(row)
    stats = {}
    for (target, condition, region), members in groups.items():
        entry = {"n": len(members)}
        for key in ("dice", "hd95"):
            values = [m[key] for m in members]
            entry[key] = statistics.mean(values)
            entry[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        stats[f"{target}|{condition}|{region}"] = entry
    recoveries = {}
    for key, entry in stats.items():
        target, condition, region = key.split("|")
        if target == "-" or condition == ZEROS:
            continue
        real = stats[f"-|{REAL}|{region}"]["dice"]
        zeros = stats[f"{target}|{ZEROS}|{region}"]["dice"]
        recoveries[key] = recovery(entry["dice"], zeros, real)
    return {"stats": stats, "recovery": recoveries}


def markdown(report: dict[str, Any]) -> str:
    stats, recoveries = report["summary"]["stats"], report["summary"]["recovery"]
    seg = report["segmenter"]
    lines = [
        f"### Downstream: tumour segmentation with a synthetic sequence, {report['n_cases']} held-out BraTS cases",
        "",
        f"Command: `{report['command']}`" + (f" (summary recomputed from its rows by `{report['rescored_by']}`)" if report.get("rescored_by") else "") + "  ",
        f"{commit_line(report['commit'])}; date {report['started']}; wall time {report['wall_s'] / 60:.1f} min  ",
        f"Machine: {machine_line(report['machine'])}  ",
        f"Quality run: `{report['quality_run']}` (its split, held-out cases and predictions; `{report['quality_command']}`)  ",
        f"Reference segmenter: MONAI 2D BasicUNet, {seg['parameters']:,} parameters, trained {seg['minutes']:g} min "
        f"({seg['steps']} steps of {seg['batch']} crops, final loss {seg['final_loss']}) on the {len(seg['cases'])} "
        "training-pool cases with the real four sequences; never tuned on the held-out cases.",
        "",
        "| target | input for the target | Dice WT | Dice TC | Dice ET | HD95 WT mm | HD95 TC mm | HD95 ET mm | recovered WT / TC / ET |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def cells(target: str, condition: str) -> list[str]:
        dice = [stats[f"{target}|{condition}|{r}"] for r in REGIONS]
        return ([f"{d['dice']:.3f} ± {d['dice_sd']:.3f}" for d in dice] + [f"{d['hd95']:.1f}" for d in dice])

    lines.append("| all real (ceiling) | real | " + " | ".join(cells("-", REAL)) + " | 100 % |")
    for target in report["targets"]:
        for condition in report["conditions"][target] + [ZEROS]:
            rec = [recoveries.get(f"{target}|{condition}|{r}") for r in REGIONS]
            rec_cell = "0 % (floor)" if condition == ZEROS else " / ".join("n/a" if v is None else f"{100 * v:.0f} %" for v in rec)
            lines.append(f"| {target} | {condition} | " + " | ".join(cells(target, condition)) + f" | {rec_cell} |")
    lines += ["", "Recovery of the Dice lost when the sequence is missing, (contender − zeros) / (real − zeros) on the mean Dice:", ""]
    lines += [f"- {sentence}" for sentence in recovery_sentences(report)]
    lines += ["", "Dice and HD95 from MONAI (`compute_dice`, `compute_hausdorff_distance`, percentile 95, voxel spacing); "
              "BraTS rules for empty regions (both empty: Dice 1, HD95 0; one empty: Dice 0, HD95 373.13 mm). "
              "WT = labels 1+2+4, TC = 1+4, ET = 4. Mean ± sd over the held-out cases; HD95 means. "
              f"n/a: the missing sequence costs the segmenter less than {MIN_LOSS} Dice there, too little for a share of it to mean anything."]
    return "\n".join(lines) + "\n"


def recovery_sentences(report: dict[str, Any]) -> list[str]:
    """One sentence per target: what each contender gives back of the Dice a missing sequence costs."""
    stats, recoveries = report["summary"]["stats"], report["summary"]["recovery"]
    sentences = []
    for target in report["targets"]:
        lost = ", ".join(f"{r} {stats[f'-|{REAL}|{r}']['dice'] - stats[f'{target}|{ZEROS}|{r}']['dice']:.3f}" for r in REGIONS)
        parts = []
        for condition in report["conditions"][target]:
            values = [recoveries.get(f"{target}|{condition}|{r}") for r in REGIONS]
            parts.append(f"{condition} " + " / ".join("n/a" if v is None else f"{100 * v:.0f} %" for v in values))
        sentences.append(f"**{target}** missing costs the segmenter Dice {lost} (real minus zeros); recovered (WT / TC / ET): " + "; ".join(parts) + ".")
    return sentences


def per_case_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case", "target", "condition", "region", "dice", "hd95"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "dice": f"{row['dice']:.4f}", "hd95": f"{row['hd95']:.2f}"})
    return buffer.getvalue()


def write_outputs(report: dict, rows: list[dict], out: Path, publish: Path | None) -> list[Path]:
    texts = {"md": markdown(report), "csv": per_case_csv(rows), "json": json.dumps({**report, "rows": rows}, indent=1) + "\n"}
    return write_results(texts, out, "downstream", report["started"], publish)


def rescore(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The summary and tables again from an earlier run's per-case rows (no segmentation)."""
    path = args.out / "downstream.json"
    if not path.is_file():
        sys.exit(f"{path}: not found; --rescore needs a finished downstream run in --out")
    saved = json.loads(path.read_text())
    rows = saved.pop("rows")
    report = {**saved, "summary": summarise(rows), "rescored_by": command_line("downstream.py", argv)}
    print_summary(markdown(report), write_outputs(report, rows, args.out, args.publish))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quality-run", type=Path, required=True, help="the --out folder of a finished benchmarks/quality.py run")
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget of the reference segmenter (default 15)")
    p.add_argument("--seed", type=int, default=0, help="seed of the segmenter's initialisation and sampling (default 0)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    p.add_argument("--out", type=Path, default=None, help="work folder (default QUALITY_RUN/downstream)")
    p.add_argument("--rescore", action="store_true",
                   help="segment nothing: recompute the summary and tables from the per-case rows of OUT/downstream.json "
                        "(after a change to how results are summarised)")
    p.add_argument("--publish", nargs="?", type=Path, const=PUBLISH_DIR, default=None, metavar="DIR",
                   help="copy downstream.{md,csv,json} to DIR (default docs/results) as downstream-<date>.*")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, clock = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter()
    torch.set_num_threads(args.threads)
    run = read_quality_run(args.quality_run)
    args.out = args.out or args.quality_run / "downstream"
    if args.rescore:
        return rescore(args, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model, seg_info = segmenter_for(run["train"], args)
    targets = list(run["conditions"])
    print(f"segmenting {len(run['test'])} held-out cases: real, then per target ({', '.join(targets)}) "
          f"{', '.join(next(iter(run['conditions'].values())))} and zeros", flush=True)
    rows = []
    for case in run["test"]:
        rows += score_case(model, case, run["conditions"])
    report = {
        "benchmark": "downstream", "command": command_line("downstream.py", argv), "commit": git_commit(),
        "started": started, "machine": machine_info(args.threads), "quality_run": str(args.quality_run),
        "quality_command": run["report"]["command"], "segmenter": seg_info, "n_cases": len(run["test"]),
        "targets": targets, "conditions": {t: list(c) for t, c in run["conditions"].items()},
        "summary": summarise(rows), "wall_s": round(time.perf_counter() - clock, 1), "load_average_end": load_average(),
    }
    print_summary(markdown(report), write_outputs(report, rows, args.out, args.publish))
    return 0


if __name__ == "__main__":
    sys.exit(main())
