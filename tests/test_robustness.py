"""Robustness: the inputs mrisynth must accept, those it must refuse clearly, and faults it must survive.

Most checks are rows of the scenario tables below (:data:`ACCEPTED`, :data:`REFUSED`,
:data:`MISTAKES`, :data:`CHECKPOINTS`): each row builds an input in a fresh folder and says which
``mrisynth`` command line to run, the exit code expected and a fragment of the message expected.
Every row runs through :func:`mrisynth.cli.main` in this process: an exception escaping it (a
traceback for the user) fails the test. A refusal must be exactly one line on stderr, with exit
code 1 (bad data) or 2 (bad usage), and no output image written.

``scripts/robustness_table.py`` imports these tables, runs every row the same way and writes
``docs/robustness.md`` (case | expected | observed exit code | observed message); it also runs the
tests marked by :data:`FAULT_TESTS` (processes killed with SIGKILL, concurrent writers, hostile
checkpoint files) and reports their outcome.

Tiny untrained models (base 4 channels) and small synthetic cases keep the whole file fast.
"""
from __future__ import annotations

import contextlib
import io as stdio
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from conftest import BRATS_AFFINE, synthetic_brain, write_case
from mrisynth.cases import Case, discover_cases, find_case
from mrisynth.checkpoint import checkpoint_metadata, save_checkpoint
from mrisynth.cli import main
from mrisynth.dataset import in_channels_for
from mrisynth.errors import DataError
from mrisynth.io import load_volume
from mrisynth.modalities import MODALITIES, SCHEMES
from mrisynth.models import build_model
from mrisynth.predict import Synthesizer, output_path, write_result
from mrisynth.preprocess import PreprocessConfig, brain_mask

SHAPE = (48, 56, 20)
THREE = ("t1", "t1ce", "t2")
CASE = "Case_001"
CASE_2023 = "BraTS-GLI-00001-000"


# ============================================================================ building inputs


def make_checkpoint(path: Path, target: str = "flair", **model_options) -> Path:
    """A tiny untrained model saved as a real mrisynth checkpoint (min_window 32 keeps windows small)."""
    torch.manual_seed(0)
    options = {"base_channels": 4, "latent_dim": 8, "latent_grid": 2, **model_options}
    model = build_model("vae_unet", in_channels=in_channels_for(target), **options)
    checkpoint = checkpoint_metadata(model, target, PreprocessConfig(min_window=32).to_dict())
    checkpoint["state_dict"] = model.state_dict()
    return save_checkpoint(path, checkpoint)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = BRATS_AFFINE) -> Path:
    """``data`` as NIfTI (its own dtype), with qform and sform code 1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def read_nifti(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def ras_of(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The affine of the same image stored with its first two voxel axes reversed."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
    return affine @ flip


@dataclass
class Workspace:
    """A fresh folder for one scenario: data root, output folder, checkpoints, and the
    environment variables and monkeypatches the scenario needs while its command runs."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    patches: list[tuple[object, str, object]] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    notes: dict[str, object] = field(default_factory=dict)  # what a build remembers for its check

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def checkpoint(self, target: str = "flair") -> Path:
        path = self.root / "models" / f"{target}.pt"
        if not path.exists():
            make_checkpoint(path, target)
        return path

    def file(self, modality: str, case_id: str = CASE, ext: str = ".nii.gz", scheme: str = "brats2020") -> Path:
        return self.data / case_id / SCHEMES[scheme].filename(case_id, modality, ext)

    def inputs(
        self,
        case_id: str = CASE,
        modalities: tuple[str, ...] = THREE,
        shape: tuple[int, int, int] = SHAPE,
        affine: np.ndarray = BRATS_AFFINE,
        convert: Callable[[str, np.ndarray], np.ndarray] | None = None,
        ext: str = ".nii.gz",
        scheme: str = "brats2020",
        seg: bool = False,
    ) -> Path:
        """A synthetic case (``convert(modality, float32 data)`` may change values and dtype); its folder."""
        arrays = synthetic_brain(shape)
        for m in modalities:
            data = arrays[m] if convert is None else convert(m, arrays[m])
            save_nifti(self.file(m, case_id, ext, scheme), data, affine)
        if seg:
            labels = arrays["seg"]
            if scheme == "brats2023":
                labels = np.where(labels == 4, 3, labels).astype(np.int16)  # 2023 renumbered ET to 3
            save_nifti(self.file("seg", case_id, ext, scheme), labels, affine)
        return self.data / case_id

    def predict(self, *extra: str, input: Path | None = None, model: Path | None = None, output: Path | None = None) -> list[str]:
        return [
            "predict", "--model", str(model or self.checkpoint()), "--input", str(input or self.data / CASE),
            "--output", str(output or self.out), "--threads", "1", "--device", "cpu", *extra,
        ]

    def patch(self, obj: object, name: str, value: object) -> None:
        self.patches.append((obj, name, value))


@dataclass(frozen=True)
class Scenario:
    """One row: ``build`` makes the input in a Workspace and returns the mrisynth arguments."""

    name: str
    build: Callable[[Workspace], list[str]]
    code: int
    message: str  # a fragment of the expected message ("" when none is expected)
    check: Callable[[Workspace], None] | None = None  # extra assertions after the command

    @property
    def id(self) -> str:
        return self.name


@dataclass
class Observed:
    code: int
    stdout: str
    stderr: str

    def message(self, fragment: str = "", root: Path | None = None) -> str:
        """The line that carries ``fragment`` (else the first stderr line, else stdout's last), root-relative."""
        lines = self.stderr.splitlines() + self.stdout.splitlines()
        chosen = next((line for line in lines if fragment and fragment in line), None)
        if chosen is None:
            err, out = self.stderr.strip().splitlines(), self.stdout.strip().splitlines()
            chosen = err[0] if err else (out[-1] if out else "")
        return chosen.replace(f"{root}/", "") if root else chosen


