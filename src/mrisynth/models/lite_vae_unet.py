"""``lite_vae_unet``: a residual VAE-UNet built for CPU speed, with spatial latents and FiLM.

Why it exists: ``vae_unet`` spends 3.1 GMAC per 160x176 slice, mostly in wide convolutions at full
and half resolution, and 9.8 M of its 13.2 M parameters in the linear layers around a 128-d global
latent. This model does 0.57 GMAC per slice (0.54 with 3 input channels) with 1.27 M parameters
(5 MB in fp32) and puts most of the work at H/4 to H/16, where CPU convolutions run near peak.
On a shared 2-core CPU it computes a 140-slice volume about 6x faster than ``vae_unet`` with 2
threads (median; 3x to 8x from one repeat to the next with the neighbours' load) and 8x faster
with 1 thread (``benchmarks/model_speed.py``).

Layout (``b = base_channels`` = 16, level widths ``b * (1, 2, 3, 6, 8)`` = 16, 32, 48, 96, 128,
input ``[B, in_channels, H, W]``, H and W multiples of 16):

* Encoder.
  ``stem``: a 3x3 conv at full resolution, kept linear (a full-resolution activation costs a
  memory pass and buys little). Its output is only the full-resolution skip.
  ``down1`` to ``down4``: 3x3 stride-2 conv -> GroupNorm -> SiLU (the first one reads the input
  directly, so the stem is off the main path). H/4, H/8 and H/16 each add one ResBlock.
  The encoder keeps two skips: ``s0`` (stem, H) and ``s1`` (``down1`` output, H/2).
* Two spatial latents, each with 1x1 conv heads for mu and log sigma^2; z = mu + sigma * eps when
  sampling, z = mu otherwise:
  the global latent, ``latent_channels`` (8) maps at H/16, read from the deepest features;
  the local latent, ``local_latent_channels`` (4) maps at H/4, read from the H/4 features.
  Why two: a latent only at H/16 sits behind strong skips, and a decoder can learn to ignore
  it (posterior collapse: every posterior sample gives the same image; ``vae_unet``'s samples
  differ by less than 1e-4 after short fits). Here nothing bypasses the latents below H/2:
  H/16 reaches the decoder only as z_global (as in the seed, where the latent replaces the
  bottleneck), there is no H/8 skip, and the H/4 features reach the decoder only as z_local.
  Sampling therefore changes the output at scales down to 4 pixels, and the spread of K draws
  is a per-voxel map. Only H and H/2 keep deterministic skips, for edges and local contrast.
  The architecture makes the spread possible; how well it tracks error depends on training
  (the encoder never sees the target, and L1 + a small KL rewards a deterministic output):
  in a small fit where one region of the target was unpredictable, the spread there grew to
  about 2x the spread elsewhere after about 2,000 steps, while staying far below the actual
  error. It is a relative map, not a calibrated sigma.
* Decoder. ``from_global``: 3x3 conv -> GroupNorm -> FiLM -> SiLU, then a ResBlock at H/16.
  Going up: 2x2 stride-2 transposed conv (measured as fast as or faster than 1x1 conv + pixel
  shuffle or bilinear upsampling, and with 9x fewer MACs than upsample + 3x3 conv), the skip
  added (not concatenated: that would double the next conv's input width), then a ResBlock at
  H/8 and H/4. At H/2 and H there is no ResBlock, only the skip sum. The full-resolution end is
  a 3x3 conv + SiLU and a 1x1 head with a sigmoid, so the output is in [0, 1].
* ResBlock: ``x + conv3x3(SiLU(FiLM(GroupNorm(conv3x3(x)))))``. GroupNorm because it does not
  depend on the batch (training at batch 4, inference at any batch size, and eval equals
  train apart from sampling). One norm per block because on CPU each norm is a memory pass.
  Dense 3x3 convolutions, not depthwise: in a quick measurement a depthwise 3x3 was slower than
  a dense one at 16 channels and full resolution, and 3-4x less efficient per MAC at H/4 and H/8
  (20-30x faster for 64-128x fewer MACs), before the extra 1x1 convs and norms a depthwise
  block needs.
* Conditioning on the missing modality (FiLM): with ``in_channels == 8`` ("any" mode, see
  ``dataset.assemble_input``) the last 4 input channels are constant one-hot maps, so their
  spatial mean is the one-hot vector itself (``missing_onehot``). One linear map turns it into a
  per-channel scale and shift, ``h * (1 + gamma) + beta``, for each of the four decoder blocks
  (after their GroupNorm). Only the decoder is modulated: the encoder already sees the one-hot
  as input channels, and each FiLM costs a memory pass. With any other channel count (3 =
  fixed target) there is no conditioning and ``film`` is None.
* Memory layout: the input is converted to channels-last (NHWC) inside ``forward`` and the
  weights are stored channels-last: oneDNN's CPU convolutions are much faster in NHWC for narrow
  layers (1.35x to 1.45x on this model), and stored NHWC weights are not re-laid out at every
  call. ``checkpoint.py`` saves ``.contiguous()`` copies, and loading copies into these
  parameters whatever the layout of the file. The output is ``[B, out_channels, H, W]``,
  contiguous, as usual.

* ``predict_scale`` (heteroscedastic output): a small branch (3x3 conv, SiLU, 1x1 conv) on the
  full-resolution features of the head adds a channel, the log of a per-pixel Laplace scale b,
  trained by ``train.laplace_nll``. The branch reads those features detached and the NLL uses
  the detached synthesis, so no gradient of the scale reaches the synthesis: it trains by L1
  exactly as without the branch (a first version that shared the head's features lost 0.004
  validation L1 after 8 epochs). The branch runs only when the posterior is sampled (training,
  ``sample=True``): a plain prediction (and the ONNX graph) costs what it costs without it. b is the model's own estimate of
  its absolute error (E|y - mu| = b for a Laplace), which the posterior samples alone do not
  give: their spread follows where the latents matter, not where the synthesis is wrong.
  ``predict`` turns it into a std map (a Laplace's std is sqrt(2) b) combined with the samples'.

``forward`` returns ``(prediction, mu, logvar)`` like ``vae_unet``; ``prediction`` is
``[B, out_channels, H, W]`` in [0, 1], with one more channel, the log scale, when
``predict_scale`` and sampling (mrisynth uses ``out_channels = 1``: channel 0 the synthesis,
channel 1 log b). mu and logvar are the two
latents' maps, each flattened in (h, w, channel) order (a free view of an NHWC map) and
concatenated: ``[B, latent_channels * H/16 * W/16 + local_latent_channels * H/4 * W/4]``.
``kl_divergence`` (an element-wise mean) applies as is, and ``split_latent`` gives the maps back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mrisynth.modalities import MODALITIES
from mrisynth.models import register_model
from mrisynth.models.vae_unet import reparameterize

DEPTH = 4  # number of stride-2 steps: H and W must be multiples of 2**DEPTH
WIDTH_MULTIPLIERS = (1, 2, 3, 6, 8)  # channels per level (H, H/2, ..., H/16) in base_channels
LOCAL_LEVEL = 2  # the local latent lives at H / 2**LOCAL_LEVEL
N_MODALITIES = len(MODALITIES)
LOG_SCALE_MIN, LOG_SCALE_MAX = -9.0, 2.0  # log Laplace scale: b from 1e-4 to 7.4 (targets are in [0, 1])

Film = tuple[torch.Tensor, torch.Tensor]  # (scale, shift), each [B, C, 1, 1]


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 when they divide ``channels``, else the largest of 4, 2, 1 that does."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class ConvNormAct(nn.Module):
    """3x3 conv (optionally stride 2) -> GroupNorm -> FiLM (when given) -> SiLU.

    ``film`` is ``(scale, shift)``, each ``[B, out_channels, 1, 1]``, computed by the model from
    the missing-modality one-hot; None means no conditioning.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = _conv3x3(in_channels, out_channels, stride)
        self.norm = nn.GroupNorm(_groups(out_channels), out_channels)

    def forward(self, x: torch.Tensor, film: Film | None = None) -> torch.Tensor:
        x = self.norm(self.conv(x))
        if film is not None:
            scale, shift = film
            x = torch.addcmul(shift, x, scale)
        return F.silu(x, inplace=True)


