"""Torch datasets over cached slices, and the one function that builds network inputs.

Two target modes share one code path: a fixed target (``"flair"``: the other three modalities are
the 3 input channels, the seed's setting) and ``"any"`` (the four modalities with the missing one
zeroed, plus four channels saying which one is missing: 8 input channels). Training draws the
missing modality at random per sample; validation cycles through them deterministically.

With ``context`` k > 0 (2.5D input) every input modality also brings the k brain slices on either
side of the target slice as channels (:func:`neighbour_positions`), so the network sees through
the plane; the target stays the one centre slice.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import CachedCase
from .modalities import MODALITIES, canonical

TARGET_MODES: tuple[str, ...] = (*MODALITIES, "any")


def check_target_mode(target: str) -> str:
    """``"any"`` or a canonical modality name (aliases such as ``t2f`` accepted)."""
    if target == "any":
        return target
    return canonical(target)


def in_channels_for(target: str, context: int = 0) -> int:
    """Number of network input channels for a target mode and ``context`` slices on either side."""
    depth = 2 * context + 1
    if check_target_mode(target) == "any":
        return len(MODALITIES) * depth + len(MODALITIES)
    return (len(MODALITIES) - 1) * depth


def neighbour_positions(positions: np.ndarray, n_slices: int, context: int) -> np.ndarray:
    """[len(positions), 2k+1] positions of each slice's k neighbours on either side and itself.

    Positions index the brain slices of one case (the slices training caches and prediction
    synthesizes); beyond the first or last brain slice the edge slice is repeated, identically in
    training and prediction.
    """
    offsets = np.arange(-context, context + 1)
    return np.clip(np.asarray(positions)[:, None] + offsets[None, :], 0, n_slices - 1)


def assemble_input(stack: torch.Tensor, missing: torch.Tensor, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input and target from four-modality slices ``stack`` [B, 4, H, W], or [B, 4, 2k+1, H, W]
    with k neighbouring slices on either side (the target is then the centre slice).

    ``missing`` [B] holds each sample's missing-modality index. Used by training and prediction
    alike, so both see exactly the same inputs. Channels are modality-major (a modality's slices
    in order from below), then, for ``"any"``, the four missing-modality flags.
    """
    if stack.dim() == 4:  # single slices: a depth of one
        stack = stack[:, :, None]
    depth = stack.shape[2]
    centre, flat = stack[:, :, depth // 2], stack.flatten(1, 2)
    if check_target_mode(target) == "any":
        index = missing.long().view(-1, 1, 1, 1).expand(-1, 1, *centre.shape[2:])
        target_slices = torch.gather(centre, 1, index)
        onehot = torch.nn.functional.one_hot(missing.long(), len(MODALITIES)).to(stack.dtype)
        keep = (1.0 - onehot).repeat_interleave(depth, dim=1)
        inputs = torch.cat(
            [flat * keep[:, :, None, None], onehot[:, :, None, None].expand(-1, -1, *centre.shape[2:])], dim=1
        )
        return inputs, target_slices
    # a fixed target mode defines the target; ``missing`` cannot pick another modality
    fixed = MODALITIES.index(check_target_mode(target))
    others = [i for i in range(len(MODALITIES)) if i != fixed]
    return stack[:, others].flatten(1, 2), centre[:, fixed : fixed + 1]


class SliceDataset(Dataset):
    """Brain-containing axial slices of cached cases, cropped to ``crop``x``crop``.

    Each item is ``(stack [4, crop, crop] float32, missing index)``, or with ``context`` k > 0
    ``(stack [4, 2k+1, crop, crop], missing index)`` (the slice and its neighbours, see
    :func:`neighbour_positions`); :func:`assemble_input` turns a batch into network input and
    target. Randomness (missing modality, crop offset) is derived from (seed, epoch, index), so a
    resumed run sees exactly the samples an uninterrupted one would.
    """

    def __init__(
        self, cases: list[CachedCase], target: str, crop: int = 160, train: bool = True, seed: int = 0,
        context: int = 0,
    ):
        self.cases = cases
        self.target = check_target_mode(target)
        self.crop = crop
        self.train = train
        self.seed = seed
        self.context = context
        self.epoch = 0
        self.index = [(ci, si) for ci, case in enumerate(cases) for si in range(case.n_slices)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self.index) <= i < len(self.index):
            raise IndexError(f"slice index {i} out of range for {len(self.index)} slices")
        i = i % len(self.index)  # negative indices name the same item (and the same randomness)
        case_i, slice_i = self.index[i]
        slices = self.cases[case_i].slices
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        x0, y0 = self._crop_origin(slices.shape[2:], rng)
        depth: int | np.ndarray = slice_i
        if self.context:
            depth = neighbour_positions(np.array([slice_i]), slices.shape[1], self.context)[0]
        window = np.asarray(slices[:, depth, x0 : x0 + self.crop, y0 : y0 + self.crop], dtype=np.float32)
        if window.shape[-2:] == (self.crop, self.crop):
            stack = window
        else:  # a window smaller than the crop (small images, small min_window): pad, centred
            stack = np.zeros((*window.shape[:-2], self.crop, self.crop), dtype=np.float32)
            px, py = (self.crop - window.shape[-2]) // 2, (self.crop - window.shape[-1]) // 2
            stack[..., px : px + window.shape[-2], py : py + window.shape[-1]] = window
        return torch.from_numpy(stack), self._missing(i, rng)

    def _crop_origin(self, shape: tuple[int, int], rng: np.random.Generator | None) -> tuple[int, int]:
        """Random in training, centred otherwise (a window smaller than the crop is padded)."""
        spare = [max(s - self.crop, 0) for s in shape]
        if rng is None:
            return spare[0] // 2, spare[1] // 2
        return int(rng.integers(spare[0] + 1)), int(rng.integers(spare[1] + 1))

    def _missing(self, i: int, rng: np.random.Generator | None) -> int:
        if self.target != "any":
            return MODALITIES.index(self.target)
        return int(rng.integers(len(MODALITIES))) if rng is not None else i % len(MODALITIES)
