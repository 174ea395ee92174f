"""Quality benchmark: every contender on the same held-out BraTS cases, in one run, one protocol.

Why one command: a user picks a synthesis tool by how good and how fast it is, and a figure is only
comparable with another if both come from the same cases, the same training budget, the same
machine and the same scoring code. This script makes all of them in one run:

* a fixed patient-level split (``--test-cases`` patients drawn with ``--split-seed``; written to
  ``OUT/split.json``): the held-out cases are never seen by any contender, not in training, not in
  validation, not in fitting;
* contenders (see ``benchmarks/baselines.py`` for the first two):
  ``copy`` (the normalised most similar available modality), ``voxel-regression`` (per-voxel
  gradient boosting on the inputs and their blurs), and every registered model
  (``mrisynth.models.available_models()``) trained with ``mrisynth.train.train`` for the same
  wall-clock budget ``--minutes`` on the training cases only: ``vae_unet`` (the seed) one model
  per target with its own recipe, every newer model one ``any``-target model for all four targets
  (``--fixed-target-new``: one per target too);
* predictions written as NIfTI in BraSyn layout (``<ID>_flair.nii.gz``) like ``mrisynth predict``
  does, with the target named explicitly (the real target file is ignored), then scored with
  ``mrisynth.evaluate.evaluate_folder`` -- the code behind ``mrisynth evaluate``.

Usage, from the repository root (times for a quiet 2-core CPU)::

    .venv/bin/python benchmarks/quality.py --publish                # FLAIR, 5 test cases, 12 min/model: ~40 min
    .venv/bin/python benchmarks/quality.py --all-targets --publish  # the four targets: ~1 h 45 min
    .venv/bin/python benchmarks/quality.py --minutes 0.3 --test-cases 2 --max-train-cases 3 \\
        --out /tmp/q                                                # smoke test: a few minutes
    .venv/bin/python benchmarks/quality.py --all-targets --models vae_unet --baselines --train-seed 1 \\
        --threads 1 --out /tmp/q1                                   # the seed's models at training seed 1

Where things go:

* ``--out`` (default ``benchmarks/results/quality-<date>-<time>``, ignored by git): the split, the
  symbolic-link case roots, training runs (checkpoints), predictions, per-contender evaluation
  JSON/CSV, and the summary ``quality.md``, ``quality.csv`` (one row per case) and ``quality.json``
  (everything). Re-running with the same ``--out`` reuses finished training runs.
* ``--publish [DIR]`` (default DIR ``docs/results``): copies the three summary files there as
  ``quality-<target|all>-<date>.{md,csv,json}``, the small files meant to be committed.
* The slice cache goes to ``--cache-dir`` (default: ``$MRISYNTH_CACHE_DIR`` or the user cache);
  nothing is ever written under ``--data``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrisynth.cases import Case, discover_cases
from mrisynth.checkpoint import build_model_from_checkpoint, load_checkpoint
from mrisynth.evaluate import METRIC_KEYS, PROTOCOL, evaluate_folder, json_safe, write_outputs
from mrisynth.modalities import MODALITIES
from mrisynth.models import available_models
from mrisynth.predict import Synthesizer, parse_missing, write_result
from mrisynth.train import patient_id, resolve_config, train, usable_cases

from _common import (
    BASELINES, DEFAULT_DATA, PUBLISH_DIR, RESULTS_DIR, SEED_ID, SEED_MODEL, TIMING_KEYS, Contender, all_contenders,
    check_models, command_line, commit_line, fmt, git_commit, load_average, machine_info, machine_line, median, print_summary,
    refuse_inside, timestamp, timing_row, use_cache_dir, write_results,
)

TRAINING_MARKER = "benchmark-training.json"


# --- options -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Quality of every contender on the same held-out BraTS cases, scored by mrisynth evaluate. "
                    "Defaults fit a 2-core CPU in about 40 minutes (FLAIR, two registered models).",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="root of BraTS cases, read only (default ../shared/data/brats18)")
    p.add_argument("--test-cases", type=int, default=5, help="held-out patients, the same for every contender (default 5)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level test split (default 0)")
    p.add_argument("--train-seed", type=int, default=0,
                   help="seed of every network's training, which also draws its validation patients from the training "
                        "pool (default 0); the test split stays --split-seed's, so runs of two seeds pair case by case")
    p.add_argument("--max-train-cases", type=int, default=None,
                   help="use at most this many of the other patients to learn from (default: all; small for smoke runs)")
    p.add_argument("--target", default="flair", help="the modality to synthesize: t1, t1ce, t2 or flair (default flair)")
    p.add_argument("--all-targets", action="store_true", help="benchmark all four targets (overrides --target)")
    p.add_argument("--minutes", type=float, default=12.0,
                   help="training budget of every network run, wall clock, validation included (max_minutes; default 12)")
    p.add_argument("--epochs", type=int, default=10,
                   help="epoch cap of every training run (default 10, the seed recipe's); the budget usually stops first")
    p.add_argument("--val-slices", type=int, default=128,
                   help="validation slices per epoch in training, so validation costs little of the budget (default 128)")
    p.add_argument("--models", nargs="*", default=None,
                   help=f"registered models to train (default: all, now {', '.join(available_models())}; "
                        "the option alone: none)")
    p.add_argument("--fixed-target-new", action="store_true",
                   help=f"train newer models (not {SEED_MODEL}) one per target instead of one any-target model")
    p.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES),
                   help="non-network contenders (default: both; the option alone: none)")
    p.add_argument("--voxels", type=int, default=200_000, help="training voxels sampled for voxel-regression (default 200000)")
    p.add_argument("--batch-size", type=int, default=16, help="slices per network pass when predicting (default 16)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and scikit-learn (default 2)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="device for training and prediction (default cpu)")
    p.add_argument("--out", type=Path, default=None,
                   help="work folder (default benchmarks/results/quality-<date>-<time>, ignored by git)")
    p.add_argument("--publish", nargs="?", type=Path, const=PUBLISH_DIR, default=None, metavar="DIR",
                   help="also copy the summary .md/.csv/.json to DIR (the option alone: docs/results)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="slice cache (default: $MRISYNTH_CACHE_DIR or the user cache directory)")
    args = p.parse_args(argv)
    if args.test_cases < 1:
        p.error("--test-cases: expected at least 1")
    if args.minutes <= 0:
        p.error("--minutes: expected a positive budget")
    if args.threads < 1:
        p.error("--threads: expected at least 1")
    args.out = args.out or RESULTS_DIR / f"quality-{timestamp()}"
    return args


# --- the split -----------------------------------------------------------------------------------


def make_split(cases: list[Case], n_test: int, seed: int, max_train: int | None) -> dict:
    """Held-out and training patients, drawn once: every contender sees exactly this split.

    Patients (not cases) are drawn, so all timepoints of a BraTS 2023 patient fall on one side.
    """
    patients = sorted({patient_id(c) for c in cases})
    if n_test > len(patients) - 2:
        sys.exit(f"--test-cases {n_test}: {len(patients)} patients leave fewer than 2 for training (one is validation)")
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    test, pool = set(order[:n_test]), order[n_test:]
    train_patients = set(pool if max_train is None else pool[:max(max_train, 2)])
    return {
        "seed": seed,
        "test": sorted(c.id for c in cases if patient_id(c) in test),
        "train_pool": sorted(c.id for c in cases if patient_id(c) in train_patients),
        "unused": sorted(c.id for c in cases if patient_id(c) not in test | train_patients),
        "note": "train_pool is all a contender may learn from; networks split it further into train and "
                "validation patients (mrisynth.train, val_fraction 0.2, seed --train-seed): see each run's splits.json",
    }


def link_cases(cases: list[Case], folder: Path) -> Path:
    """A root holding symbolic links to exactly these cases' files, one folder per case.

    Why links: ``train()`` and ``evaluate_folder()`` take a data root and use every complete case
    under it, so a root with only the training (or test) cases restricts them without a hook in
    the library, and without copying or writing next to the data.
    """
    if folder.exists():
        shutil.rmtree(folder)
    for case in cases:
        case_dir = folder / case.id
        case_dir.mkdir(parents=True)
        for path in [*case.modalities.values(), *([case.seg] if case.seg else [])]:
            (case_dir / path.name).symlink_to(path.resolve())
    return folder


# --- producing predictions -----------------------------------------------------------------------


def predict_cases(predict_one, cases: list[Case], pred_dir: Path) -> list[dict[str, Any]]:
    """Run ``predict_one(case)`` on every case, write each result like ``mrisynth predict``, time it."""
    pred_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        start = time.perf_counter()
        result = predict_one(case)
        written = time.perf_counter()
        write_result(result, pred_dir, overwrite=True)
        done = time.perf_counter()
        rows.append(timing_row(case.id, result.timings, done - written, done - start))
    return rows


def run_baseline(contender: Contender, target: str, args: argparse.Namespace, train_cases: list[Case],
                 test_cases: list[Case], pred_dir: Path) -> tuple[list[dict], dict | None]:
    """Predictions of ``copy`` or ``voxel-regression`` (fitted first, on the training pool only)."""
    from baselines import VoxelRegression, copy_predict

    if contender.id == "copy":
        return predict_cases(lambda case: copy_predict(case, target), test_cases, pred_dir), None
    regression = VoxelRegression(target, n_voxels=args.voxels)
    print(f"voxel-regression for {target}: fitting on {args.voxels:,} voxels of {len(train_cases)} training cases", flush=True)
    fit = regression.fit(train_cases)
    print(f"  fitted in {fit['fit_s']:.0f} s ({fit['iterations']} boosting iterations)", flush=True)
    fitted = {"kind": "voxel-regression", **regression.settings(), **fit}
    return predict_cases(regression.predict, test_cases, pred_dir), fitted


def training_config(model: str, train_target: str, args: argparse.Namespace) -> dict:
    """The settings this benchmark gives a training run; the model's recipe supplies the rest."""
    config = {"model": model, "target": train_target, "max_minutes": args.minutes, "epochs": args.epochs,
              "val_slices": args.val_slices, "device": args.device}
    if args.train_seed:  # absent for 0 (the default), so runs recorded before the option existed stay reusable
        config["seed"] = args.train_seed
    return config


