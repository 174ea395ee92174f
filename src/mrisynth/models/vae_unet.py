"""``vae_unet``: the founding prototype's VAE-UNet, reproduced layer for layer.

Why this shape: a U-Net gives sharp anatomy through its skips, and a global variational
latent lets prediction draw several posterior samples (their spread is an uncertainty map).

Layout with ``b = base_channels`` (default 32), input ``[B, in_channels, H, W]``, H and W
multiples of 16:

* Encoder: 4 stages of (conv3x3 pad 1 -> BN -> ReLU) x 2 with b, 2b, 4b, 8b channels
  (32, 64, 128, 256); each stage output is kept as a skip, then 2x2 max-pooled.
* Bottleneck: (conv-BN-ReLU) x 2, 8b -> 8b channels, at H/16 x W/16.
* Global latent: bottleneck adaptive-avg-pooled to ``latent_grid`` x ``latent_grid``
  (10 x 10), flattened (8b * 100 = 25600), two linear layers to mu and log sigma^2
  (``latent_dim`` = 128). z = mu + sigma * eps when sampling, z = mu otherwise.
  A linear layer maps z back to 8b x 10 x 10, which is resized (bilinear) to the
  bottleneck's H/16 x W/16. This latent map REPLACES the bottleneck features as the
  decoder input (the seed's design: the decoder sees only z, the skips carry detail).
* Decoder: 4 stages of 2x2 transposed conv, stride 2, halving the channels
  (8b->4b, 4b->2b, 2b->b, b->b/2, i.e. 256->128->64->32->16), concatenated with the encoder
  skip of that level (8b, 4b, 2b, b), then (conv-BN-ReLU) x 2 to 4b, 2b, b, b
  (128, 64, 32, 32) channels. Final 1x1 conv to ``out_channels`` and sigmoid: output in [0, 1].

Parameter count (defaults, convolutions with bias as in the seed):

=====================  ==============  ==============
part                   in_channels=3   in_channels=8
=====================  ==============  ==============
encoder + bottleneck       2,355,360       2,356,800
fc_mu + fc_logvar          6,553,856       6,553,856
fc_decode                  3,302,400       3,302,400
decoder + 1x1 head           973,073         973,073
total                     13,184,689      13,186,129
=====================  ==============  ==============

This matches the seed's "about 13.2 M" with no width adjustment; 9.86 M of it is in the
three linear layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mrisynth.models import register_model
from mrisynth.models.blocks import DoubleConv, UpStage

DEPTH = 4  # number of 2x2 poolings: H and W must be multiples of 2**DEPTH


@register_model("vae_unet")
class VAEUNet(nn.Module):
    """VAE-UNet with a global vector latent; ``forward`` returns (prediction, mu, logvar)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 1,
        base_channels: int = 32,
        latent_dim: int = 128,
        latent_grid: int = 10,
    ) -> None:
        super().__init__()
        b = base_channels
        enc_widths = [b, 2 * b, 4 * b, 8 * b]
        self.encoder = nn.ModuleList()
        prev = in_channels
        for width in enc_widths:
            self.encoder.append(DoubleConv(prev, width))
            prev = width
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(8 * b, 8 * b)

        self.latent_channels = 8 * b
        self.latent_grid = latent_grid
        flat = self.latent_channels * latent_grid * latent_grid
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_logvar = nn.Linear(flat, latent_dim)
        self.fc_decode = nn.Linear(latent_dim, flat)

        # (input, transposed-conv output, skip, stage output) channels, deepest first
        dec_specs = [
            (8 * b, 4 * b, 8 * b, 4 * b),
            (4 * b, 2 * b, 4 * b, 2 * b),
            (2 * b, b, 2 * b, b),
            (b, b // 2, b, b),
        ]
        self.decoder = nn.ModuleList(UpStage(*spec) for spec in dec_specs)
        self.head = nn.Conv2d(b, out_channels, kernel_size=1)

    def forward(
        self, x: torch.Tensor, sample: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict the target slice(s) in [0, 1], with the posterior's mu and logvar.

        ``sample=None`` samples z iff ``self.training``; ``sample=True`` in eval mode draws a
        posterior sample with BatchNorm's running statistics (used for K-sample uncertainty).
        """
        _check_size(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)

        mu, logvar = self.encode_latent(x)
        if sample is None:
            sample = self.training
        z = reparameterize(mu, logvar) if sample else mu
        x = self.decode_latent(z, size=x.shape[-2:])

        for stage, skip in zip(self.decoder, reversed(skips)):
            x = stage(x, skip)
        return torch.sigmoid(self.head(x)), mu, logvar

    def encode_latent(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bottleneck features -> (mu, logvar) of the global latent, each ``[B, latent_dim]``."""
        grid = self.latent_grid
        pooled = F.adaptive_avg_pool2d(features, (grid, grid)).flatten(1)
        return self.fc_mu(pooled), self.fc_logvar(pooled)

    def decode_latent(self, z: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """Latent vector -> feature map of the bottleneck's spatial ``size`` (decoder input)."""
        grid = self.latent_grid
        latent_map = self.fc_decode(z).view(-1, self.latent_channels, grid, grid)
        if tuple(size) == (grid, grid):
            return latent_map
        return F.interpolate(latent_map, size=tuple(size), mode="bilinear", align_corners=False)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps, eps ~ N(0, 1): sampling that gradients can flow through."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def _check_size(x: torch.Tensor) -> None:
    """Fail clearly instead of with a skip-concatenation shape error deep in the decoder."""
    factor = 2**DEPTH
    if x.dim() != 4 or x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(
            f"vae_unet needs input [B, C, H, W] with H and W multiples of {factor}; "
            f"got shape {tuple(x.shape)} (pad or crop the slices first)"
        )
