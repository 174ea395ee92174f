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
from .errors import MrisynthError, UsageError


def cmd_cases(args: argparse.Namespace) -> int:
    from .cases import check_case_files, discover_cases, format_table

    cases = discover_cases(args.root)
    if args.strict:
        for case in cases:
            check_case_files(case)
    if args.json:
        print(json.dumps([c.to_json() for c in cases], indent=2))
    elif not cases:
        print(f"no BraTS cases found under {args.root}")
    else:
        print(format_table(cases))
    if args.strict and any(c.problems for c in cases):
        n = sum(1 for c in cases if c.problems)
        print(f"mrisynth cases: error: {n} of {len(cases)} cases have problems (--strict)", file=sys.stderr)
        return 1
    return 0


def add_cases(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cases", help="list the BraTS cases under a folder and what is wrong with them")
    p.add_argument("root", type=Path, help="a case folder or any folder above case folders")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument(
        "--strict", action="store_true",
        help="also compare each case's image headers (shape, orientation, affine) and decode its segmentation to "
        "check the labels (BraTS {0,1,2,4}; 2023 names {0,1,2,3}); exit 1 when any case has a problem",
    )
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
        overwrite=args.overwrite, device=args.device, threads=args.threads, checkpoint=args.model, mask=args.mask,
        engine=args.engine, calibrated=not args.no_calibration,
    )
    for path in report.written:
        print(path)
    return report.exit_code


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="synthesize the missing modality of one case or of every case under a folder")
    p.add_argument("--model", type=Path, default=Path("pretrained"),
                   help="checkpoint (.pt or .safetensors), or pretrained: the weights shipped with mrisynth (default)")
    p.add_argument("--input", required=True, type=Path, help="a case folder or a root of case folders")
    p.add_argument("--output", required=True, type=Path, help="folder for the outputs (written flat, named like the inputs)")
    p.add_argument("--missing", default="auto", help="auto (the one absent modality), t1, t1ce, t2 or flair (t1n, t1c, t2w, t2f accepted)")
    p.add_argument("--samples", type=int, default=1, help="1: plain prediction; K>=2: mean of K posterior samples (each with the slices mirrored and/or moved by a pixel) plus their _std map")
    p.add_argument("--batch-size", type=int, default=16, help="axial slices per network pass (default 16)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--engine", choices=["torch", "onnx"], default=None,
                   help="torch (eager PyTorch) or onnx (ONNX Runtime, CPU; about 1.2x faster with --threads 1; a checkpoint is exported once into the cache; "
                        "needs the onnx extra). Default: onnx for an .onnx --model, else torch")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip those cases)")
    p.add_argument("--no-calibration", action="store_true",
                   help="write the network's raw output, without the intensity calibration that training enabled for "
                        "some modalities (docs/architecture.md)")
    p.add_argument(
        "--mask", type=Path, default=None,
        help="brain mask NIfTI on the case's grid (nonzero = brain) replacing the computed one; --input must be one case",
    )
    p.set_defaults(func=cmd_predict)


def cmd_export(args: argparse.Namespace) -> int:
    from .onnx_engine import export_onnx

    output = args.output or Path(f"{Path(str(args.model)).stem if str(args.model) != 'pretrained' else 'lite_vae_unet_any'}.onnx")
    print(export_onnx(args.model, output, overwrite=args.overwrite))
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint as an ONNX model (for --engine onnx or ONNX Runtime elsewhere)")
    p.add_argument("--model", type=Path, default=Path("pretrained"),
                   help="checkpoint (.pt or .safetensors), or pretrained: the weights shipped with mrisynth (default)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="onnx (the only format so far)")
    p.add_argument("--output", type=Path, default=None, help="the .onnx file to write (default: ./<checkpoint name>.onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_export)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import check_report_path, evaluate_folder, format_table, write_outputs
    from .predict import parse_missing

    modality = parse_missing(args.modality, "--modality") if args.modality else None
    if not args.pred.is_dir():
        raise UsageError(f"{args.pred}: expected a folder of predictions")
    out = args.out or args.pred / "evaluation.json"
    check_report_path(out)
    evaluation = evaluate_folder(args.pred, args.ref, modality=modality, figures=args.figures, strict=args.strict)
    json_path, csv_path = write_outputs(evaluation, out)
    print(format_table(evaluation))
    for warning in evaluation.warnings:
        print(f"mrisynth evaluate: warning: {warning}", file=sys.stderr)
    for note in evaluation.notes():
        print(f"note: {note}", file=sys.stderr)
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
    p.add_argument(
        "--strict", action="store_true",
        help="a reference segmentation with labels outside BraTS's set ({0,1,2,4}; {0,1,2,3} for 2023 names) fails "
        "its case (default: a one-line warning, and the case is scored with tumour = label > 0)",
    )
    p.set_defaults(func=cmd_evaluate)


def cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom import make_cohort

    if args.cases < 1:
        raise UsageError(f"--cases {args.cases}: expected at least 1")
    ids = make_cohort(args.out, args.cases, seed=args.seed, naming=args.naming, progress=True)
    print(f"wrote {len(ids)} phantom cases to {args.out}")
    return 0


def add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write a cohort of digital brain phantoms with tumours (BraTS layout)")
    p.add_argument("--out", type=Path, required=True, help="folder to write the case folders into")
    p.add_argument("--cases", type=int, default=10, help="number of cases (default 10)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default 0); same seed, same cases")
    p.add_argument("--naming", choices=["brats2020", "brats2023"], default="brats2020",
                   help="file naming scheme (default brats2020: <ID>_flair.nii.gz; brats2023: <ID>-t2f.nii.gz)")
    p.set_defaults(func=cmd_phantom)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.out, cases=args.cases, minutes=args.minutes, seed=args.seed, test_cases=args.test_cases)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole job on generated phantoms: data, training, synthesis, scores, figures")
    p.add_argument("--out", type=Path, default=Path("mrisynth-demo"), help="output folder (default ./mrisynth-demo)")
    p.add_argument("--cases", type=int, default=8, help="phantom cases in all (default 8)")
    p.add_argument("--test-cases", type=int, default=2, help="of which held out for scoring (default 2)")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget in minutes (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms and the training (default 0)")
    p.set_defaults(func=cmd_demo)


COMMANDS = [add_demo, add_cases, add_phantom, add_train, add_predict, add_evaluate, add_export]


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
    except OSError as exc:  # the file system refused (permissions, a full disk, a file where a folder should be)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mrisynth {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"mrisynth {args.command}: error: out of memory (try a smaller --batch-size)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