def train_network(contender: Contender, train_target: str, args: argparse.Namespace, train_root: Path,
                  train_pool: list[str]) -> dict:
    """Train one run with ``mrisynth.train.train`` under the common budget (or reuse a finished one)."""
    run_dir = args.out / "runs" / f"{contender.model}-{train_target}"
    marker = run_dir / TRAINING_MARKER
    config = training_config(contender.model, train_target, args)
    if marker.exists():
        info = json.loads(marker.read_text())
        check_reusable(info, config, train_pool)
        print(f"reusing the finished training run {run_dir}", flush=True)
        return {**info, "reused": True}
    if run_dir.exists():
        sys.exit(f"{run_dir} holds an unfinished training run: delete it (or choose another --out) and run again")
    print(f"training {contender.model} (target {train_target}) for at most {args.minutes:g} min", flush=True)
    start = time.perf_counter()
    best = train(config, train_root, run_dir)
    info = training_summary(run_dir, best, time.perf_counter() - start, config)
    marker.write_text(json.dumps(info, indent=1) + "\n")
    return info


def training_summary(run_dir: Path, best: Path, wall_s: float, config: dict) -> dict:
    """Steps, epochs and seconds of a finished run, from its metrics.csv and best checkpoint."""
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    checkpoint = load_checkpoint(best)
    resolved = checkpoint["config"]
    last = rows[-1]
    train_s = sum(float(r["seconds"]) for r in rows)
    steps = int(last["step"])
    model = build_model_from_checkpoint(checkpoint)
    return {
        "kind": "training", "run_dir": str(run_dir), "checkpoint": str(best), "config": config,
        "batch_size": resolved["batch_size"], "steps": steps, "epochs_done": float(last["epoch"]),
        "train_s": round(train_s, 1), "wall_s": round(wall_s, 1),
        "slices_per_s": round(steps * resolved["batch_size"] / train_s, 2) if train_s else None,
        "stopped_by": "budget" if float(last["epoch"]) < resolved["epochs"] else "epochs",
        "best_step": int(checkpoint["step"]), "best_val_l1": float(checkpoint["metrics"]["val_l1"]),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "train_cases": sorted(json.loads((run_dir / "splits.json").read_text())["train"]),
        "val_cases": sorted(json.loads((run_dir / "splits.json").read_text())["val"]),
    }


