"""The ``mrisynth`` command: argument parsing only; the work is done by the Python API.

Heavy modules (torch, the model code) are imported inside the command functions so that
``mrisynth --help`` answers at once. A :class:`MrisynthError` becomes one line on stderr and its
exit code (1 bad data, 2 bad usage); argparse itself exits 2 on a malformed command line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import MrisynthError


def cmd_cases(args: argparse.Namespace) -> int:
    from .cases import discover_cases, format_table

    cases = discover_cases(args.root)
    if args.json:
        print(json.dumps([c.to_json() for c in cases], indent=2))
    elif not cases:
        print(f"no BraTS cases found under {args.root}")
    else:
        print(format_table(cases))
    return 0


def add_cases(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cases", help="list the BraTS cases under a folder and what is wrong with them")
    p.add_argument("root", type=Path, help="a case folder or any folder above case folders")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_cases)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import default_config, load_config_file, train

    overrides = load_config_file(args.config) if args.config else {}
    settings = default_config()
    overrides.update({k: v for k, v in vars(args).items() if k in settings and v is not None})
    train(overrides, args.data, args.out, resume=args.resume)
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on BraTS cases (the seed's recipe by default; DDP under torchrun)")
    p.add_argument("--data", required=True, type=Path, help="root of the training cases (only complete cases are used)")
    p.add_argument("--out", required=True, type=Path, help="run folder: config, split, metrics.csv, last.pt, best.pt")
    p.add_argument("--config", type=Path, default=None, help="YAML settings over the defaults (flags override it)")
    p.add_argument("--model", default=None, help="registered model name (default vae_unet)")
    p.add_argument("--target", default=None, help="modality to synthesize: flair (default), t1, t1ce, t2 or any")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (default 10); may be raised on --resume")
    p.add_argument("--batch-size", type=int, default=None, help="slices per batch and process (default 4)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-4)")
    p.add_argument("--max-minutes", type=float, default=None, help="time budget: stop at the first step past it, validate, checkpoint")
    p.add_argument("--slices-per-epoch", type=int, default=None, help="training slices drawn per epoch (default: all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the split, sampling and weights (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default auto")
    p.add_argument("--deterministic", action="store_true", default=None, help="bit-identical resume on CPU")
    p.add_argument("--val-cases", type=int, default=None, help="number of validation patients (default 20%%, at least 1)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt (same split and settings)")
    p.set_defaults(func=cmd_train)


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_folder

    report = predict_folder(
        args.input, args.output, missing=args.missing, samples=args.samples, batch_size=args.batch_size,
        overwrite=args.overwrite, device=args.device, threads=args.threads, checkpoint=args.model,
    )
    for path in report.written:
        print(path)
    return report.exit_code


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="synthesize the missing modality of one case or of every case under a folder")
    p.add_argument("--model", required=True, type=Path, help="checkpoint (.pt or .safetensors)")
    p.add_argument("--input", required=True, type=Path, help="a case folder or a root of case folders")
    p.add_argument("--output", required=True, type=Path, help="folder for the outputs (written flat, named like the inputs)")
    p.add_argument("--missing", default="auto", help="auto (the one absent modality), t1, t1ce, t2 or flair (t1n, t1c, t2w, t2f accepted)")
    p.add_argument("--samples", type=int, default=1, help="1: plain prediction; K>=2: mean of K posterior samples plus a _std map")
    p.add_argument("--batch-size", type=int, default=16, help="axial slices per network pass (default 16)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip those cases)")
    p.set_defaults(func=cmd_predict)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_folder, format_table, write_outputs
    from .predict import parse_missing

    modality = parse_missing(args.modality, "--modality") if args.modality else None
    evaluation = evaluate_folder(args.pred, args.ref, modality=modality, figures=args.figures)
    json_path, csv_path = write_outputs(evaluation, args.out or Path(args.pred) / "evaluation.json")
    print(format_table(evaluation))
    for name in evaluation.unmatched:
        print(f"no reference case for {name}", file=sys.stderr)
    for case_id, error in evaluation.failed:
        print(f"failed: {case_id}: {error}", file=sys.stderr)
    print(f"wrote {json_path} and {csv_path}" + (f"; figures in {args.figures}" if args.figures else ""))
    return 1 if evaluation.failed else 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score synthesized volumes against the real ones (PSNR, SSIM, BraSyn SSIM)")
    p.add_argument("--pred", required=True, type=Path, help="folder of predictions named <ID>_flair.nii.gz or <ID>-t2f.nii.gz")
    p.add_argument("--ref", required=True, type=Path, help="root of the reference cases")
    p.add_argument("--modality", default=None, help="score only predictions of this modality (default: all found)")
    p.add_argument("--out", type=Path, default=None, help="JSON report (a CSV with the same stem is written beside it; default PRED/evaluation.json)")
    p.add_argument("--figures", type=Path, default=None, help="folder for one PNG per case and a summary PNG")
    p.set_defaults(func=cmd_evaluate)


COMMANDS = [add_cases, add_predict, add_evaluate, add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrisynth",
        description="Synthesize a missing brain MRI sequence (T1, T1CE, T2 or FLAIR) from the other three.",
    )
    parser.add_argument("--version", action="version", version=f"mrisynth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MrisynthError as exc:
        print(f"mrisynth {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mrisynth {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
