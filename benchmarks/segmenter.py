"""A reference brain-tumour segmenter, for the downstream check only (not a user-facing feature).

Why it exists: people synthesize a missing sequence so that a segmentation model needing all four
can run, and the BraSyn challenge ranks syntheses by the Dice of a fixed segmenter on the completed
set. ``benchmarks/downstream.py`` needs such a segmenter, trained on real data only, to ask how much
of a missing sequence's information a synthetic one gives back.

What it is: MONAI's 2D ``BasicUNet`` on the four modalities (axial slices, the same preprocessing
as mrisynth: 1-99 percentile scaling in the brain, LPS reorientation, brain-centred window),
predicting the three overlapping BraTS regions as independent sigmoid channels -- whole tumour
(labels 1+2+ET), tumour core (1+ET), enhancing tumour (ET = 4 in BraTS 2018-2021, 3 from 2023) --
trained with Dice + binary cross-entropy on random 160x160 crops, tumour slices over-sampled, left-
right flips. Nothing here is tuned on the held-out cases: there is no validation-based selection,
the last weights of a fixed wall-clock budget are used.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.networks.nets import BasicUNet

from mrisynth.cases import Case
from mrisynth.io import BRATS_LABELS, read_images, read_segmentation
from mrisynth.modalities import MODALITIES
from mrisynth.preprocess import PreparedCase, PreprocessConfig, brain_mask, prepare

REGIONS = ("WT", "TC", "ET")
FEATURES = (16, 32, 64, 128, 256, 16)
CROP = 160  # training crop; every window is at least this large (min_window) and a multiple of 16
PREPROCESS = PreprocessConfig()  # mrisynth's defaults: the same scaling the synthesis models see


def region_masks(labels: np.ndarray, scheme: str) -> np.ndarray:
    """BraTS label volume -> [3, ...] bool: whole tumour, tumour core, enhancing tumour."""
    enhancing = BRATS_LABELS[scheme][-1]  # 4 (2018-2021) or 3 (2023+)
    et = labels == enhancing
    tc = (labels == 1) | et
    wt = labels > 0
    return np.stack([wt, tc, et])


def build_segmenter() -> torch.nn.Module:
    return BasicUNet(spatial_dims=2, in_channels=len(MODALITIES), out_channels=len(REGIONS), features=FEATURES)


def case_mask(volumes: dict[str, np.ndarray]) -> np.ndarray:
    """The brain mask from the real sequences, fixed for every variant of a case.

    The segmenter's preprocessing must not change when one channel is swapped for a synthetic,
    copied or zero volume: only that channel differs between the conditions compared.
    """
    return brain_mask([volumes[m] for m in MODALITIES])


def prepare_inputs(volumes: dict[str, np.ndarray], affine: np.ndarray, mask: np.ndarray) -> PreparedCase:
    """Four volumes -> normalised axial slices in mrisynth's layout (a zero volume stays zero)."""
    return prepare(volumes, affine, PREPROCESS, mask)


# --- training data -------------------------------------------------------------------------------


@dataclass
class TrainingSlices:
    """Brain-containing slices of one case: images [Z, 4, H, W] float16, regions [Z, 3, H, W] bool."""

    images: np.ndarray
    regions: np.ndarray

    @property
    def tumour(self) -> np.ndarray:
        return np.flatnonzero(self.regions[:, 0].any(axis=(1, 2)))


def load_training_case(case: Case) -> TrainingSlices:
    """Read, preprocess and slice one training case with its ground-truth regions."""
    volumes, geometry = read_images(case.modalities)
    labels = read_segmentation(case.seg, geometry, labels=BRATS_LABELS[case.scheme], strict=True)
    prepared = prepare_inputs(volumes, geometry.affine, case_mask(volumes))
    brain = prepared.brain_slices
    regions = np.stack([prepared.layout.to_slices(r) for r in region_masks(labels, case.scheme)], axis=1)
    images = prepared.slices[:, brain].transpose(1, 0, 2, 3).astype(np.float16)
    return TrainingSlices(images=np.ascontiguousarray(images), regions=np.ascontiguousarray(regions[brain]))


def sample_batch(data: list[TrainingSlices], batch: int, rng: np.random.Generator,
                 tumour_fraction: float = 0.67) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 160x160 crops of random slices, two thirds of them with tumour, flipped left-right at random."""
    xs, ys = [], []
    for _ in range(batch):
        case = data[rng.integers(len(data))]
        pool = case.tumour if case.tumour.size and rng.random() < tumour_fraction else np.arange(len(case.images))
        z = int(pool[rng.integers(len(pool))])
        _, height, width = case.images[z].shape
        top, left = rng.integers(height - CROP + 1), rng.integers(width - CROP + 1)
        x = case.images[z, :, top : top + CROP, left : left + CROP].astype(np.float32)
        y = case.regions[z, :, top : top + CROP, left : left + CROP].astype(np.float32)
        if rng.random() < 0.5:  # LPS: the first in-plane axis is left-right
            x, y = x[:, ::-1], y[:, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def train_segmenter(cases: list[Case], minutes: float, seed: int = 0, batch: int = 8, lr: float = 1e-3,
                    log: Callable[[str], None] = print) -> tuple[torch.nn.Module, dict]:
    """Train for a wall-clock budget (data loading excluded) on the given cases; the last weights are kept."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    data = [load_training_case(c) for c in cases]
    load_s = time.perf_counter() - start
    log(f"segmenter: {sum(len(d.images) for d in data)} brain slices of {len(data)} cases loaded in {load_s:.0f} s")
    model = build_segmenter()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    dice = DiceLoss(sigmoid=True, batch=True)
    bce = torch.nn.BCEWithLogitsLoss()
    model.train()
    step, losses, start = 0, [], time.perf_counter()
    while time.perf_counter() - start < minutes * 60:
        x, y = sample_batch(data, batch, rng)
        logits = model(x)
        loss = dice(logits, y) + bce(logits, y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            log(f"segmenter step {step}: loss {np.mean(losses[-100:]):.4f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    info = {"steps": step, "batch": batch, "lr": lr, "minutes": minutes, "train_s": round(time.perf_counter() - start, 1),
            "final_loss": round(float(np.mean(losses[-100:])), 4) if losses else None, "seed": seed,
            "cases": [c.id for c in cases], "features": list(FEATURES),
            "parameters": int(sum(p.numel() for p in model.parameters()))}
    return model, info


# --- inference -----------------------------------------------------------------------------------


@torch.inference_mode()
def segment(model: torch.nn.Module, prepared: PreparedCase, mask: np.ndarray, batch: int = 16) -> np.ndarray:
    """[3, X, Y, Z] bool regions on the input grid (sigmoid > 0.5 on every brain slice), inside
    ``mask``, the brain mask the case was prepared with (no tumour is predicted outside the brain)."""
    brain = prepared.brain_slices
    z, height, width = prepared.mask.shape
    out = np.zeros((len(REGIONS), z, height, width), dtype=bool)
    for start in range(0, len(brain), batch):
        chosen = brain[start : start + batch]
        x = torch.from_numpy(np.ascontiguousarray(prepared.slices[:, chosen].transpose(1, 0, 2, 3)))
        out[:, chosen] = (model(x) > 0).numpy().transpose(1, 0, 2, 3)
    restored = np.stack([prepared.layout.to_volume(r.astype(np.uint8)) for r in out]).astype(bool)
    return restored & mask[None]


def save_segmenter(model: torch.nn.Module, info: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
    tmp.replace(path)


def load_segmenter(path: Path) -> tuple[torch.nn.Module, dict]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = build_segmenter()
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved["info"]