#: settings of a resolved training config that do not change what a run learns; every other one
#: (a model's recipe included, and any setting added later) must match for a run to be reused
NON_RECIPE_KEYS = ("device", "num_workers", "deterministic")


def check_reusable(info: dict, config: dict, train_pool: list[str]) -> None:
    """A finished run is reused only if it was trained with these settings on this training pool,
    and with the model's current recipe (``configs/models/<model>.yaml`` may have changed since)."""
    same_pool = sorted(info["train_cases"] + info["val_cases"]) == sorted(train_pool)
    # a saved config takes the defaults (not today's recipe) for settings added since it was saved
    wanted, saved = resolve_config(config), resolve_config(load_checkpoint(info["checkpoint"])["config"], use_recipe=False)
    same_recipe = all(wanted.get(k) == saved.get(k) for k in set(wanted) | set(saved) if k not in NON_RECIPE_KEYS)
    if not same_pool or info["config"] != config or not same_recipe:
        sys.exit(f"{info['run_dir']} was trained with other settings or cases than this run asks for: "
                 "choose another --out (or delete that run folder)")


def run_network(checkpoint: str, target: str, args: argparse.Namespace, test_cases: list[Case], pred_dir: Path) -> list[dict]:
    """The trained model on every held-out case, the target named explicitly (as ``--missing``)."""
    synthesizer = Synthesizer.from_checkpoint(checkpoint, device=args.device, threads=args.threads)
    return predict_cases(
        lambda case: synthesizer.predict(case, missing=target, batch_size=args.batch_size), test_cases, pred_dir
    )