def run_scenario(scenario: Scenario, root: Path) -> tuple[Workspace, Observed]:
    """Build the scenario under ``root`` and run its command line through ``mrisynth.cli.main``."""
    ws = Workspace(root)
    argv = scenario.build(ws)
    saved_env = {k: os.environ.get(k) for k in ws.env}
    saved_attrs = [(obj, name, getattr(obj, name)) for obj, name, _ in ws.patches]
    out, err = stdio.StringIO(), stdio.StringIO()
    try:
        os.environ.update(ws.env)
        for obj, name, value in ws.patches:
            setattr(obj, name, value)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = int(exc.code or 0)
    finally:
        for obj, name, value in reversed(saved_attrs):
            setattr(obj, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for cleanup in ws.cleanups:
            cleanup()
    return ws, Observed(code, out.getvalue(), err.getvalue())


def output_images(ws: Workspace) -> list[Path]:
    return sorted(ws.out.glob("*.nii*")) if ws.out.is_dir() else []


# ---------------------------------------------------------------------------- checks of accepted outputs


def check_output(ws: Workspace, case_id: str = CASE, mask: np.ndarray | None = None) -> None:
    """The synthesized FLAIR overlays the inputs: same grid, header and forms; float32 in [0, 1];
    0 outside the brain (the inputs' background rule, or the mask given) and > 0 inside."""
    inputs = sorted(p for p in (ws.data / case_id).iterdir() if "_seg" not in p.name and "-seg" not in p.name)
    out = ws.out / f"{case_id}_flair.nii.gz"
    assert out.is_file(), sorted(p.name for p in ws.out.iterdir())
    written, source = nib.load(str(out)), nib.load(str(inputs[0]))
    assert written.shape[:3] == source.shape[:3]
    assert written.get_data_dtype() == np.float32
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert int(written.header["sform_code"]) == int(source.header["sform_code"])
    assert int(written.header["qform_code"]) == int(source.header["qform_code"])
    data = np.asarray(written.dataobj)
    volumes = [load_volume(p)[0] for p in inputs]
    brain = brain_mask(volumes) if mask is None else mask
    assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1
    assert np.all(data[~brain] == 0)
    assert np.mean(data[brain] > 0) > 0.99


def overlays(**kw) -> Callable[[Workspace], None]:
    return lambda ws: check_output(ws, **kw)


# ============================================================================ the tables

# --- inputs that must work ---------------------------------------------------------------


def z_scored(m: str, data: np.ndarray) -> np.ndarray:
    """Brain z-scored (negative values included), background a non-zero constant (-3.6)."""
    brain = data != 0
    out = np.full(data.shape, -3.6, dtype=np.float32)
    out[brain] = (data[brain] - data[brain].mean()) / data[brain].std()
    return out


def as_dtype(dtype: type) -> Callable[[str, np.ndarray], np.ndarray]:
    scale = 0.25 if dtype == np.uint8 else 1.0  # synthetic values reach ~1000: fit them into uint8
    return lambda m, data: (data * scale).astype(dtype)


def build_mask_file(ws: Workspace, shape: tuple[int, int, int] = SHAPE, affine: np.ndarray = BRATS_AFFINE,
                    empty: bool = False) -> Path:
    mask = np.zeros(shape, np.uint8)
    if not empty:
        mask[12:36, 14:42, 4:16] = 1  # a box inside the synthetic brain
    return save_nifti(ws.root / "brain_mask.nii.gz", mask, affine)


def with_mask(ws: Workspace) -> list[str]:
    ws.inputs()
    return ws.predict("--mask", str(build_mask_file(ws)))


def check_masked(ws: Workspace) -> None:
    check_output(ws, mask=read_nifti(ws.root / "brain_mask.nii.gz") != 0)


MNI_AFFINE = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])  # LAS, MNI152 1 mm
ANISOTROPIC = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239], [0, 0, 3.0, 0], [0, 0, 0, 1]])  # 1 x 1 x 3 mm


def permuted_storage(ws: Workspace) -> list[str]:
    """Voxel axes stored in the order (Z, X, Y): the affine says so, nothing is resampled."""
    arrays = synthetic_brain(SHAPE)
    permute = np.zeros((4, 4))
    permute[0, 1] = permute[1, 2] = permute[2, 0] = permute[3, 3] = 1  # new voxel (k, i, j) = old (i, j, k)
    affine = BRATS_AFFINE @ permute
    for m in THREE:
        save_nifti(ws.file(m), np.ascontiguousarray(arrays[m].transpose(2, 0, 1)), affine)
    return ws.predict()


def scaled_int16(ws: Workspace) -> list[str]:
    arrays = synthetic_brain(SHAPE)
    for m in THREE:
        img = nib.Nifti1Image(np.rint(arrays[m] / 2).astype(np.int16), BRATS_AFFINE)
        img.header.set_slope_inter(2.0, 5.0)
        img.set_sform(BRATS_AFFINE, code=1)
        ws.file(m).parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(ws.file(m)))
    return ws.predict()


def evaluation(ws: Workspace, *extra: str, scheme: str = "brats2020", seg: bool = True,
               seg_values: dict[float, slice] | None = None) -> list[str]:
    """A complete reference case, a prediction of its FLAIR (in ``pred``), and ``mrisynth evaluate``."""
    case_id = CASE if scheme == "brats2020" else CASE_2023
    ws.inputs(case_id=case_id, modalities=MODALITIES, scheme=scheme, seg=seg)
    if seg_values:
        path = ws.file("seg", case_id, scheme=scheme)
        labels = read_nifti(path)
        for value, where in seg_values.items():
            labels[where] = value
        save_nifti(path, labels.astype(np.float32 if any(v != int(v) for v in seg_values) else np.int16))
    reference = read_nifti(ws.file("flair", case_id, scheme=scheme))
    save_nifti(ws.root / "pred" / SCHEMES[scheme].filename(case_id, "flair"), (reference / reference.max()).astype(np.float32))
    return ["evaluate", "--pred", str(ws.root / "pred"), "--ref", str(ws.data), "--out", str(ws.root / "report" / "e.json"), *extra]


def check_scored(ws: Workspace, brasyn: bool = True) -> None:
    row = json.loads((ws.root / "report" / "e.json").read_text())["cases"][0]
    assert np.isfinite(row["psnr"]) and 0 < row["ssim2d"] <= 1
    assert (row["ssim_tumour"] is not None) == brasyn and (row["ssim_nontumour"] is not None) == brasyn


