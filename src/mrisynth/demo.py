"""The whole job on generated data, in minutes on a laptop CPU: ``mrisynth demo``.

A new user has no BraTS download, so the demo makes a phantom cohort whose ground truth is known
exactly (including the noise-free FLAIR), trains a small model for a few minutes, synthesizes the
FLAIR of held-out cases, and scores it beside two references that frame the number: the trivial
baseline (the user's own T2, normalised, used as FLAIR) and the noise ceiling (the noise-free
FLAIR scored against the noisy one: no synthesis can be closer to the noisy reference than the
truth behind it, up to chance). Everything goes into one folder with a Markdown report.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cases import discover_cases
from .errors import UsageError

#: The model the demo trains: the project's CPU model, with its own recipe (configs/models/).
DEMO_MODEL = "lite_vae_unet"
DEMO_MODEL_OPTIONS: dict = {}
# The seed's percentile scaling, not the recipe's median scaling: on real BraTS cases the median
# scaling wins (docs/benchmarks.md, section 6), but the demo's 3-minute phantom model measured
# 13.1 dB brain PSNR with it against 21.9 dB without (docs/phantom.md)
DEMO_PREPROCESS: dict = {"median_level": 0.0}
# The seed's L1 loss, not the recipe's L1 + 10 * squared error: on real cases the term wins over
# three seeds (docs/benchmarks.md, section 6), but the demo's 750-step phantom model measured
# 15.3 dB brain PSNR with it against 21.9 dB without. And the trained weights themselves, not the
# recipe's moving average: over 750 steps the average lags the fast-improving weights (18.3 dB
# against 21.9; docs/phantom.md)
DEMO_TRAINING: dict = {"mse_weight": 0.0, "ema_decay": 0.0}
TARGET = "flair"


@dataclass
class DemoSettings:
    out: Path
    cases: int = 8
    test_cases: int = 2
    minutes: float = 3.0
    seed: int = 0
    naming: str = "brats2020"


def run_demo(settings: DemoSettings, log: Callable[[str], None] = print) -> Path:
    """Phantom -> train -> predict -> evaluate (+ baseline and noise ceiling) -> report; returns the report."""
    check_settings(settings)
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_root, test_root = make_phantom_cohort(settings, log)
    checkpoint = train_demo_model(settings, train_root, log)
    predictions = synthesize(checkpoint, test_root, out / "predictions", log)
    log("step 4/5: scoring the synthetic FLAIR, the T2 baseline and the noise ceiling")
    results = {
        "model": score(predictions, test_root, out / "figures"),
        "baseline": score(write_baseline(test_root, out / "baseline_t2"), test_root, None),
        "ceiling": score(write_noise_ceiling(test_root, out / "noise_ceiling"), test_root, None),
    }
    log("step 5/5: writing the report")
    report = write_report(settings, results, checkpoint, time.perf_counter() - start)
    log(f"done in {time.perf_counter() - start:.0f} s. Report: {report}")
    return report


def check_settings(settings: DemoSettings) -> None:
    if settings.test_cases < 1 or settings.cases - settings.test_cases < 2:
        raise UsageError(
            f"--cases {settings.cases}: expected at least {settings.test_cases + 2} "
            f"({settings.test_cases} held out, 2 or more to train and validate on)"
        )
    if settings.minutes <= 0:
        raise UsageError(f"--minutes {settings.minutes}: expected a positive training budget")


def make_phantom_cohort(settings: DemoSettings, log: Callable[[str], None]) -> tuple[Path, Path]:
    """Training and held-out phantom cases in two folders (reused when already there)."""
    from .phantom import case_id, make_case
    from .phantom.files import write_case

    data = settings.out / "data"
    train_root, test_root = data / "train", data / "test"
    n_train = settings.cases - settings.test_cases
    cohort = {"seed": settings.seed, "naming": settings.naming, "cases": settings.cases, "test_cases": settings.test_cases}
    marker = data / "cohort.json"
    if data.exists() and (not marker.is_file() or json.loads(marker.read_text()) != cohort):
        shutil.rmtree(data)  # phantoms of another seed or split: generate this cohort afresh
    log(f"step 1/5: generating {settings.cases} phantom cases ({n_train} to train on, {settings.test_cases} held out)")
    for number in range(1, settings.cases + 1):
        cid = case_id(number, settings.naming)
        root = train_root if number <= n_train else test_root
        if (root / cid).is_dir() and len(list((root / cid).glob("*.nii*"))) >= 6:
            continue
        t0 = time.perf_counter()
        write_case(make_case(cid, settings.seed, settings.naming), root, cid, settings.naming)
        log(f"  {cid} ({time.perf_counter() - t0:.1f} s)")
    marker.write_text(json.dumps(cohort) + "\n")
    return train_root, test_root


def train_demo_model(settings: DemoSettings, train_root: Path, log: Callable[[str], None]) -> Path:
    """A small model trained for ``settings.minutes`` on the training phantoms; returns best.pt."""
    from .train import train

    run = settings.out / "run"
    if run.exists():
        shutil.rmtree(run)  # a demo re-run trains afresh rather than refusing the old folder
    log(f"step 2/5: training {DEMO_MODEL} to synthesize FLAIR for {settings.minutes:g} min")
    config = {
        "model": DEMO_MODEL,
        "model_options": dict(DEMO_MODEL_OPTIONS),
        "preprocess": dict(DEMO_PREPROCESS),
        **DEMO_TRAINING,
        "target": TARGET,
        "epochs": 10,
        "slices_per_epoch": 600,
        "val_cases": 1,
        "val_slices": 48,
        "max_minutes": settings.minutes,
        "seed": settings.seed,
    }
    return train(config, train_root, run)


def synthesize(checkpoint: Path, test_root: Path, out_dir: Path, log: Callable[[str], None]) -> Path:
    """The held-out cases' FLAIR, predicted from their T1, T1CE and T2 (the real FLAIR is ignored)."""
    from .predict import predict_folder

    log("step 3/5: synthesizing the FLAIR of the held-out cases")
    report = predict_folder(test_root, out_dir, missing=TARGET, checkpoint=checkpoint, overwrite=True, device="cpu")
    for path in report.written:
        log(f"  wrote {path}")
    return out_dir


