"""Score synthesized volumes against the real ones, with a written protocol for every number.

Predictions (``<ID>_flair.nii.gz`` or ``<ID>-t2f.nii.gz``, as ``mrisynth predict`` writes them)
are paired with reference cases by case ID. The prediction is scored exactly as written: no
clipping, masking, rescaling or filtering is applied to it here (the metrics' own
normalisation, described in :data:`PROTOCOL`, is applied identically to reference and
prediction).

The brain mask used by the brain-only metrics is computed from the reference case's INPUT
modalities (the three that are not the target) with :func:`mrisynth.preprocess.brain_mask`:
every voxel that differs from its volume's background value in any of them. This is the mask
that ``mrisynth predict`` uses, and it never depends on the prediction.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .cache import safe_name
from .cases import STD_SUFFIX, Case, discover_cases
from .errors import DataError, MrisynthError, UsageError
from .io import BRATS_LABELS, Geometry, check_same_grid, load_volume, read_images, read_segmentation, temp_path_beside
from .metrics import evaluate_volumes, summarise
from .modalities import MODALITIES, parse_filename, strip_nifti_extension
from .predict import check_unambiguous
from .preprocess import brain_mask

METRIC_KEYS: tuple[str, ...] = (
    "psnr", "mae", "ssim2d", "ssim3d", "ssim_tumour", "ssim_tumour_region", "ssim_nontumour", "psnr_full"
)

PROTOCOL = """\
mrisynth evaluate protocol (every number, exactly):
Pairing: a prediction file <ID>_<mod>.nii[.gz] (BraTS 2018-2021 names) or <ID>-<mod>.nii[.gz] (BraTS 2023
names) in the prediction folder is paired with the reference case <ID> found anywhere under the reference
root; files ending in _std (uncertainty maps) are ignored. The reference is that case's file of the same
modality, read as float32 and validated (3D, finite, not constant). The prediction must be on the
reference's grid (same shape, orientation and affine within 1e-3) and is scored exactly as written: it is
not clipped, masked, rescaled or filtered before the steps below, which are applied identically to both.
Brain mask B: the voxels that differ from their volume's background value (the most common value on the
volume's outer faces) in any of the reference case's three OTHER modalities (the network's inputs); the
same mask mrisynth predict uses. It never depends on the prediction or on the reference target image.
Brain metrics (over B only; background excluded so empty space cannot inflate them):
  each volume is scaled on its own: lo, hi = 1st and 99th percentiles (numpy linear) of its values in B;
  inside B value -> (clip(value, lo, hi) - lo) / (hi - lo), outside B -> 0.
  psnr   = 10 log10(1 / mean_B((p - r)^2)) dB, data range 1 (inf when identical).
  mae    = mean_B(|p - r|).
  ssim2d = SSIM map of Wang et al. 2004 per axial slice (Gaussian window sigma 1.5, 11 taps, K1 0.01,
           K2 0.03, data range 1, reflect border), averaged over the slice's voxels in B, then the plain
           mean over the axial slices that contain brain.
  ssim3d = the same SSIM with an 11x11x11 Gaussian window, averaged over all voxels in B.
BraSyn-challenge figures (for comparison with the leaderboard; not comparable with the brain metrics):
  each volume is clipped to its own 0.5th/99.5th percentiles over ALL voxels (lower bound raised to 0)
  and scaled to [0, 1]. T = reference segmentation > 0.
  ssim_tumour    = torchmetrics StructuralSimilarityIndexMeasure() (defaults: 11-tap Gaussian, sigma 1.5,
                   data range inferred) of prediction*T vs reference*T, mean over the whole volume.
  ssim_tumour_region = the same SSIM map of prediction*T vs reference*T averaged over the voxels of T only
                   (the organisers' script indexes the map with T; the whole-volume mean above stays
                   near 1 for a small tumour whatever the synthesis).
  ssim_nontumour = as ssim_tumour, for prediction*(1-T) vs reference*(1-T).
  All three are empty (null) when the reference case has no segmentation; the tumour ones when T is empty.
  psnr_full      = 10 log10(1 / MSE) with the MSE over ALL voxels, background included (literature style;
                   the black background inflates it).
Summary: per metric, mean and sample standard deviation (ddof 1; 0 for one case) over the cases where it
is defined; an infinite PSNR makes the mean infinite and the sd undefined. In JSON, infinite values are
written as the string "inf" (JSON has no infinity).
"""


@dataclass
class Pair:
    """One prediction file and the reference case it is scored against."""

    case_id: str
    modality: str
    prediction: Path
    case: Case


@dataclass
class Evaluation:
    """Per-case rows, their summary, and what could not be scored."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    by_modality: dict[str, Any]
    failed: list[tuple[str, str]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # one line each, e.g. segmentation labels outside BraTS's set

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": self.rows,
            "summary": self.summary,
            "summary_by_modality": self.by_modality,
            "failed": [{"case": c, "error": e} for c, e in self.failed],
            "unmatched_predictions": self.unmatched,
            "warnings": list(self.warnings),
            "protocol": PROTOCOL,
        }

    def notes(self) -> list[str]:
        """One line per distinct per-case note (e.g. no segmentation: BraSyn SSIM skipped), with its cases."""
        by_note: dict[str, list[str]] = {}
        for row in self.rows:
            if row.get("note"):
                by_note.setdefault(row["note"], []).append(row["case"])
        lines = []
        for note, cases in by_note.items():
            shown = ", ".join(cases[:5]) + (", ..." if len(cases) > 5 else "")
            lines.append(f"{note} for {len(cases)} of {len(self.rows)} case{'s' if len(self.rows) != 1 else ''} ({shown})")
        return lines


@dataclass
class CaseData:
    """Everything read for one pair: what the metrics and the figures need."""

    reference: np.ndarray
    prediction: np.ndarray
    inputs: dict[str, np.ndarray]
    mask: np.ndarray
    seg: np.ndarray | None
    geometry: Geometry


# --- pairing ------------------------------------------------------------------------------


def prediction_files(pred_dir: str | Path, modality: str | None = None) -> dict[tuple[str, str], Path]:
    """``{(case ID, modality): file}`` for the prediction files directly in ``pred_dir``."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise UsageError(f"{pred_dir}: expected a folder of predictions")
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(pred_dir.iterdir()):
        stem = strip_nifti_extension(path.name)
        if stem is None or stem.endswith(STD_SUFFIX) or path.name.startswith(".") or not path.is_file():
            continue
        parsed = parse_filename(path.name)
        if parsed is None or parsed[2] not in MODALITIES:
            continue
        case_id, _scheme, mod = parsed
        if modality is not None and mod != modality:
            continue
        if (case_id, mod) in found:
            raise DataError(f"{pred_dir}: two predictions of {mod} for case {case_id}: {found[case_id, mod].name} and {path.name}")
        found[case_id, mod] = path
    return found


def pair_predictions(pred_dir: str | Path, ref_root: str | Path, modality: str | None = None) -> tuple[list[Pair], list[str]]:
    """Pairs by case ID, and the prediction files that have no reference case."""
    predictions = prediction_files(pred_dir, modality)
    references: dict[str, list[Case]] = {}
    for case in discover_cases(ref_root):
        references.setdefault(case.id, []).append(case)
    pairs, unmatched = [], []
    for (case_id, mod), path in predictions.items():
        cases = references.get(case_id, [])
        if len(cases) != 1 or mod not in cases[0].modalities:
            unmatched.append(path.name)
            continue
        pairs.append(Pair(case_id, mod, path, cases[0]))
    return pairs, unmatched


# --- reading and scoring --------------------------------------------------------------------


def read_pair(pair: Pair, strict: bool = False, warn: Callable[[str], None] | None = None) -> CaseData:
    """Reference (validated), its inputs' brain mask, segmentation, and the prediction as written.

    A segmentation with labels outside BraTS's set for the case's naming scheme is a
    :class:`DataError` when ``strict``, else one line passed to ``warn``.
    """
    case = pair.case
    check_unambiguous(case, list(MODALITIES))
    reference, geometry = load_volume(case.modalities[pair.modality])
    input_paths = {m: case.modalities[m] for m in MODALITIES if m != pair.modality and m in case.modalities}
    if not input_paths:
        raise DataError(f"{case.folder}: case {case.id}: no input modality to compute the brain mask from")
    inputs, input_geometry = read_images(input_paths)
    check_same_grid(geometry, input_geometry)
    mask = brain_mask(list(inputs.values()))
    prediction, pred_geometry = load_volume(pair.prediction, allow_constant=True)
    check_same_grid(geometry, pred_geometry)
    seg = None
    if case.seg:
        seg = read_segmentation(case.seg, geometry, labels=BRATS_LABELS[case.scheme], strict=strict, warn=warn)
    return CaseData(reference, prediction, inputs, mask, seg, geometry)


def score(data: CaseData) -> dict[str, Any]:
    """The metrics of one pair (see :data:`PROTOCOL`); the prediction is passed unchanged."""
    return evaluate_volumes(data.reference, data.prediction, data.mask, data.seg)


def evaluate_folder(
    pred_dir: str | Path,
    ref_root: str | Path,
    modality: str | None = None,
    figures: str | Path | None = None,
    strict: bool = False,
) -> Evaluation:
    """Score every prediction in ``pred_dir`` against its reference case under ``ref_root``.

    A pair that cannot be read is recorded in ``failed`` and the others go on. No pair at all
    is a :class:`DataError`. A reference segmentation with labels outside BraTS's set is a
    warning (in ``warnings``), or a failure of that case when ``strict``.
    """
    if figures is not None and Path(figures).exists() and not Path(figures).is_dir():
        raise UsageError(f"--figures {figures}: expected a folder for the figures, found a file")
    pairs, unmatched = pair_predictions(pred_dir, ref_root, modality)
    if not pairs:
        which = f" of {modality}" if modality else ""
        raise DataError(
            f"{pred_dir}: no prediction{which} matches a reference case under {ref_root} "
            f"(expected files named <ID>_flair.nii.gz or <ID>-t2f.nii.gz with <ID> a case under {ref_root})"
        )
    rows, failed, warnings = [], [], []
    for pair in pairs:
        try:
            data = read_pair(pair, strict=strict, warn=warnings.append)
            metrics = score(data)
        except MrisynthError as exc:
            failed.append((pair.case_id, str(exc)))
            continue
        row = {"case": pair.case_id, "modality": pair.modality, **metrics,
               "prediction": str(pair.prediction), "reference": str(pair.case.modalities[pair.modality])}
        rows.append(row)
        if figures is not None:
            from .report import case_figure

            case_figure(data, row, Path(figures) / f"{safe_name(pair.case_id)}_{pair.modality}.png")
    if figures is not None and rows:
        from .report import summary_figure

        summary_figure(rows, Path(figures) / "summary.png")
    return Evaluation(
        rows=rows,
        summary=summarise([_metrics_only(r) for r in rows]),
        by_modality=_by_modality(rows),
        failed=failed,
        unmatched=unmatched,
        warnings=warnings,
    )


def _metrics_only(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in METRIC_KEYS}


def _by_modality(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Summaries per synthesized modality (an 'any' model may synthesize a different one per case)."""
    modalities = sorted({r["modality"] for r in rows}, key=MODALITIES.index)
    return {m: summarise([_metrics_only(r) for r in rows if r["modality"] == m]) for m in modalities}


# --- writing ---------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """Replace infinities and NaN by strings ("inf", "-inf", "nan") so the JSON stays standard."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write_outputs(evaluation: Evaluation, json_path: str | Path) -> tuple[Path, Path]:
    """The JSON report and a per-case CSV with the same stem, both written atomically."""
    json_path = Path(json_path)
    csv_path = json_path.with_suffix(".csv")
    text = json.dumps(json_safe(evaluation.to_json()), indent=2, allow_nan=False)
    _atomic_write(json_path, text)
    _atomic_write(csv_path, _csv_text(evaluation.rows))
    return json_path, csv_path


def _csv_text(rows: list[dict[str, Any]]) -> str:
    import io

    columns = ["case", "modality", *METRIC_KEYS, "note", "prediction", "reference"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def check_report_path(json_path: str | Path) -> None:
    """The report's path must be a file name (not a folder) in a folder that is not a file: checked before scoring."""
    json_path = Path(json_path)
    if json_path.is_dir():
        raise UsageError(f"--out {json_path}: expected a file name for the JSON report, found a folder")
    for parent in json_path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {json_path}: {parent} is a file, not a folder")
            break


def _atomic_write(path: Path, text: str) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_beside(path)  # mode 0666 minus the umask, like the NIfTI outputs (mkstemp: 0600)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(f"{path}: could not write the report ({exc.strerror or exc})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# --- printing --------------------------------------------------------------------------------

_COLUMNS = [("psnr", "PSNR", 2), ("mae", "MAE", 4), ("ssim2d", "SSIM2D", 4), ("ssim3d", "SSIM3D", 4),
            ("ssim_tumour", "SSIM_T", 4), ("ssim_tumour_region", "SSIM_Tregion", 4), ("ssim_nontumour", "SSIM_NT", 4),
            ("psnr_full", "PSNR_full", 2)]


def format_table(evaluation: Evaluation) -> str:
    """Per-case rows and a mean ± sd row, plain text."""
    header = ["case", "mod"] + [title for _, title, _ in _COLUMNS]
    lines = [header]
    for row in evaluation.rows:
        lines.append([row["case"], row["modality"]] + [_number(row.get(k), d) for k, _, d in _COLUMNS])
    summary = evaluation.summary
    lines.append([f"mean ± sd (n={len(evaluation.rows)})", ""] + [_mean_sd(summary.get(k), d) for k, _, d in _COLUMNS])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _number(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def _mean_sd(stats: dict[str, Any] | None, digits: int) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    sd = stats.get("sd")
    return f"{_number(stats['mean'], digits)} ± {'-' if sd is None else _number(sd, digits)}"