ACCEPTED: list[Scenario] = [
    Scenario("z-scored inputs: background -3.6 (not 0), negative brain values, float32",
             lambda ws: (ws.inputs(convert=z_scored), ws.predict())[1], 0, "Case_001_flair.nii.gz", overlays()),
    Scenario("RAS instead of LPS (all modalities alike)",
             lambda ws: (ws.inputs(affine=ras_of(BRATS_AFFINE, SHAPE)), ws.predict())[1], 0, "Case_001_flair.nii.gz",
             overlays()),
    Scenario("MNI-like grid 182x218 in-plane (1 mm, LAS), 6 slices",
             lambda ws: (ws.inputs(shape=(182, 218, 6), affine=MNI_AFFINE), ws.predict())[1], 0,
             "Case_001_flair.nii.gz", overlays()),
    Scenario("256x256xN grid (N = 8)",
             lambda ws: (ws.inputs(shape=(256, 256, 8)), ws.predict())[1], 0, "Case_001_flair.nii.gz", overlays()),
    Scenario("anisotropic voxels 1x1x3 mm",
             lambda ws: (ws.inputs(affine=ANISOTROPIC), ws.predict())[1], 0, "Case_001_flair.nii.gz", overlays()),
    Scenario("voxel axes stored in another order (Z, X, Y)", permuted_storage, 0, "Case_001_flair.nii.gz", overlays()),
    *[
        Scenario(f"voxel type {np.dtype(t).name}",
                 lambda ws, t=t: (ws.inputs(convert=as_dtype(t)), ws.predict())[1], 0, "Case_001_flair.nii.gz",
                 overlays())
        for t in (np.uint8, np.int16, np.uint16, np.float32, np.float64)
    ],
    Scenario("int16 with header scaling (scl_slope 2, scl_inter 5)", scaled_int16, 0, "Case_001_flair.nii.gz",
             overlays()),
    Scenario("uncompressed .nii inputs",
             lambda ws: (ws.inputs(ext=".nii"), ws.predict())[1], 0, "Case_001_flair.nii.gz", overlays()),
    Scenario("a trailing 4th axis of length 1",
             lambda ws: (ws.inputs(convert=lambda m, d: d[..., None]), ws.predict())[1], 0, "Case_001_flair.nii.gz",
             overlays()),
    Scenario("--mask FILE overrides the computed brain mask", with_mask, 0, "Case_001_flair.nii.gz", check_masked),
    Scenario("evaluate: reference case without segmentation",
             lambda ws: evaluation(ws, seg=False), 0, "no reference segmentation: BraSyn SSIM skipped",
             lambda ws: check_scored(ws, brasyn=False)),
    Scenario("evaluate: segmentation label 3 in a BraTS 2020-named case (default: warning)",
             lambda ws: evaluation(ws, seg_values={3: np.s_[20:22, 20:22, 8:10]}), 0,
             "expected segmentation labels {0, 1, 2, 4}, found 3 in 8 voxels", check_scored),
    Scenario("evaluate: segmentation label 4 in a BraTS 2023-named case (default: warning)",
             lambda ws: evaluation(ws, scheme="brats2023", seg_values={4: np.s_[20:22, 20:22, 8:10]}), 0,
             "expected segmentation labels {0, 1, 2, 3}, found 4 in 8 voxels", check_scored),
]


# --- inputs that must be refused (exit 1, one line naming the file, nothing written) --------


def replace(ws: Workspace, modality: str, data: np.ndarray | None = None, affine: np.ndarray = BRATS_AFFINE,
            ext: str = ".nii.gz") -> Path:
    """The case's three inputs, then ``modality``'s file replaced (default data: its own)."""
    ws.inputs()
    path = ws.file(modality)
    if data is None:
        data = read_nifti(path)
    path.unlink()
    return save_nifti(ws.file(modality, ext=ext), data, affine)


def shifted_affine(dx: float) -> np.ndarray:
    affine = BRATS_AFFINE.copy()
    affine[0, 3] += dx
    return affine


def with_values(value: float, count: int) -> Callable[[Workspace], list[str]]:
    def build(ws: Workspace) -> list[str]:
        data = synthetic_brain(SHAPE)["t1ce"]
        data.flat[np.linspace(0, data.size - 1, count).astype(int)] = value
        replace(ws, "t1ce", data)
        return ws.predict()
    return build


def cut(ext: str) -> Callable[[Workspace], list[str]]:
    def build(ws: Workspace) -> list[str]:
        path = replace(ws, "t1", ext=ext)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        return ws.predict()
    return build


def huge_header(ws: Workspace) -> list[str]:
    """A 400-byte file whose header declares 2000 x 2000 x 1000 float32 voxels (16 GB)."""
    ws.inputs()
    ws.file("t1").unlink()
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 1000))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    ws.file("t1", ext=".nii").write_bytes(header.binaryblock + b"\0" * 4 + b"\1" * 64)
    return ws.predict()


def over_env_limit(ws: Workspace) -> list[str]:
    ws.inputs()
    ws.env["MRISYNTH_MAX_VOXELS"] = "10000"
    return ws.predict()


def text_file(ws: Workspace) -> list[str]:
    ws.inputs()
    ws.file("t2").write_text("patient name, notes\n" * 40)
    return ws.predict()


def empty_file(ws: Workspace) -> list[str]:
    ws.inputs()
    ws.file("t1").write_bytes(b"")
    return ws.predict()


def two_files_for_t1(ws: Workspace) -> list[str]:
    ws.inputs()
    save_nifti(ws.file("t1", ext=".nii"), synthetic_brain(SHAPE)["t1"])
    return ws.predict()


def seg_strict(ws: Workspace) -> list[str]:
    return evaluation(ws, "--strict", seg_values={3: np.s_[20:22, 20:22, 8:10]})


def seg_fractional_strict(ws: Workspace) -> list[str]:
    return evaluation(ws, "--strict", seg_values={0.5: np.s_[20:22, 20:22, 8:10]})


def cases_strict(ws: Workspace) -> list[str]:
    evaluation(ws, seg_values={5: np.s_[20:22, 20:22, 8:10]})
    return ["cases", str(ws.data), "--strict"]


def mask_on(shape: tuple[int, int, int] = SHAPE, affine: np.ndarray = BRATS_AFFINE, empty: bool = False,
            cases: int = 1) -> Callable[[Workspace], list[str]]:
    def build(ws: Workspace) -> list[str]:
        for i in range(cases):
            ws.inputs(case_id=f"Case_00{i + 1}")
        mask = build_mask_file(ws, shape, affine, empty)
        return ws.predict("--mask", str(mask), input=ws.data if cases > 1 else None)
    return build


def output_is_input(ws: Workspace) -> list[str]:
    ws.inputs(modalities=MODALITIES)
    ws.notes["flair"] = ws.file("flair").read_bytes()
    return ws.predict("--missing", "flair", "--overwrite", output=ws.data / CASE)


def check_input_kept(ws: Workspace) -> None:
    assert ws.file("flair").read_bytes() == ws.notes["flair"]