def write_baseline(test_root: Path, out_dir: Path) -> Path:
    """The trivial baseline: the normalised T2 written as the FLAIR."""
    from .baselines import write_copy_baseline

    write_copy_baseline(discover_cases(test_root), TARGET, out_dir, overwrite=True)
    return out_dir


def write_noise_ceiling(test_root: Path, out_dir: Path) -> Path:
    """The noise-free FLAIR of each held-out case, named as a FLAIR prediction."""
    from .io import load_volume, write_volume

    for case in discover_cases(test_root):
        clean = case.folder / case.output_name(TARGET, "_clean")
        volume, geometry = load_volume(clean)
        write_volume(out_dir / case.output_name(TARGET), volume, geometry, overwrite=True)
    return out_dir


def score(pred_dir: Path, test_root: Path, figures: Path | None) -> dict:
    """mrisynth's own evaluation of one folder of predictions."""
    from .evaluate import evaluate_folder, json_safe, write_outputs

    evaluation = evaluate_folder(pred_dir, test_root, modality=TARGET, figures=figures)
    write_outputs(evaluation, pred_dir / "evaluate.json")
    return json_safe(evaluation.to_json())


ROWS = (
    ("model", "mrisynth (synthetic FLAIR from T1, T1CE, T2)"),
    ("baseline", "baseline: normalised T2 used as FLAIR"),
    ("ceiling", "noise ceiling: noise-free FLAIR vs the noisy one"),
)
COLUMNS = (
    ("psnr", "brain PSNR (dB)", 2),
    ("mae", "brain MAE", 4),
    ("ssim2d", "brain SSIM 2D", 4),
    ("ssim_nontumour", "BraSyn SSIM non-tumour", 4),
    ("ssim_tumour", "BraSyn SSIM tumour", 4),
    ("psnr_full", "PSNR whole volume (dB)", 2),
)


def metrics_table(results: dict) -> str:
    """Markdown table: one row per contender, mean ± sd over the held-out cases."""
    lines = ["| | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for key, label in ROWS:
        summary = results[key]["summary"]
        cells = [_mean_sd(summary.get(metric), digits) for metric, _title, digits in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_sd(stats: dict | None, digits: int) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    mean, sd = stats["mean"], stats.get("sd")
    if isinstance(mean, str) or isinstance(sd, str):
        return str(mean)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd is not None else f"{mean:.{digits}f}"


def write_report(settings: DemoSettings, results: dict, checkpoint: Path, seconds: float) -> Path:
    """``report.md`` in the demo folder: what was done, the table, the figures."""
    out = settings.out
    figures = sorted((out / "figures").glob("*.png"))
    case_figures = [f for f in figures if f.name != "summary.png"]
    metrics_csv = out / "run" / "metrics.csv"
    lines = [
        "# mrisynth demo report",
        "",
        f"{settings.cases} phantom cases (seed {settings.seed}): {settings.cases - settings.test_cases} for training "
        f"and validation, {settings.test_cases} held out. Model `{DEMO_MODEL}`{' ' + str(DEMO_MODEL_OPTIONS) if DEMO_MODEL_OPTIONS else ''} trained for at most "
        f"{settings.minutes:g} min on this CPU to synthesize FLAIR from T1, T1CE and T2 "
        f"(checkpoint `{checkpoint.relative_to(out)}`, training log `{metrics_csv.relative_to(out)}`).",
        "",
        "Scores on the held-out cases, against their real (noisy) FLAIR, mean ± sd "
        "(protocol: `predictions/evaluate.json`, key `protocol`):",
        "",
        metrics_table(results),
        "",
        "The baseline row is what the user already has; the noise-ceiling row is as close as the truth itself "
        "comes to the noisy reference. A few minutes of CPU training on a handful of phantoms shows the pipeline, "
        "not the quality of a model trained on real data (see docs/benchmarks.md).",
        "",
        f"Total time: {seconds:.0f} s.",
        "",
    ]
    for fig in case_figures:
        lines += [f"![{fig.stem}](figures/{fig.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return report


def main(out: str | Path, cases: int, minutes: float, seed: int = 0, test_cases: int = 2) -> int:
    """CLI entry: run the demo and print where the report is."""
    settings = DemoSettings(out=Path(out), cases=cases, minutes=minutes, seed=seed, test_cases=test_cases)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = run_demo(settings, log)
    print(report)
    print(metrics_table(json.loads((settings.out / "results.json").read_text())))
    return 0
