"""Small building blocks shared by the architectures in ``mrisynth.models``."""
from __future__ import annotations

import torch
from torch import nn


class DoubleConv(nn.Sequential):
    """(conv 3x3 pad 1 -> BatchNorm -> ReLU) x 2: the U-Net stage, keeps H and W.

    The convolutions carry a bias even though BatchNorm follows, as in the seed, so that
    parameter counts (and seed checkpoints) match.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UpStage(nn.Module):
    """Decoder stage: 2x2 transposed conv (stride 2), concatenate the skip, DoubleConv."""

    def __init__(
        self, in_channels: int, up_channels: int, skip_channels: int, out_channels: int
    ) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, up_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(up_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (what the seed reported)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