REFUSED: list[Scenario] = [
    Scenario("modalities of one case with different shapes",
             lambda ws: (replace(ws, "t2", synthetic_brain(SHAPE)["t2"][:, :, :-1]), ws.predict())[1], 1,
             "Case_001_t2.nii.gz: expected shape (48, 56, 20) like Case_001_t1.nii.gz, found (48, 56, 19)"),
    Scenario("modalities with different affines (0.01 mm apart; tolerance 0.001)",
             lambda ws: (replace(ws, "t2", affine=shifted_affine(0.01)), ws.predict())[1], 1,
             "Case_001_t2.nii.gz: expected the same affine as Case_001_t1.nii.gz (within 0.001), found a difference of 0.01"),
    Scenario("modalities with different orientations (T2 stored RPS)",
             lambda ws: (replace(ws, "t2", affine=np.diag([1.0, -1.0, 1.0, 1.0])), ws.predict())[1], 1,
             "Case_001_t2.nii.gz: expected orientation LPS like Case_001_t1.nii.gz, found RPS"),
    Scenario("a 2D image",
             lambda ws: (replace(ws, "t1", synthetic_brain(SHAPE)["t1"][:, :, 10]), ws.predict())[1], 1,
             "Case_001_t1.nii.gz: expected a 3D image, found 2D with shape (48, 56)"),
    Scenario("a 4D image (2 volumes)",
             lambda ws: (replace(ws, "t1", np.stack([synthetic_brain(SHAPE)["t1"]] * 2, -1)), ws.predict())[1], 1,
             "Case_001_t1.nii.gz: expected a 3D image, found 4D with shape (48, 56, 20, 2)"),
    Scenario("NaN voxels", with_values(np.nan, 5), 1, "Case_001_t1ce.nii.gz: expected finite values, found 5 NaN or Inf voxels"),
    Scenario("Inf voxels", with_values(np.inf, 3), 1, "Case_001_t1ce.nii.gz: expected finite values, found 3 NaN or Inf voxels"),
    Scenario("an all-constant volume",
             lambda ws: (replace(ws, "t2", np.zeros(SHAPE, np.int16)), ws.predict())[1], 1,
             "Case_001_t2.nii.gz: expected an image, found a constant volume (every voxel = 0)"),
    Scenario("complex-valued voxels",
             lambda ws: (replace(ws, "t2", synthetic_brain(SHAPE)["t2"].astype(np.complex64)), ws.predict())[1], 1,
             "Case_001_t2.nii.gz: expected real-valued voxels (integer or float), found data type complex64"),
    Scenario("a zero-byte file", empty_file, 1, "Case_001_t1.nii.gz: expected a NIfTI image, found an empty (0-byte) file"),
    Scenario("a truncated .nii.gz", cut(".nii.gz"), 1,
             "Case_001_t1.nii.gz: expected (48, 56, 20) voxels, the file is truncated or corrupt"),
    Scenario("a truncated .nii", cut(".nii"), 1, "Case_001_t1.nii: expected (48, 56, 20) voxels, the file is truncated or corrupt"),
    Scenario("a text file named .nii.gz", text_file, 1, "Case_001_t2.nii.gz: expected a NIfTI image, could not read its header"),
    Scenario("a header declaring 4e9 voxels (400-byte file; refused before allocating)", huge_header, 1,
             "Case_001_t1.nii: image of shape (2000, 2000, 1000) has 4000000000 voxels, more than the limit of 134217728"),
    Scenario("more voxels than MRISYNTH_MAX_VOXELS=10000", over_env_limit, 1,
             "Case_001_t1.nii.gz: image of shape (48, 56, 20) has 53760 voxels, more than the limit of 10000"),
    Scenario("two files for one modality", two_files_for_t1, 1,
             "case Case_001: two files for t1: Case_001_t1.nii and Case_001_t1.nii.gz"),
    Scenario("--missing auto with no modality missing",
             lambda ws: (ws.inputs(modalities=MODALITIES), ws.predict())[1], 1,
             "expected exactly one of t1, t1ce, t2, flair to be missing, found t1, t1ce, t2, flair (0 missing"),
    Scenario("--missing auto with two modalities missing",
             lambda ws: (ws.inputs(modalities=("t1", "t2")), ws.predict())[1], 1,
             "expected exactly one of t1, t1ce, t2, flair to be missing, found t1, t2 (2 missing"),
    Scenario("--mask on another grid (shape)", mask_on(shape=(48, 56, 19)), 1,
             "brain_mask.nii.gz: expected shape (48, 56, 20) like Case_001_t1.nii.gz, found (48, 56, 19)"),
    Scenario("--mask on another grid (affine)", mask_on(affine=shifted_affine(2.0)), 1,
             "brain_mask.nii.gz: expected the same affine as Case_001_t1.nii.gz"),
    Scenario("--mask with no nonzero voxel", mask_on(empty=True), 1,
             "brain_mask.nii.gz: expected a brain mask (nonzero = brain), found no nonzero voxel"),
    Scenario("--mask with a folder of several cases", mask_on(cases=2), 2,
             "a brain mask belongs to one case, but"),
    Scenario("--output is the case folder and the output would replace an input", output_is_input, 1,
             "Case_001_flair.nii.gz: refusing to write over an input file", check_input_kept),
    Scenario("evaluate --strict: segmentation label 3 in a BraTS 2020-named case", seg_strict, 1,
             "Case_001_seg.nii.gz: expected segmentation labels {0, 1, 2, 4}, found 3 in 8 voxels"),
    Scenario("evaluate --strict: fractional segmentation values (interpolated)", seg_fractional_strict, 1,
             "Case_001_seg.nii.gz: expected segmentation labels {0, 1, 2, 4}, found 0.5 in 8 voxels"),
    Scenario("cases --strict: segmentation label 5 (listed as a problem)", cases_strict, 1,
             "Case_001_seg.nii.gz: expected segmentation labels {0, 1, 2, 4}, found 5 in 8 voxels"),
]


# --- user mistakes on the command line (never a traceback) ---------------------------------


def unreadable_folder(ws: Workspace) -> list[str]:
    """A case folder the user may not read (simulated for root, who may read anything)."""
    folder = ws.inputs()
    if os.geteuid() != 0:
        folder.chmod(0)
        ws.cleanups.append(lambda: folder.chmod(0o755))
    else:
        real = os.scandir

        def scandir(path="."):
            if Path(path) == folder:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        ws.patch(os, "scandir", scandir)
    return ws.predict()