# --- scoring and summarising ---------------------------------------------------------------------


def score(contender: Contender, target: str, pred_dir: Path, test_root: Path, timings: list[dict], out: Path) -> dict:
    """``mrisynth evaluate`` on the predictions; per-case rows with the timings merged in."""
    evaluation = evaluate_folder(pred_dir, test_root, modality=target)
    write_outputs(evaluation, out / "evaluations" / f"{safe(contender.id)}-{target}.json")
    for case_id, error in evaluation.failed:
        print(f"  evaluation failed for {case_id}: {error}", file=sys.stderr)
    warnings = list(getattr(evaluation, "warnings", []))  # e.g. unexpected segmentation labels
    for line in warnings:
        print(f"  evaluation warning: {line}", file=sys.stderr)
    by_case = {t["case"]: t for t in timings}
    cases = [{**row, **{k: v for k, v in by_case.get(row["case"], {}).items() if k != "case"}} for row in evaluation.rows]
    return {
        "summary": evaluation.summary,
        "timing_median_s": {k: median([t[k] for t in timings]) for k in TIMING_KEYS},
        "cases": cases,
        "failed": [{"case": c, "error": e} for c, e in evaluation.failed],
        "warnings": warnings,
    }


def paired_difference(results: dict, contender_id: str, target: str, key: str = "psnr") -> dict | None:
    """Per-case ``key`` of a contender minus the seed's on the same cases: mean and cases better."""
    if contender_id == SEED_ID or SEED_ID not in results or target not in results[SEED_ID]["targets"]:
        return None
    seed = {r["case"]: r.get(key) for r in results[SEED_ID]["targets"][target]["cases"]}
    mine = {r["case"]: r.get(key) for r in results[contender_id]["targets"][target]["cases"]}
    diffs = [mine[c] - seed[c] for c in mine if c in seed and _finite(mine[c]) and _finite(seed[c])]
    if not diffs:
        return None
    return {"mean": float(np.mean(diffs)), "better": sum(d > 0 for d in diffs), "n": len(diffs)}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def mean_sd(summary: dict, key: str, digits: int) -> str:
    stats = summary.get(key) or {}
    if stats.get("mean") is None:
        return "–"
    sd = stats.get("sd")
    return f"{stats['mean']:.{digits}f} ± {'–' if sd is None else f'{sd:.{digits}f}'}"


def training_cell(info: dict | None) -> str:
    """What learning a contender did, in one table cell."""
    if info is None:
        return "none"
    if info["kind"] == "voxel-regression":
        return f"{info['iterations']} boosting iterations on {info['voxels']:,} voxels, {info['sample_s'] + info['fit_s']:.0f} s"
    return (f"{info['steps']} steps (best at {info['best_step']}), {info['train_s'] / 60:.1f} min, "
            f"{info['epochs_done']:.2f} epochs, stopped by {info['stopped_by']}")


