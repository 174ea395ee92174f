"""Synthesize the missing modality of a case with a trained checkpoint, and write it as NIfTI.

Prediction repeats training's preprocessing exactly (the settings come from the checkpoint and
the network input is built by :func:`mrisynth.dataset.assemble_input`, the function training
uses), runs every brain-containing axial slice through the network in batches, and puts the
slices back into the input grid with the exact inverse of the preprocessing. The output is on
the grid of an INPUT modality (never of the target file, which may be absent or wrong), in
[0, 1], and 0 outside the brain mask of the inputs.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .calibration import Calibration, calibrate
from .cases import STD_SUFFIX, Case, discover_cases
from .checkpoint import build_model_from_checkpoint, load_checkpoint
from .dataset import assemble_input, check_target_mode, in_channels_for, neighbour_positions
from .errors import DataError, MrisynthError, UsageError
from .io import Geometry, OutputExistsError, check_same_grid, geometry_of, load_volume, open_nifti, read_images, write_volume
from .modalities import MODALITIES, canonical
from .preprocess import LEFT_RIGHT_AXIS, PreparedCase, PreprocessConfig, brain_mask, prepare


@dataclass
class SynthesisResult:
    """A synthesized volume on the input grid, with its std map when several samples were drawn."""

    modality: str
    volume: np.ndarray  # float32, input grid, [0, 1], 0 outside the brain
    std: np.ndarray | None  # per-voxel standard deviation over samples (samples >= 2), else None
    geometry: Geometry  # of an input modality: where the output is written
    case: Case
    timings: dict[str, float] = field(default_factory=dict)  # seconds: read, preprocess, network, restore
    n_slices: int = 0  # brain-containing axial slices that went through the network
    window: tuple[int, int] = (0, 0)  # in-plane size of the network input
    calibrated: bool = False  # the checkpoint's intensity calibration was applied


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an unavailable or unknown device is a usage error."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        return torch.device(name)
    raise UsageError(f"--device {device}: expected auto, cpu or cuda")


ENGINES = ("torch", "onnx")


def resolve_engine(engine: str | None, model: str | Path) -> str:
    """``None`` -> onnx for an ``.onnx`` file, else torch; an ``.onnx`` file cannot run on torch."""
    is_onnx = str(model).endswith(".onnx")
    if engine is None:
        return "onnx" if is_onnx else "torch"
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine}: expected torch or onnx")
    if engine == "torch" and is_onnx:
        raise UsageError(f"--model {model}: an ONNX model runs with --engine onnx, not torch")
    return engine


def set_threads(threads: int | None) -> None:
    """Limit torch's CPU threads (shared machines); None keeps torch's default."""
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads {threads}: expected a positive number of threads")
    torch.set_num_threads(int(threads))


class Synthesizer:
    """A trained model plus the preprocessing it was trained with: the whole prediction recipe."""

    def __init__(
        self, model: torch.nn.Module, target: str, config: PreprocessConfig, device: torch.device,
        calibration: Calibration | None = None, context: int = 0,
    ) -> None:
        self.model = model.to(device).eval()
        self.target = target  # a canonical modality (fixed-target model) or "any"
        self.config = config
        self.device = device
        self.calibration = calibration  # output intensity calibration fitted in training (see calibration.py)
        self.context = context  # neighbouring slices on either side in the input (2.5D), as trained

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", threads: int | None = None, engine: str | None = None
    ) -> "Synthesizer":
        """Load a ``.pt`` or ``.safetensors`` checkpoint (metadata-checked, never unpickled), or an ``.onnx`` export.

        ``engine``: ``torch`` (eager PyTorch), ``onnx`` (ONNX Runtime on the CPU; a checkpoint is
        exported once into the cache, see :mod:`mrisynth.onnx_engine`), or None: onnx for an
        ``.onnx`` file, else torch.
        """
        set_threads(threads)
        torch_device = resolve_device(device)
        if resolve_engine(engine, path) == "onnx":
            from .onnx_engine import OnnxModel, onnx_file_for

            model: Any = OnnxModel(onnx_file_for(path), threads=threads).to(torch_device)
            metadata = model.metadata
        else:
            model, metadata = None, load_checkpoint(path)
        try:
            target = check_target_mode(str(metadata["target"]))
        except (ValueError, TypeError):
            raise DataError(f"{path}: checkpoint has an unknown target '{metadata['target']}'") from None
        context = metadata.get("context_slices", 0)
        if isinstance(context, bool) or not isinstance(context, int) or context < 0:
            raise DataError(f"{path}: expected the checkpoint's context_slices to be 0 or a positive integer, found {context!r}")
        in_channels = metadata["model"].get("in_channels") if isinstance(metadata["model"], dict) else None
        if in_channels != in_channels_for(target, context):
            raise DataError(
                f"{path}: a '{target}' model with context_slices {context} needs {in_channels_for(target, context)} "
                f"input channels, the checkpoint's model has {in_channels}"
            )
        if model is None:
            try:
                model = build_model_from_checkpoint(metadata)
            except DataError as exc:
                raise DataError(f"{path}: {exc}") from None
        config = PreprocessConfig.from_dict(metadata["preprocess"])
        for problem in config.problems():
            raise DataError(f"{path}: the checkpoint's preprocessing setting {problem}")
        try:
            calibration = Calibration.from_dict(metadata.get("calibration"))
        except (ValueError, TypeError) as exc:
            raise DataError(f"{path}: the checkpoint's intensity calibration is malformed ({exc})") from None
        return cls(model, target, config, torch_device, calibration, context)

    @property
    def modalities(self) -> list[str]:
        """The modalities this model can synthesize: all four for an "any" model, else its target."""
        return list(MODALITIES) if self.target == "any" else [self.target]

    def check_samples(self, samples: int) -> None:
        """Posterior samples need the torch model (the ONNX graph is the deterministic synthesis)."""
        if samples >= 2 and not isinstance(self.model, torch.nn.Module):
            raise UsageError(f"--samples {samples}: posterior samples need --engine torch (the ONNX graph is the deterministic synthesis)")

    # --- which modality -----------------------------------------------------------------

    def missing_modality(self, case: Case, missing: str | None = None) -> str:
        """The modality to synthesize: ``missing`` if given, else the case's one absent modality.

        An explicit ``missing`` ignores that modality's file when present. A fixed-target model
        refuses any other modality.
        """
        if missing is not None and missing != "auto":
            modality = parse_missing(missing)
            self.check_target(modality, explicit=True)
        else:
            absent = case.missing
            if len(absent) != 1:
                found = ", ".join(m for m in MODALITIES if m in case.modalities) or "none"
                hint = "name the one to synthesize with --missing" if not absent else "synthesis needs the other three"
                raise DataError(
                    f"{case.folder}: case {case.id}: expected exactly one of t1, t1ce, t2, flair to be missing, "
                    f"found {found} ({len(absent)} missing; {hint})"
                )
            modality = absent[0]
            self.check_target(modality, explicit=False)
        inputs_absent = [m for m in MODALITIES if m != modality and m not in case.modalities]
        if inputs_absent:
            raise DataError(
                f"{case.folder}: case {case.id}: synthesizing {modality} needs the other three modalities, "
                f"missing {', '.join(inputs_absent)}"
            )
        return modality

    def check_target(self, modality: str, explicit: bool) -> None:
        """A fixed-target model synthesizes its target only (explicit request: usage error)."""
        if self.target in ("any", modality):
            return
        message = f"model was trained to synthesize {self.target} only; cannot synthesize {modality}"
        if explicit:
            raise UsageError(f"{message} (use --missing {self.target} or an 'any' model)")
        raise DataError(f"{message}, the modality this case lacks")

    # --- prediction ---------------------------------------------------------------------

    def predict(
        self,
        case: Case,
        missing: str | None = None,
        samples: int = 1,
        batch_size: int = 16,
        mask: np.ndarray | None = None,
        calibrated: bool = True,
    ) -> SynthesisResult:
        """Synthesize one modality of ``case`` on the grid of its inputs.

        ``samples >= 2`` draws that many posterior samples, each with its input moved by one of
        :data:`AUGMENTATIONS` (undone on its output): the volume is their mean and ``std`` their
        per-voxel standard deviation (unbiased, ddof=1). ``mask`` replaces the brain mask
        computed from the inputs (same shape as the inputs). ``calibrated``: apply the
        checkpoint's intensity calibration where training enabled it for this modality
        (:mod:`mrisynth.calibration`); False gives the network's raw output.
        """
        check_counts(samples, batch_size)
        self.check_samples(samples)
        modality = self.missing_modality(case, missing)
        check_unambiguous(case, [m for m in MODALITIES if m != modality])
        timings: dict[str, float] = {}

        start = time.perf_counter()
        inputs = {m: case.modalities[m] for m in MODALITIES if m != modality}
        volumes, geometry = read_images(inputs)
        timings["read"] = time.perf_counter() - start

        start = time.perf_counter()
        mask = self._mask(volumes, geometry, mask)
        prepared = prepare(volumes, geometry.affine, self.config, mask)
        del volumes
        timings["preprocess"] = time.perf_counter() - start

        start = time.perf_counter()
        mean_slices, std_slices = self._infer(prepared, modality, samples, batch_size)
        timings["network"] = time.perf_counter() - start

        start = time.perf_counter()
        volume = self._restore(prepared, mean_slices, mask)
        std = self._restore(prepared, std_slices, mask) if std_slices is not None else None
        applied = calibrated and self.calibration is not None and self.calibration.applies_to(modality)
        if applied:
            volume, std = calibrate(volume, mask, self.calibration.templates[modality], std)  # type: ignore[union-attr]
        timings["restore"] = time.perf_counter() - start
        return SynthesisResult(
            modality, volume, std, geometry, case, timings,
            n_slices=len(prepared.brain_slices), window=tuple(prepared.layout.size), calibrated=applied,
        )

    @staticmethod
    def _mask(volumes: dict[str, np.ndarray], geometry: Geometry, mask: np.ndarray | None) -> np.ndarray:
        """The inputs' brain mask (the one training used), or the caller's, checked."""
        if mask is None:
            mask = brain_mask([volumes[m] for m in MODALITIES if m in volumes])
        mask = np.asarray(mask).astype(bool)
        if mask.shape != tuple(geometry.shape):
            raise DataError(f"brain mask of shape {mask.shape} does not match the inputs' grid {geometry.shape}")
        if not mask.any():
            raise DataError(f"{geometry.source}: the brain mask is empty, nothing to synthesize")
        return mask

    def _infer(
        self, prepared: PreparedCase, modality: str, samples: int, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Network output for the brain slices: [n_brain, H, W] mean, and std when sampling."""
        brain = prepared.brain_slices
        _, _, height, width = prepared.slices.shape
        mean = np.zeros((len(brain), height, width), dtype=np.float32)
        std = np.zeros_like(mean) if samples >= 2 else None
        target = self.target
        index = MODALITIES.index(modality)
        with torch.inference_mode(), torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(0)  # sampling is reproducible run to run
            for start in range(0, len(brain), batch_size):
                positions = np.arange(start, min(start + batch_size, len(brain)))
                chosen = brain[neighbour_positions(positions, len(brain), self.context)]  # [B, 2k+1]
                stack = torch.from_numpy(np.ascontiguousarray(prepared.slices[:, chosen].transpose(1, 0, 2, 3, 4)))
                missing = torch.full((len(positions),), index, dtype=torch.long)
                x, _ = assemble_input(stack, missing, target)
                x = x.to(self.device)
                end = start + len(positions)
                if samples == 1:
                    mean[start:end] = self.model(x)[0][:, 0].float().cpu().numpy()
                    continue
                outputs = torch.stack([self._augmented_draw(x, k) for k in range(samples)])
                mean[start:end] = outputs[:, :, 0].mean(dim=0).cpu().numpy()
                std[start:end] = predictive_std(outputs).cpu().numpy()  # type: ignore[index]
        return mean, std

    def _augmented_draw(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Posterior draw ``k`` of a batch, its input moved by :data:`AUGMENTATIONS` ``[k]`` and
        its output moved back: the draws differ in the latents and in where the slice sits."""
        flip, shift = AUGMENTATIONS[k % len(AUGMENTATIONS)]
        output = self.model(augment(x, flip, shift), sample=True)[0].float()
        return unaugment(output, flip, shift)

    def _rng_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []

    @staticmethod
    def _restore(prepared: PreparedCase, brain_output: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Brain-slice outputs -> input-grid volume, clipped to [0, 1], 0 outside the brain."""
        z, height, width = prepared.mask.shape
        slices = np.zeros((z, height, width), dtype=np.float32)
        slices[prepared.brain_slices] = brain_output
        volume = prepared.layout.to_volume(slices)
        np.clip(volume, 0.0, 1.0, out=volume)
        volume[~mask] = 0.0
        return volume.astype(np.float32, copy=False)


#: Test-time augmentations of the posterior draws, (flip left-right, (rows, columns) shift in
#: pixels), cycled through draw by draw; the first is the identity. Why: the spread of K draws of
#: the latents alone follows where the latents matter, not where the synthesis is wrong (Spearman
#: with |error| 0.25 on FLAIR, validation patients of the benchmark split); draws that also see
#: the slice mirrored and moved by a pixel (the network is not exactly shift-equivariant: its
#: stride-2 steps see another phase) disagree where the output hinges on exact position, i.e. at
#: edges and in the lesion, and their spread ranks the error better (0.36; docs/benchmarks.md,
#: section 7). Flips and 1-pixel rolls are exactly invertible, so a pixelwise model's draws agree.
AUGMENTATIONS: tuple[tuple[bool, tuple[int, int]], ...] = (
    (False, (0, 0)), (True, (0, 0)), (False, (1, 0)), (False, (-1, 0)),
    (False, (0, 1)), (False, (0, -1)), (True, (1, 1)), (True, (-1, -1)),
)


def augment(x: torch.Tensor, flip: bool, shift: tuple[int, int]) -> torch.Tensor:
    """Slices ``[..., H, W]`` mirrored left-right (when ``flip``), then rolled by ``shift``."""
    if flip:
        x = x.flip(LEFT_RIGHT_AXIS)
    return torch.roll(x, shift, dims=(-2, -1)) if any(shift) else x


def unaugment(x: torch.Tensor, flip: bool, shift: tuple[int, int]) -> torch.Tensor:
    """The exact inverse of :func:`augment`."""
    if any(shift):
        x = torch.roll(x, (-shift[0], -shift[1]), dims=(-2, -1))
    return x.flip(LEFT_RIGHT_AXIS) if flip else x


def predictive_std(outputs: torch.Tensor) -> torch.Tensor:
    """Per-pixel std of K posterior draws ``[K, B, C, H, W]``: the spread of their syntheses
    (channel 0, unbiased), plus, for a scale-predicting model (C = 2, channel 1 = log Laplace
    scale b), the mean predicted variance 2 b^2 (law of total variance)."""
    spread = outputs[:, :, 0].var(dim=0)
    if outputs.shape[2] == 2:
        spread = spread + (2.0 * torch.exp(2.0 * outputs[:, :, 1])).mean(dim=0)
    return spread.sqrt()


# --- argument checks shared by the API and the CLI ----------------------------------------


def parse_missing(name: str, option: str = "--missing") -> str:
    """A canonical modality name (aliases such as ``t2f`` accepted), or a usage error."""
    try:
        modality = canonical(name)
    except ValueError:
        modality = None
    if modality not in MODALITIES:
        auto = "auto, " if option == "--missing" else ""
        raise UsageError(f"{option} {name}: expected {auto}t1, t1ce, t2 or flair (or t1n, t1c, t2w, t2f)")
    return modality


def check_unambiguous(case: Case, modalities: list[str]) -> None:
    """Refuse a case with two files for a modality it needs: which one would be used is a guess.

    Other problems found by case discovery (an unrecognised NIfTI beside the case, such as an
    ``_std`` map written there) do not affect which files are read, so they are not refused.
    """
    for problem in case.problems:
        if any(problem.startswith(f"two files for {m}:") for m in modalities):
            raise DataError(f"{case.folder}: case {case.id}: {problem}")


def check_counts(samples: int, batch_size: int) -> None:
    """``samples`` and ``batch_size`` must be positive integers."""
    if int(samples) != samples or samples < 1:
        raise UsageError(f"--samples {samples}: expected 1 (plain prediction) or more (posterior samples)")
    if int(batch_size) != batch_size or batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: expected a positive number of slices")


# --- writing ---------------------------------------------------------------------------------


def output_path(output_dir: str | Path, case: Case, modality: str, suffix: str = "") -> Path:
    """``output_dir/<name in the case's scheme>``; refuses names that would leave ``output_dir``."""
    name = case.output_name(modality, suffix)
    if "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
        raise DataError(f"case ID '{case.id}' cannot be used as an output file name (path separator or leading dot)")
    output_dir = Path(output_dir)
    path = output_dir / name
    if path.resolve().parent != output_dir.resolve():
        raise DataError(f"case ID '{case.id}' would write outside {output_dir}")
    return path


def input_files(case: Case) -> list[Path]:
    """Every file of the case (all modalities and the segmentation): outputs must never replace them."""
    return [*case.modalities.values(), *([case.seg] if case.seg else [])]


def check_not_inputs(paths: Iterable[Path], protected: Iterable[str | Path]) -> None:
    """Refuse, before any work, an output path that is one of the input files (e.g. ``--output`` = the case folder)."""
    inputs = {Path(p).resolve() for p in protected}
    for path in paths:
        if path.resolve() in inputs:
            raise DataError(f"{path}: refusing to write over an input file (choose another --output folder)")


def read_mask(path: str | Path, case: Case, modality: str) -> np.ndarray:
    """A brain mask file (nonzero = brain) for ``case``, on the grid of its inputs, as a bool array.

    The header is compared with the first input modality's before any voxel is decoded.
    """
    reference_path = next(case.modalities[m] for m in MODALITIES if m != modality)
    reference = geometry_of(open_nifti(reference_path), reference_path)
    check_same_grid(reference, geometry_of(open_nifti(path), path))
    data, _ = load_volume(path, allow_constant=True)
    mask = data != 0
    if not mask.any():
        raise DataError(f"{path}: expected a brain mask (nonzero = brain), found no nonzero voxel")
    return mask


def planned_outputs(output_dir: str | Path, case: Case, modality: str, samples: int) -> list[Path]:
    """The files one case produces: the synthesized volume, and its std map when sampling."""
    paths = [output_path(output_dir, case, modality)]
    if samples >= 2:
        paths.append(output_path(output_dir, case, modality, STD_SUFFIX))
    return paths


def write_result(
    result: SynthesisResult, output_dir: str | Path, overwrite: bool = False, protected: Iterable[str | Path] = ()
) -> list[Path]:
    """Write the volume (and std map) atomically with the input's geometry; all or nothing.

    The case's files, and any file in ``protected`` (e.g. a brain mask), are never written over.
    """
    case = result.case
    protected = [*input_files(case), *protected]
    arrays = [result.volume] + ([result.std] if result.std is not None else [])
    paths = planned_outputs(output_dir, case, result.modality, len(arrays))
    written: list[Path] = []
    try:
        for path, array in zip(paths, arrays):
            written.append(write_volume(path, array, result.geometry, overwrite=overwrite, protected=protected))
    except BaseException:
        for path in written:  # never leave half of a case behind
            path.unlink(missing_ok=True)
        raise
    return written


# --- folder mode ---------------------------------------------------------------------------


@dataclass
class FolderReport:
    """What a folder run did, case by case."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # case IDs whose outputs already existed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case ID, one-line reason)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def predict_folder(
    input_path: str | Path,
    output_dir: str | Path,
    missing: str = "auto",
    samples: int = 1,
    batch_size: int = 16,
    overwrite: bool = False,
    device: str = "auto",
    threads: int | None = None,
    checkpoint: str | Path | None = None,
    synthesizer: Synthesizer | None = None,
    progress: bool = True,
    mask: str | Path | None = None,
    engine: str | None = None,
    calibrated: bool = True,
) -> FolderReport:
    """Synthesize every case under ``input_path`` (one case folder or a root of many) into ``output_dir``.

    Outputs are flat in ``output_dir``, named in each case's scheme. Existing outputs are kept
    (and the case skipped) unless ``overwrite``. With several cases, a case that fails is
    reported on one line and the others go on; with a single case its error is raised.
    ``mask`` is a brain-mask file (nonzero = brain, on the case's grid) replacing the computed
    mask; it needs ``input_path`` to hold a single case. ``calibrated=False`` writes the network's
    raw output instead of the checkpoint's calibrated one (:mod:`mrisynth.calibration`).
    """
    check_counts(samples, batch_size)
    explicit = None if missing in (None, "auto") else parse_missing(missing)
    set_threads(threads)
    output_dir = Path(output_dir)
    cases = _input_cases(input_path, output_dir)
    if not cases:
        raise DataError(f"{input_path}: expected BraTS NIfTI files (<ID>_t1.nii.gz or <ID>-t1n.nii.gz ...), found none")
    if mask is not None and len(cases) != 1:
        raise UsageError(f"--mask {mask}: a brain mask belongs to one case, but {input_path} holds {len(cases)} cases")
    check_output_folder(output_dir)
    if synthesizer is None:
        if checkpoint is None:
            raise UsageError("a checkpoint is needed (--model CKPT)")
        synthesizer = Synthesizer.from_checkpoint(checkpoint, device=device, threads=threads, engine=engine)
    synthesizer.check_samples(samples)
    if explicit is not None:
        synthesizer.check_target(explicit, explicit=True)  # a usage error before any work

    report = FolderReport()
    single = len(cases) == 1
    from tqdm import tqdm

    bar = tqdm(cases, desc="predict", unit="case", disable=not progress or single, file=sys.stderr)
    for case in bar:
        try:
            _predict_one(synthesizer, case, output_dir, explicit, samples, batch_size, overwrite, report, mask, calibrated)
        except MrisynthError as exc:
            if single or isinstance(exc, UsageError):
                raise
            report.failed.append((case.id, str(exc)))
            tqdm.write(f"failed: {case.id}: {exc}", file=sys.stderr)
    if not single and report.failed:
        tqdm.write(f"{len(report.failed)} of {len(cases)} cases failed", file=sys.stderr)
    return report


def check_output_folder(output_dir: Path) -> None:
    """The output folder, or the first of its parents that exists, must be a folder (checked before any work)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"{output_dir}: expected an output folder, found a file")
    for parent in output_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--output {output_dir}: {parent} is a file, not a folder")
            return


def _input_cases(input_path: str | Path, output_dir: Path) -> list[Case]:
    """The cases under ``input_path``, leaving out earlier outputs when ``output_dir`` lies inside it
    (``--input data --output data/synth``: the synthesized files are not cases to synthesize)."""
    cases = discover_cases(input_path)
    root, out = Path(input_path).resolve(), output_dir.resolve()
    if out == root or root not in out.parents:
        return cases
    return [c for c in cases if c.folder.resolve() != out and out not in c.folder.resolve().parents]


def _predict_one(
    synthesizer: Synthesizer,
    case: Case,
    output_dir: Path,
    missing: str | None,
    samples: int,
    batch_size: int,
    overwrite: bool,
    report: FolderReport,
    mask_path: str | Path | None = None,
    calibrated: bool = True,
) -> None:
    """One case: skip it when its outputs exist, else predict and write."""
    modality = synthesizer.missing_modality(case, missing)
    protected = [mask_path] if mask_path is not None else []
    planned = planned_outputs(output_dir, case, modality, samples)
    check_not_inputs(planned, [*input_files(case), *protected])
    existing = [p for p in planned if p.exists()]
    if existing and not overwrite:
        report.skipped.append(case.id)
        from tqdm import tqdm

        tqdm.write(f"skipped: {case.id}: {existing[0]} exists (use --overwrite to replace it)", file=sys.stderr)
        return
    mask = read_mask(mask_path, case, modality) if mask_path is not None else None
    result = synthesizer.predict(case, missing=modality, samples=samples, batch_size=batch_size, mask=mask,
                                 calibrated=calibrated)
    try:
        report.written.extend(write_result(result, output_dir, overwrite=overwrite, protected=protected))
    except OutputExistsError as exc:  # another process wrote it while this one was predicting
        report.skipped.append(case.id)
        from tqdm import tqdm

        tqdm.write(f"skipped: {case.id}: {exc}; written meanwhile by another process", file=sys.stderr)