def output_is_a_file(ws: Workspace) -> list[str]:
    ws.inputs()
    ws.out.write_text("not a folder")
    return ws.predict()


def tiny_training_config(ws: Workspace) -> Path:
    config = {"model_options": {"base_channels": 4, "latent_dim": 8, "latent_grid": 2}, "crop": 32,
              "preprocess": {"min_window": 32}, "slices_per_epoch": 8, "batch_size": 4, "epochs": 1, "device": "cpu"}
    path = ws.root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_args(ws: Workspace, *extra: str, out: Path | None = None) -> list[str]:
    for i in range(2):
        ws.inputs(case_id=f"Case_00{i}", modalities=MODALITIES)
    return ["train", "--data", str(ws.data), "--out", str(out or ws.root / "run"),
            "--config", str(tiny_training_config(ws)), *extra]


def file_at(ws: Workspace, name: str) -> Path:
    path = ws.root / name
    path.write_text("x")
    return path


def folder_at(ws: Workspace, name: str) -> Path:
    path = ws.root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


MISTAKES: list[Scenario] = [
    Scenario("predict: --input folder that cannot be read", unreadable_folder, 1, "cannot read this folder"),
    Scenario("predict: --input does not exist",
             lambda ws: ws.predict(input=ws.root / "nope"), 2, "nope: folder not found"),
    Scenario("predict: --input is a NIfTI file, not a folder",
             lambda ws: (ws.inputs(), ws.predict(input=ws.file("t1")))[1], 2, "expected a folder of cases, found a file"),
    Scenario("predict: --output is a file", output_is_a_file, 2, "out: expected an output folder, found a file"),
    Scenario("predict: --output below a file (its folder cannot be created)",
             lambda ws: (ws.inputs(), ws.predict(output=file_at(ws, "blocker") / "out"))[1], 2,
             "blocker is a file, not a folder"),
    Scenario("predict: --batch-size 0",
             lambda ws: (ws.inputs(), ws.predict("--batch-size", "0"))[1], 2,
             "--batch-size 0: expected a positive number of slices"),
    Scenario("predict: --model is a folder",
             lambda ws: (ws.inputs(), ws.predict(model=folder_at(ws, "models_dir")))[1], 1,
             "models_dir: expected a checkpoint file (.pt or .safetensors), found a folder"),
    Scenario("predict: --model does not exist",
             lambda ws: (ws.inputs(), ws.predict(model=ws.root / "none.pt"))[1], 1, "none.pt: checkpoint not found"),
    Scenario("evaluate: --out is a folder",
             lambda ws: evaluation(ws)[:-2] + ["--out", str(folder_at(ws, "report_dir"))], 2,
             "expected a file name for the JSON report, found a folder"),
    Scenario("evaluate: --out below a file",
             lambda ws: evaluation(ws)[:-2] + ["--out", str(file_at(ws, "blocker") / "e.json")], 2,
             "blocker is a file, not a folder"),
    Scenario("evaluate: --figures is a file",
             lambda ws: evaluation(ws, "--figures", str(file_at(ws, "figs"))), 2,
             "expected a folder for the figures, found a file"),
    Scenario("evaluate: --pred is a file",
             lambda ws: ["evaluate", "--pred", str(file_at(ws, "p.nii.gz")), "--ref", str(ws.root)], 2,
             "expected a folder of predictions"),
    Scenario("train: --out is a file",
             lambda ws: train_args(ws, out=file_at(ws, "run_file")), 2, "expected a run folder, found a file"),
    Scenario("train: --batch-size 0", lambda ws: train_args(ws, "--batch-size", "0"), 2, "batch_size: expected at least 1"),
    Scenario("train: --data does not exist",
             lambda ws: train_args(ws)[:1] + ["--data", str(ws.root / "nope"), "--out", str(ws.root / "run")], 2,
             "nope: folder not found"),
    Scenario("train: --config is a folder",
             lambda ws: ["train", "--data", str(ws.root), "--out", str(ws.root / "run"), "--config",
                         str(folder_at(ws, "cfg"))], 2, "cfg: expected a YAML config file, found a folder"),
    Scenario("train: --resume where no run was started",
             lambda ws: train_args(ws, "--resume", out=folder_at(ws, "empty_run")), 2, "nothing to resume (no last.pt)"),
    Scenario("cases: ROOT cannot be read", lambda ws: unreadable_folder(ws) and ["cases", str(ws.data / CASE)], 1,
             "cannot read this folder"),
    Scenario("cases: ROOT is a file",
             lambda ws: ["cases", str(file_at(ws, "x.nii.gz"))], 2, "expected a folder of cases, found a file"),
]


# --- untrusted checkpoints ---------------------------------------------------------------------

MARKER = "PWNED"