def markdown(report: dict) -> str:
    """The summary block for docs/benchmarks.md: how it was made, then one row per contender and target."""
    settings = report["settings"]
    split = report["split"]
    targets = report["targets"]
    lines = [
        f"### Quality: synthesizing {', '.join(t.upper() for t in targets)} on {len(split['test'])} held-out BraTS cases",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: {commit_line(report['commit'])}; date {report['started']}; wall time {report['wall_s'] / 60:.1f} min "
        f"(load average {report.get('load_average_end')} at the end)  ",
        f"Machine: {machine_line(report['machine'])}  ",
        f"Split (seed {split['seed']}): test {', '.join(split['test'])}; {len(split['train_pool'])} training-pool cases "
        f"(networks: 20% of them for validation)  ",
        f"Training: every network run gets {settings['minutes']:g} min wall clock (validation on {settings['val_slices']} "
        f"slices included), at most {settings['epochs']} epochs, otherwise each model's recipe (configs/default.yaml, overlaid by configs/models/<model>.yaml where present); "
        f"training seed {settings.get('train_seed', 0)}; device {settings['device']}, {settings['threads']} threads.",
        "",
        "| contender | target | PSNR dB (brain) | MAE (brain) | SSIM 2D (brain) | SSIM tumour (BraSyn) | SSIM non-tumour (BraSyn) "
        "| PSNR_full dB | ΔPSNR vs seed (cases better) | compute s/vol | total s/vol | learning |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for target in targets:
        for entry in report["contenders"]:
            result = entry["targets"].get(target)
            if result is None:
                continue
            s = result["summary"]
            diff = result.get("psnr_vs_seed")
            diff_cell = "–" if diff is None else f"{diff['mean']:+.2f} ({diff['better']}/{diff['n']})"
            timing = result["timing_median_s"]
            lines.append(
                f"| {entry['label']} | {target} | {mean_sd(s, 'psnr', 2)} | {mean_sd(s, 'mae', 4)} | {mean_sd(s, 'ssim2d', 4)} "
                f"| {mean_sd(s, 'ssim_tumour', 4)} | {mean_sd(s, 'ssim_nontumour', 4)} | {mean_sd(s, 'psnr_full', 2)} "
                f"| {diff_cell} | {fmt(timing['compute_s'], 2)} | {fmt(timing['total_s'], 2)} "
                f"| {training_cell(entry['learning'].get(target))} |"
            )
    problems = [f"{entry['id']} / {target} / {f['case']}: {f['error']}" for entry in report["contenders"]
                for target, result in entry["targets"].items() for f in result["failed"]]
    if problems:
        lines += ["", "**Not scored** (left out of the means above): " + "; ".join(problems)]
    lines += [
        "",
        f"Metrics: mean ± sd over the test cases, scored by `mrisynth.evaluate` (the code of `mrisynth evaluate`; "
        f"protocol in `mrisynth.evaluate.PROTOCOL`): brain metrics after 1–99 pct scaling inside the inputs' brain mask; "
        f"BraSyn SSIMs (torchmetrics 3D SSIM on tumour- / non-tumour-masked volumes, 0.5–99.5 pct scaling) and PSNR_full "
        f"(background included) are literature-style and not comparable with the brain figures. ΔPSNR: mean paired "
        f"per-case difference to {SEED_MODEL} (one model per target) and the number of cases where the contender is better. "
        f"Timings: medians over the test cases of this run; compute = the network's forward passes (copy: picking the volume; "
        f"voxel-regression: features + prediction); total = read + preprocess + compute + restore + write of one "
        f"240×240×155 case. Learning: for networks the optimizer steps (batch size of the model's recipe) done within the budget and the step of the "
        f"checkpoint used (lowest validation L1).",
    ]
    return "\n".join(lines)


def per_case_csv(report: dict) -> str:
    """One row per contender, target and case: every metric and every timing."""
    columns = ["contender", "label", "target", "case", *METRIC_KEYS, "note", *TIMING_KEYS, "prediction"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in report["contenders"]:
        for target, result in entry["targets"].items():
            for row in result["cases"]:
                values = {**row, "contender": entry["id"], "label": entry["label"], "target": target}
                writer.writerow({k: ("" if values.get(k) is None else values.get(k)) for k in columns})
    return buffer.getvalue()


def write_report(report: dict, out: Path, publish: Path | None) -> list[Path]:
    """quality.{md,csv,json} in ``out``; copies in ``publish`` named by target and date."""
    texts = {
        "md": markdown(report) + "\n",
        "csv": per_case_csv(report),
        "json": json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n",
    }
    tag = "all" if len(report["targets"]) > 1 else report["targets"][0]
    return write_results(texts, out, "quality", report["started"], publish, tag)


# --- the run -------------------------------------------------------------------------------------


def thread_limit(threads: int):
    """scikit-learn's OpenMP pool limited like torch's (threadpoolctl comes with scikit-learn)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M")
    clock = time.perf_counter()
    refuse_inside(args.out, args.data, "--out")
    if args.publish is not None:
        refuse_inside(args.publish, args.data, "--publish")
    cache_dir = use_cache_dir(args.cache_dir, args.data)
    if "voxel-regression" in args.baselines:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            sys.exit("voxel-regression needs scikit-learn: .venv/bin/pip install -e '.[bench]'")
    torch.set_num_threads(args.threads)
    targets = list(MODALITIES) if args.all_targets else [parse_missing(args.target, "--target")]
    contenders = all_contenders(check_models(available_models() if args.models is None else args.models), args.fixed_target_new, args.baselines)
    report: dict[str, Any] = {
        "benchmark": "quality", "command": command_line("quality.py", argv), "commit": git_commit(),
        "started": started, "machine": machine_info(args.threads), "targets": targets,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cache_dir": str(cache_dir),
    }

    cases = usable_cases(args.data, lambda message: print(message, flush=True))
    split = report["split"] = make_split(cases, args.test_cases, args.split_seed, args.max_train_cases)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    by_id = {c.id: c for c in cases}
    train_root = link_cases([by_id[i] for i in split["train_pool"]], args.out / "cases" / "train")
    test_root = link_cases([by_id[i] for i in split["test"]], args.out / "cases" / "test")
    train_cases, test_cases = discover_cases(train_root), discover_cases(test_root)
    print(f"{len(test_cases)} test cases, {len(train_cases)} training-pool cases; contenders: "
          f"{', '.join(c.id for c in contenders)}; targets: {', '.join(targets)}; work folder {args.out}", flush=True)

    results: dict[str, dict] = {c.id: {"id": c.id, "label": c.label, "kind": c.kind, "model": c.model, "mode": c.mode,
                                        "learning": {}, "targets": {}} for c in contenders}
    trained: dict[tuple[str, str], dict] = {}
    with thread_limit(args.threads):
        for contender in contenders:
            entry = results[contender.id]
            for target in targets:
                pred_dir = args.out / "predictions" / safe(contender.id) / target
                if pred_dir.exists():
                    shutil.rmtree(pred_dir)
                if contender.kind == "baseline":
                    timings, learning = run_baseline(contender, target, args, train_cases, test_cases, pred_dir)
                else:
                    key = (contender.id, contender.train_target(target))
                    if key not in trained:
                        trained[key] = train_network(contender, key[1], args, train_root, split["train_pool"])
                    learning = trained[key]
                    timings = run_network(learning["checkpoint"], target, args, test_cases, pred_dir)
                print(f"scoring {contender.id} on {target} ({len(test_cases)} cases)", flush=True)
                entry["learning"][target] = learning
                entry["targets"][target] = score(contender, target, pred_dir, test_root, timings, args.out)
    for entry in results.values():
        for target, result in entry["targets"].items():
            result["psnr_vs_seed"] = paired_difference(results, entry["id"], target)

    report["contenders"] = list(results.values())
    report["wall_s"] = round(time.perf_counter() - clock, 1)
    report["load_average_end"] = load_average()
    report["protocol"] = PROTOCOL
    print_summary(markdown(report), write_report(report, args.out, args.publish))
    return 0


if __name__ == "__main__":
    sys.exit(main())