class ResBlock(nn.Module):
    """``x + conv3x3(ConvNormAct(x))``: two convolutions, one norm, same width in and out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inner = ConvNormAct(channels, channels)
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: torch.Tensor, film: Film | None = None) -> torch.Tensor:
        return self.conv(self.inner(x, film)).add_(x)


def _up(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    """2x upsampling as a 2x2 stride-2 transposed conv (non-overlapping: no checkerboard)."""
    return nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False)


@register_model("lite_vae_unet")
class LiteVAEUNet(nn.Module):
    """Residual VAE-UNet with global (H/16) and local (H/4) spatial latents and FiLM conditioning.

    ``forward`` returns (prediction, mu, logvar); see the module docstring for the layout.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 1,
        base_channels: int = 16,
        latent_channels: int = 8,
        local_latent_channels: int = 4,
        predict_scale: bool = False,
    ) -> None:
        super().__init__()
        self.predict_scale = predict_scale
        self.out_channels = out_channels
        w = [base_channels * m for m in WIDTH_MULTIPLIERS]

        # encoder
        self.stem = _conv3x3(in_channels, w[0], bias=True)
        self.down1 = ConvNormAct(in_channels, w[1], stride=2)
        self.down2 = ConvNormAct(w[1], w[2], stride=2)
        self.enc2 = ResBlock(w[2])
        self.down3 = ConvNormAct(w[2], w[3], stride=2)
        self.enc3 = ResBlock(w[3])
        self.down4 = ConvNormAct(w[3], w[4], stride=2)
        self.enc4 = ResBlock(w[4])

        # latents: 1x1 conv heads for mu and log sigma^2
        self.mu_global = nn.Conv2d(w[4], latent_channels, 1)
        self.logvar_global = nn.Conv2d(w[4], latent_channels, 1)
        self.mu_local = nn.Conv2d(w[LOCAL_LEVEL], local_latent_channels, 1)
        self.logvar_local = nn.Conv2d(w[LOCAL_LEVEL], local_latent_channels, 1)

        # decoder
        self.from_global = ConvNormAct(latent_channels, w[4])
        self.dec4 = ResBlock(w[4])
        self.up3 = _up(w[4], w[3])
        self.dec3 = ResBlock(w[3])
        self.up2 = _up(w[3], w[2])
        self.from_local = nn.Conv2d(local_latent_channels, w[2], 1)
        self.dec2 = ResBlock(w[2])
        self.up1 = _up(w[2], w[1])
        self.up0 = _up(w[1], w[0])
        self.final = _conv3x3(w[0], w[0], bias=True)
        self.head = nn.Conv2d(w[0], out_channels, 1)
        # the scale branch reads the head's input features detached: it learns from them without
        # ever changing them, so the synthesis trains exactly as in a model without the branch
        self.scale_head = (
            nn.Sequential(_conv3x3(w[0], w[0], bias=True), nn.SiLU(inplace=True), nn.Conv2d(w[0], 1, 1))
            if predict_scale else None
        )

        # FiLM for the four conditioned decoder blocks (from_global, dec4, dec3, dec2), all from
        # one linear map of the one-hot: one small matmul per forward, not one per block
        self.film_widths = [w[4], w[4], w[3], w[2]]
        self.film: nn.Linear | None = None
        if in_channels == 2 * N_MODALITIES:
            self.film = nn.Linear(N_MODALITIES, 2 * sum(self.film_widths))
            nn.init.normal_(self.film.weight, std=0.1)  # near identity, but wired from step 0
            nn.init.zeros_(self.film.bias)

        # weights in the layout the convolutions run in, so no call re-lays them out
        self.to(memory_format=torch.channels_last)

    def forward(
        self, x: torch.Tensor, sample: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict the target slice(s) in [0, 1], with the posterior's mu and logvar (flattened).

        ``sample=None`` samples z iff ``self.training``; ``sample=True`` in eval mode draws a
        posterior sample (used for K-sample uncertainty maps).
        """
        _check_size(x)
        if sample is None:
            sample = self.training
        film = self.film_params(x)
        x = x.contiguous(memory_format=torch.channels_last)

        s0 = self.stem(x)
        s1 = self.down1(x)
        h2 = self.enc2(self.down2(s1))
        h4 = self.enc4(self.down4(self.enc3(self.down3(h2))))

        mu_g, logvar_g = self.mu_global(h4), self.logvar_global(h4)
        mu_l, logvar_l = self.mu_local(h2), self.logvar_local(h2)
        z_g = reparameterize(mu_g, logvar_g) if sample else mu_g
        z_l = reparameterize(mu_l, logvar_l) if sample else mu_l

        h = self.dec4(self.from_global(z_g, film[0]), film[1])
        h = self.dec3(self.up3(h), film[2])
        h = self.dec2(self.up2(h).add_(self.from_local(z_l)), film[3])
        h = self.up1(h).add_(s1)
        h = self.up0(h).add_(s0)
        features = F.silu(self.final(h), inplace=True)
        pred = torch.sigmoid(self.head(features))
        if self.scale_head is not None and sample:  # log of the Laplace scale b, bounded for a stable NLL
            log_scale = self.scale_head(features.detach()).clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
            pred = torch.cat([pred, log_scale], dim=1)

        mu = torch.cat([_flatten_nhwc(mu_g), _flatten_nhwc(mu_l)], dim=1)
        logvar = torch.cat([_flatten_nhwc(logvar_g), _flatten_nhwc(logvar_l)], dim=1)
        return pred.contiguous(), mu, logvar

    def missing_onehot(self, x: torch.Tensor) -> torch.Tensor | None:
        """The [B, 4] missing-modality one-hot: the spatial mean of the last 4 input channels.

        In "any" mode those channels are constant maps (``dataset.assemble_input``), so the mean
        recovers the one-hot exactly. None when the model is not conditioned (fixed target).
        """
        if self.film is None:
            return None
        return x[:, -N_MODALITIES:].mean(dim=(2, 3))

    def film_params(self, x: torch.Tensor) -> list[Film | None]:
        """(scale, shift) per conditioned decoder block, ``scale = 1 + gamma``; Nones if unconditioned."""
        onehot = self.missing_onehot(x)
        if onehot is None:
            return [None] * len(self.film_widths)
        params = self.film(onehot)[:, :, None, None]
        films = []
        for block_params in params.split([2 * c for c in self.film_widths], dim=1):
            gamma, beta = block_params.chunk(2, dim=1)
            films.append((1 + gamma, beta))
        return films

    def split_latent(
        self, flat: torch.Tensor, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flattened mu (or logvar) for ``height`` x ``width`` inputs -> (global map, local map).

        Shapes ``[B, latent_channels, H/16, W/16]`` and ``[B, local_latent_channels, H/4, W/4]``.
        """
        maps = []
        offset = 0
        for head, level in ((self.mu_global, DEPTH), (self.mu_local, LOCAL_LEVEL)):
            h, w, c = height // 2**level, width // 2**level, head.out_channels
            maps.append(flat[:, offset : offset + h * w * c].reshape(-1, h, w, c).permute(0, 3, 1, 2))
            offset += h * w * c
        return maps[0], maps[1]


def _flatten_nhwc(t: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w*C] in (h, w, C) order: a view (no copy) for a channels-last map."""
    return t.permute(0, 2, 3, 1).flatten(1)


def _check_size(x: torch.Tensor) -> None:
    """Fail clearly instead of with a skip-addition shape error deep in the decoder."""
    factor = 2**DEPTH
    if x.dim() != 4 or x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(
            f"lite_vae_unet needs input [B, C, H, W] with H and W multiples of {factor}; "
            f"got shape {tuple(x.shape)} (pad or crop the slices first)"
        )