class RunsCode:
    """Unpickling this would run ``touch MARKER``: a checkpoint must never be loaded that way."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def evil(legacy: bool = False) -> Callable[[Workspace], list[str]]:
    def build(ws: Workspace) -> list[str]:
        ws.inputs()
        checkpoint = dict(torch.load(ws.checkpoint(), weights_only=True))
        checkpoint["state_dict"] = {**checkpoint["state_dict"], "payload": RunsCode(ws.root / MARKER)}
        path = ws.root / "evil.pt"
        torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
        return ws.predict(model=path)
    return build


def check_no_marker(ws: Workspace) -> None:
    assert not (ws.root / MARKER).exists(), "unpickling ran code"


def edited_checkpoint(edit: Callable[[dict], object]) -> Callable[[Workspace], list[str]]:
    """The tiny checkpoint changed by ``edit`` (which may return a replacement object), saved as other.pt."""
    def build(ws: Workspace) -> list[str]:
        ws.inputs()
        checkpoint = dict(torch.load(ws.checkpoint(), weights_only=True))
        replaced = edit(checkpoint)
        path = ws.root / "other.pt"
        torch.save(checkpoint if replaced is None else replaced, path)
        return ws.predict(model=path)
    return build


def raw_checkpoint(content: bytes | Callable[[bytes], bytes], name: str = "other.pt") -> Callable[[Workspace], list[str]]:
    def build(ws: Workspace) -> list[str]:
        ws.inputs()
        path = ws.root / name
        path.write_bytes(content(ws.checkpoint().read_bytes()) if callable(content) else content)
        return ws.predict(model=path)
    return build


def bigger_weights(ws: Workspace) -> list[str]:
    ws.inputs()
    checkpoint = dict(torch.load(ws.checkpoint(), weights_only=True))
    make_checkpoint(ws.root / "big.pt", base_channels=8)
    checkpoint["state_dict"] = torch.load(ws.root / "big.pt", weights_only=True)["state_dict"]
    torch.save(checkpoint, ws.root / "other.pt")
    return ws.predict(model=ws.root / "other.pt")


CHECKPOINTS: list[Scenario] = [
    Scenario("a checkpoint whose pickle runs code when loaded (zip format)", evil(), 1,
             "evil.pt: refused to load: the checkpoint holds an object other than tensors and plain types (",
             check_no_marker),
    Scenario("a checkpoint whose pickle runs code when loaded (legacy format)", evil(legacy=True), 1,
             "evil.pt: refused to load", check_no_marker),
    Scenario("a checkpoint of a model this mrisynth does not have",
             edited_checkpoint(lambda c: c.update(model={**c["model"], "name": "unet9000"})), 1,
             "other.pt: checkpoint's model cannot be built by this mrisynth 0.1.0: unknown model 'unet9000'"),
    Scenario("a checkpoint with an option the model does not take",
             edited_checkpoint(lambda c: c.update(model={**c["model"], "dropout": 0.3})), 1,
             "other.pt: checkpoint's model cannot be built by this mrisynth 0.1.0: unknown option(s) dropout"),
    Scenario("weights of another size than the model they claim", bigger_weights, 1,
             "other.pt: checkpoint weights do not fit model 'vae_unet': size mismatch for"),
    Scenario("a newer mrisynth checkpoint format",
             edited_checkpoint(lambda c: c.update(format_version=99, mrisynth_version="9.0")), 1,
             "other.pt: checkpoint format 99 was written by a newer mrisynth (9.0)"),
    Scenario("a plain state_dict (not an mrisynth checkpoint)",
             edited_checkpoint(lambda c: c["state_dict"]), 1,
             "other.pt: expected an mrisynth checkpoint, found a dict without mrisynth's 'format' entry"),
    Scenario("a bare tensor", edited_checkpoint(lambda c: torch.zeros(3)), 1,
             "other.pt: expected an mrisynth checkpoint, found a Tensor"),
    Scenario("a truncated checkpoint", raw_checkpoint(lambda raw: raw[: len(raw) // 2]), 1,
             "other.pt: expected an mrisynth checkpoint, the file is truncated or not a checkpoint"),
    Scenario("a text file named .pt", raw_checkpoint(b"hello world\n" * 20), 1,
             "other.pt: expected an mrisynth checkpoint, the file is not one (neither a zip archive nor a pickle)"),
    Scenario("a pickled numpy array named .pt (another program's object)",
             raw_checkpoint(pickle.dumps(np.arange(3), protocol=2)), 1,
             "other.pt: refused to load: the checkpoint holds an object other than tensors and plain types (numpy"),
    Scenario("a damaged pickle named .pt", raw_checkpoint(b"\x80\x04\x95" + b"\x00" * 40), 1,
             "other.pt: refused to load: the file holds pickle content that the restricted loader does not accept"),
    Scenario("an empty .pt file", raw_checkpoint(b""), 1, "other.pt: expected an mrisynth checkpoint, found an empty (0-byte) file"),
    Scenario("a .safetensors file that is not one", raw_checkpoint(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage", "w.safetensors"),
             1, "w.safetensors: expected safetensors weights, could not read them"),
]


TABLES: dict[str, list[Scenario]] = {
    "Inputs that must work": ACCEPTED,
    "Inputs that must be refused": REFUSED,
    "Command-line mistakes": MISTAKES,
    "Untrusted checkpoints": CHECKPOINTS,
}


# ============================================================================ the table tests


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """--threads sets torch's process-wide thread count: give other test files theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def assert_scenario(scenario: Scenario, ws: Workspace, seen: Observed) -> None:
    assert "Traceback" not in seen.stderr + seen.stdout
    assert seen.code == scenario.code, (seen.code, seen.stderr, seen.stdout[-2000:])
    if scenario.message:
        assert scenario.message in seen.stderr + seen.stdout, (seen.stderr, seen.stdout[-2000:])
    if scenario.code != 0:
        lines = seen.stderr.strip().splitlines()
        assert len(lines) == 1, seen.stderr  # one line, whatever went wrong
        assert output_images(ws) == [], output_images(ws)  # nothing written
    if scenario.check is not None:
        scenario.check(ws)


@pytest.mark.parametrize("scenario", ACCEPTED, ids=lambda s: s.id)
def test_accepted_inputs(scenario: Scenario, tmp_path: Path) -> None:
    assert_scenario(scenario, *run_scenario(scenario, tmp_path))


@pytest.mark.parametrize("scenario", REFUSED, ids=lambda s: s.id)
def test_refused_inputs(scenario: Scenario, tmp_path: Path) -> None:
    ws, seen = run_scenario(scenario, tmp_path)
    assert_scenario(scenario, ws, seen)
    assert output_images(ws) == []


@pytest.mark.parametrize("scenario", MISTAKES, ids=lambda s: s.id)
def test_command_line_mistakes(scenario: Scenario, tmp_path: Path) -> None:
    assert_scenario(scenario, *run_scenario(scenario, tmp_path))


@pytest.mark.parametrize("scenario", CHECKPOINTS, ids=lambda s: s.id)
def test_untrusted_checkpoints(scenario: Scenario, tmp_path: Path) -> None:
    ws, seen = run_scenario(scenario, tmp_path)
    assert_scenario(scenario, ws, seen)
    assert output_images(ws) == []


# ============================================================================ behaviour beyond one command


def predict_cli(ws: Workspace, case_dir: Path, out: Path, *extra: str, model: Path | None = None) -> Path:
    assert main(ws.predict(*extra, input=case_dir, model=model, output=out)) == 0
    return out / f"{case_dir.name}_flair.nii.gz"


def test_z_scored_inputs_give_the_synthesis_of_the_raw_ones(tmp_path: Path) -> None:
    """Percentile scaling makes a z-scored case (background -3.6) synthesize like the raw one."""
    raw, z = Workspace(tmp_path / "raw"), Workspace(tmp_path / "z")
    raw.inputs()
    z.inputs(convert=z_scored)
    assert (read_nifti(z.file("t1")) < -1).sum() > 100  # negative brain values, not only background
    model = raw.checkpoint()
    a = read_nifti(predict_cli(raw, raw.data / CASE, raw.out))
    b = read_nifti(predict_cli(z, z.data / CASE, z.out, model=model))
    np.testing.assert_array_equal(a > 0, b > 0)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_ras_output_overlays_the_inputs_in_world_space(tmp_path: Path) -> None:
    """The same images stored LPS and RAS give outputs that agree voxel for voxel in world space."""
    ws = Workspace(tmp_path)
    lps = ws.inputs(case_id="Lps_001")
    ras = ws.inputs(case_id="Ras_001", affine=ras_of(BRATS_AFFINE, SHAPE),
                    convert=lambda m, d: np.ascontiguousarray(d[::-1, ::-1, :]))
    a_path, b_path = predict_cli(ws, lps, ws.out), predict_cli(ws, ras, ws.out)
    a, b = nib.load(str(a_path)), nib.load(str(b_path))
    assert nib.aff2axcodes(b.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(b.affine, ras_of(BRATS_AFFINE, SHAPE))
    np.testing.assert_allclose(np.asarray(b.dataobj)[::-1, ::-1, :], np.asarray(a.dataobj), atol=1e-6)


def test_mask_option_is_the_api_mask(tmp_path: Path) -> None:
    """--mask FILE gives what Synthesizer.predict(mask=...) gives, and differs from the computed mask's result."""
    ws = Workspace(tmp_path)
    case_dir = ws.inputs()
    mask_file = build_mask_file(ws)
    with_file = read_nifti(predict_cli(ws, case_dir, ws.root / "a", "--mask", str(mask_file)))
    without = read_nifti(predict_cli(ws, case_dir, ws.root / "b"))
    api = Synthesizer.from_checkpoint(ws.checkpoint(), device="cpu").predict(find_case(case_dir), mask=read_nifti(mask_file))
    np.testing.assert_array_equal(with_file, api.volume)
    assert np.all(with_file[read_nifti(mask_file) == 0] == 0)
    assert (without > 0).sum() > (with_file > 0).sum()


def test_a_real_process_prints_one_line_and_runs_no_code(tmp_path: Path) -> None:
    """``mrisynth predict --model evil.pt`` as a real process: exit 1, one line, no traceback, no marker."""
    ws = Workspace(tmp_path)
    argv = evil()(ws)
    result = subprocess.run([sys.executable, "-m", "mrisynth.cli", *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("mrisynth predict: error: ") and "refused to load" in result.stderr
    check_no_marker(ws)
    assert output_images(ws) == []


@pytest.mark.parametrize(
    "case_id",
    ["..", "../evil", "a/../../b", "/etc/evil", "x/..", "..\\evil", "a\x00b", ".hidden", "sub/dir"],
)
def test_case_id_cannot_write_outside_the_output_folder(tmp_path: Path, case_id: str) -> None:
    """However a Case is made (the Python API allows anything), its outputs stay in the output folder."""
    out = tmp_path / "deep" / "out"
    with pytest.raises(DataError, match="cannot be used as an output file name|would write outside"):
        output_path(out, Case(id=case_id, scheme="brats2020", folder=tmp_path), "flair")
    from mrisynth.io import Geometry
    from mrisynth.predict import SynthesisResult

    geometry = Geometry(SHAPE, BRATS_AFFINE, nib.Nifti1Header(), "x")
    result = SynthesisResult("flair", np.zeros(SHAPE, np.float32), None, geometry, Case(id=case_id, scheme="brats2020", folder=tmp_path))
    with pytest.raises(DataError):
        write_result(result, out)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


# --- processes killed with SIGKILL, concurrent writers -----------------------------------------

STALLING_WRITER = r"""
import gzip, sys, time
import nibabel as nib
import numpy as np
from mrisynth.io import Geometry, write_volume

target, shape = sys.argv[1], (128, 128, 96)
data = np.random.default_rng(0).random(shape, dtype=np.float32)  # random: compresses slowly, ~6 MB
real_write, total = gzip.GzipFile.write, [0]

def stalling_write(self, chunk):
    n = real_write(self, chunk)
    total[0] += n
    if total[0] > data.nbytes // 2:  # half the volume is in the (temporary) file: stall until killed
        print("STALLED", flush=True)
        time.sleep(300)
    return n

gzip.GzipFile.write = stalling_write
affine = np.diag([-1.0, -1.0, 1.0, 1.0])
write_volume(target, data, Geometry(shape, affine, nib.Nifti1Header(), "synthetic"), overwrite=True)
print("FINISHED", flush=True)
"""


@pytest.mark.parametrize("previous", [False, True], ids=["no-previous-output", "previous-output"])
def test_kill_9_in_the_middle_of_writing_leaves_no_partial_output(tmp_path: Path, previous: bool) -> None:
    """A writer killed with SIGKILL half-way through a 6 MB volume leaves the target absent (or the
    previous complete file untouched) and at most a hidden temporary file."""
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "Case_001_flair.nii.gz"
    old = None
    if previous:
        old = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
        save_nifti(target, old)
    before = target.read_bytes() if previous else None
    child = subprocess.Popen([sys.executable, "-c", STALLING_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().strip()  # blocks until the child has written half the volume
        assert line == "STALLED", f"the writer did not stall half-way: {line!r}"
        partial = [p for p in folder.iterdir() if p.name != target.name]
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # the half-written temporary file
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    if previous:
        assert target.read_bytes() == before
        np.testing.assert_array_equal(load_volume(target)[0], old)
    else:
        assert not target.exists()
    leftovers = [p.name for p in folder.iterdir() if p != target]
    assert all(name.startswith(".") and ".tmp" in name for name in leftovers), leftovers  # hidden only
    assert [c.id for c in discover_cases(folder)] == ([CASE] if previous else [])  # the leftover is not a case


def test_two_predict_runs_into_one_folder_at_once(tmp_path: Path) -> None:
    """Two ``mrisynth predict --overwrite`` processes writing the same output: a valid file, no temporaries."""
    ws = Workspace(tmp_path)
    case_dir = ws.inputs(shape=(96, 112, 40))
    argv = ws.predict("--overwrite")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mrisynth.cli", *argv]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=240), *run.communicate()) for run in runs]
    for code, out, err in results:
        assert code == 0, err
    assert sorted(p.name for p in ws.out.iterdir()) == ["Case_001_flair.nii.gz"]
    written, _ = load_volume(ws.out / "Case_001_flair.nii.gz", allow_constant=True)
    expected = Synthesizer.from_checkpoint(ws.checkpoint(), device="cpu").predict(find_case(case_dir)).volume
    np.testing.assert_allclose(written, expected, atol=1e-6)


def test_an_output_written_meanwhile_by_another_process_is_kept(tmp_path: Path, monkeypatch, capsys) -> None:
    """Without --overwrite, an output that appears while a run predicts (another run was faster) is
    neither replaced nor an error: the case is reported as skipped."""
    import mrisynth.io as mio
    from mrisynth.predict import predict_folder

    ws = Workspace(tmp_path)
    case_dir = ws.inputs()
    target = ws.out / "Case_001_flair.nii.gz"
    real_save = mio.nib.save

    def save_while_another_process_writes(img, filename):
        real_save(img, filename)
        real_save(nib.Nifti1Image(np.full(SHAPE, 7, np.float32), BRATS_AFFINE), str(target))  # the other process wins

    monkeypatch.setattr(mio.nib, "save", save_while_another_process_writes)
    synthesizer = Synthesizer.from_checkpoint(ws.checkpoint(), device="cpu")
    report = predict_folder(case_dir, ws.out, synthesizer=synthesizer, progress=False)
    assert report.exit_code == 0 and report.skipped == [CASE] and report.written == []
    assert "written meanwhile by another process" in capsys.readouterr().err
    assert np.all(read_nifti(target) == 7)
    assert sorted(p.name for p in ws.out.iterdir()) == [target.name]  # no temporary file left


def test_evaluate_ignores_hidden_temporary_files(tmp_path: Path) -> None:
    """A hidden temporary file left by a killed writer in the prediction folder is not a prediction."""
    ws = Workspace(tmp_path)
    argv = evaluation(ws)
    pred = ws.root / "pred"
    (pred / ".Case_001_flair.nii.gz.0a1b2c.tmp.nii.gz").write_bytes(b"partial")
    (pred / ".Case_002_flair.nii.gz").write_bytes(b"partial")
    assert main(argv) == 0


# --- training faults ------------------------------------------------------------------------------


def test_a_partial_metrics_row_from_a_killed_run_is_dropped(tmp_path: Path) -> None:
    """A run killed while appending to metrics.csv leaves half a line; the next row replaces it."""
    from mrisynth.train import _METRICS_COLUMNS, append_metrics_row

    path = tmp_path / "metrics.csv"
    row = {k: 1 for k in _METRICS_COLUMNS}
    append_metrics_row(path, row)
    with path.open("a") as handle:
        handle.write("2,8,0.1")  # killed mid-row
    append_metrics_row(path, {**row, "epoch": 2})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch,") and lines[2].startswith("2,")
    assert all(line.count(",") == len(_METRICS_COLUMNS) - 1 for line in lines)

SLOW_STEPS = r"""
import sys, time
import mrisynth.train as train
from mrisynth.cli import main

real_step = train.Trainer.train_step

def slow_step(self, *args, **kwargs):  # sleeping changes no random stream: only when the kill lands
    time.sleep(0.15)
    return real_step(self, *args, **kwargs)

train.Trainer.train_step = slow_step
sys.exit(main(sys.argv[1:]))
"""

KILL_CONFIG = {
    "model_options": {"base_channels": 4, "latent_dim": 8, "latent_grid": 2},
    "crop": 32, "preprocess": {"min_window": 32}, "slices_per_epoch": 16, "batch_size": 4, "epochs": 3,
    "device": "cpu", "val_slices": 8,
}


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    """``mrisynth train --deterministic`` killed with SIGKILL during epoch 2, then ``--resume``: the
    final last.pt holds exactly the weights of a run that was never interrupted."""
    from mrisynth.train import train

    data = tmp_path / "data"
    for i in range(3):
        write_case(data, case_id=f"Case_00{i}", seed=i)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(KILL_CONFIG))
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["train", "--data", str(data), "--out", str(run), "--config", str(config), "--deterministic"]
    child = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, *argv], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (run / "last.pt").exists():  # the first checkpoint: epoch 1 is done
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.01)
        time.sleep(0.3)  # into epoch 2 (4 steps of >= 0.15 s each)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    at_kill = torch.load(run / "last.pt", weights_only=True)["train_state"]
    assert 1 <= at_kill["epoch"] < 3  # killed after the first checkpoint, before the end of the run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--data", str(data), "--out", str(run), "--resume"]) == 0
        train({**KILL_CONFIG, "deterministic": True}, data, tmp_path / "whole")
    finally:
        torch.set_num_threads(threads)
    resumed = torch.load(run / "last.pt", weights_only=True)
    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    assert resumed["train_state"]["global_step"] == whole["train_state"]["global_step"] == 12
    assert resumed["state_dict"].keys() == whole["state_dict"].keys()
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_nan_loss_through_the_cli_is_one_line_and_keeps_the_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    """The command-line view of a diverging run (the API is covered in test_train.py): exit 1, one
    line on stderr, last.pt of the last good epoch kept."""
    import mrisynth.train as train_mod

    real_loss, calls = train_mod.loss_terms, []

    def nan_at_third_step(*args):
        calls.append(1)
        l1, kl = real_loss(*args)
        return (l1 * float("nan"), kl) if len(calls) == 3 else (l1, kl)

    monkeypatch.setattr(train_mod, "loss_terms", nan_at_third_step)
    ws = Workspace(tmp_path)
    argv = train_args(ws, "--epochs", "2")
    torch.set_num_threads(1)
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the loss is not finite at epoch 2, step 3" in err and "Traceback" not in err
    last = torch.load(ws.root / "run" / "last.pt", weights_only=True)
    assert last["train_state"]["epoch"] == 1


#: Tests that are not rows of a table, reported by scripts/robustness_table.py from their docstrings.
FAULT_TESTS = [
    test_z_scored_inputs_give_the_synthesis_of_the_raw_ones,
    test_ras_output_overlays_the_inputs_in_world_space,
    test_mask_option_is_the_api_mask,
    test_a_real_process_prints_one_line_and_runs_no_code,
    test_case_id_cannot_write_outside_the_output_folder,
    test_kill_9_in_the_middle_of_writing_leaves_no_partial_output,
    test_two_predict_runs_into_one_folder_at_once,
    test_an_output_written_meanwhile_by_another_process_is_kept,
    test_evaluate_ignores_hidden_temporary_files,
    test_a_partial_metrics_row_from_a_killed_run_is_dropped,
    test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_weights,
    test_nan_loss_through_the_cli_is_one_line_and_keeps_the_checkpoint,
]
