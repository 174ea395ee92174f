"""Network speed of the registered models on CPU, as ratios to the seed's ``vae_unet``; optional sanity fit.

Why: the default model must synthesize a whole volume on an ordinary CPU much faster than
``vae_unet`` (target: at least 5x in network time). On a shared machine a timing swings 2-5x
with the neighbours' load, so the contenders run in one process, taking turns (round robin), and
only ratios of medians are compared.

Workload, the one ``predict`` gives a network: the brain slices of one volume (140 slices of
160x176, the brain-centred window), batch 16, fp32, ``torch.set_num_threads(2)``,
``torch.inference_mode()``, ``model.eval()``, untrained weights (the arithmetic, hence the time, is
that of a trained model). Input data is random: the time does not depend on it.

Columns: parameters; multiply-accumulates per slice (``FlopCounterMode``: convolutions,
transposed convolutions and linear layers; norms and activations are not counted); seconds per
volume (median over ``--repeats``); the ratio to ``vae_unet``; achieved GFLOP/s (2 x MACs / time);
and that as a percentage of this CPU's fp32 matrix-multiply throughput (``torch.mm`` of 2048x2048
with the same threads, measured inside every repeat, median).

``--fit SECONDS`` adds a sanity fit: every model trains on the same small structured data set
(64x64, a target that is a smooth nonlinear and contextual function of the inputs, "any" mode with
8 input channels), Adam lr 1e-3, batch 8, L1 + 1e-4 x KL, for the same CPU seconds each (steps
interleaved, each model's own step time counted). It shows whether an architecture learns at least
as fast per CPU second; it says nothing about MRI quality. In one block FLAIR carries a term that
no other modality shows; the ratio of posterior-sample spread inside that block to outside it
(FLAIR missing) shows whether the spread grows where the target is truly uncertain.

Usage, from the repository root::

    .venv/bin/python benchmarks/model_speed.py                    # about 2 min on a quiet 2-core CPU
    .venv/bin/python benchmarks/model_speed.py --fit 60           # adds the sanity fit (3-4 min more)
    .venv/bin/python benchmarks/model_speed.py --layout-baseline  # adds vae_unet fed channels-last

``--threads`` applies to both parts. On a busy shared CPU, 2 threads can be several times slower
than 1 for small models (OpenMP synchronisation at each of ~70 ops while the sibling thread waits
for a core), so a ``--threads 1`` run is the steadier comparison there.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from _common import SEED_MODEL, command_line, fmt, load_average, machine_info, machine_line, matmul_throughput
from mrisynth.dataset import assemble_input
from mrisynth.modalities import MODALITIES
from mrisynth.models import build_model, kl_divergence

DEFAULT_MODELS = (SEED_MODEL, "lite_vae_unet")
COLLAPSED_STD = 1e-4  # mean posterior-sample spread below this: sampling does not change the output


# --- speed -----------------------------------------------------------------------------------------


@dataclass
class Contender:
    """A model under test and how its input is laid out."""

    label: str
    model: nn.Module
    channels_last_input: bool = False
    times: list[float] = field(default_factory=list)


def count_macs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass on ``x`` (FlopCounterMode counts 2 flops per MAC)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 2


def volume_seconds(model: nn.Module, volume: torch.Tensor, batch: int) -> float:
    """Network time for all slices of ``volume`` in batches of ``batch``."""
    with torch.inference_mode():
        start = time.perf_counter()
        for i in range(0, len(volume), batch):
            model(volume[i : i + batch])
        return time.perf_counter() - start


def speed_table(args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    volume = torch.rand(args.slices, args.in_channels, args.height, args.width)
    contenders = [Contender(name, build_model(name, args.in_channels).eval()) for name in args.models]
    if args.layout_baseline:
        contenders.append(Contender(f"{SEED_MODEL}, channels-last input", build_model(SEED_MODEL, args.in_channels).eval(), True))
    volume_cl = volume.contiguous(memory_format=torch.channels_last)

    peaks = []
    # warm-up on both batch shapes of a volume (full batches and the remainder): oneDNN builds
    # its kernels on a shape's first call, a one-off cost per process that is not network time
    warm = [n for n in {args.batch, args.slices % args.batch} if n]
    for c in contenders:
        for n in warm:
            volume_seconds(c.model, (volume_cl if c.channels_last_input else volume)[:n], args.batch)
    for _ in range(args.repeats):
        peaks.append(matmul_throughput()["gflops_median"])
        for c in contenders:
            c.times.append(volume_seconds(c.model, volume_cl if c.channels_last_input else volume, args.batch))
    peak = statistics.median(peaks)

    seed_time = statistics.median(contenders[0].times) if contenders[0].label == SEED_MODEL else None
    lines = [
        "| model | params | MMAC/slice | s/volume (median) | speed-up vs vae_unet | GFLOP/s | % of matmul peak | all runs (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in contenders:
        params = sum(p.numel() for p in c.model.parameters())
        macs = count_macs(c.model, volume[:1])
        seconds = statistics.median(c.times)
        gflops = 2 * macs * args.slices / seconds / 1e9
        speedup = seed_time / seconds if seed_time else None
        runs = ", ".join(f"{t:.2f}" for t in c.times)
        lines.append(
            f"| {c.label} | {params / 1e6:.2f} M | {macs / 1e6:,.0f} | {seconds:.2f} | {fmt(speedup, 2, 'x')} "
            f"| {gflops:.0f} | {100 * gflops / peak:.0f} % | {runs} |"
        )
    lines.append("")
    if seed_time:
        for c in contenders[1:]:
            pairs = ", ".join(f"{a / b:.1f}x" for a, b in zip(contenders[0].times, c.times))
            lines.append(f"Speed-up of {c.label} within each repeat (same moment, same load): {pairs}.")
        lines.append("")
    lines.append(
        f"Workload: {args.slices} slices of {args.height}x{args.width}, {args.in_channels} input channels, batch {args.batch}, "
        f"fp32, {args.threads} threads, inference mode, median of {args.repeats} interleaved repeats. "
        f"Matmul peak (torch.mm 2048x2048, median of per-repeat medians): {peak:.0f} GFLOP/s "
        f"(per repeat: {', '.join(f'{p:.0f}' for p in peaks)})."
    )
    return "\n".join(lines)


# --- sanity fit ------------------------------------------------------------------------------------


def _smooth_field(n: int, size: int, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian-filtered white noise with unit standard deviation per sample, periodic borders."""
    noise = torch.randn(n, 1, size, size, generator=gen)
    radius = int(3 * sigma)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.conv2d(F.pad(noise, (radius, radius, 0, 0), mode="circular"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="circular"), kernel.view(1, 1, -1, 1))
    return out / out.flatten(1).std(dim=1).view(-1, 1, 1, 1)


def unpredictable_region(size: int) -> torch.Tensor:
    """[size, size] mask of the block where FLAIR carries a term no other modality shows."""
    region = torch.zeros(size, size, dtype=torch.bool)
    region[size // 4 : 3 * size // 4, size // 2 :] = True
    return region


def structured_stack(n: int, size: int, seed: int) -> torch.Tensor:
    """Four related 'modalities' [n, 4, size, size] in [0, 1]: nonlinear functions of shared fields.

    Each one is predictable from the other three, partly through context (a 9x9 local mean), so a
    network needs a receptive field, not only a per-pixel map, and must know which one is missing.
    Except in ``unpredictable_region``, where FLAIR also carries a field that no other modality
    shows: there a missing FLAIR is truly uncertain, and posterior samples should spread more.
    """
    gen = torch.Generator().manual_seed(seed)
    a, b, c = (_smooth_field(n, size, s, gen) for s in (3.0, 6.0, 1.5))
    lesion = torch.sigmoid(4 * (_smooth_field(n, size, 5.0, gen) - 1.5))
    context = F.avg_pool2d(a, 9, stride=1, padding=4, count_include_pad=False)
    t1 = torch.sigmoid(1.5 * a + 0.3 * c) - 0.3 * lesion
    t1ce = torch.sigmoid(1.5 * a + 0.3 * c) + 0.4 * lesion * torch.sigmoid(3 * b)
    t2 = torch.sigmoid(-1.2 * a + 0.8 * b) + 0.3 * lesion
    flair = 0.8 * torch.sigmoid(-a + 0.5 * b + context) * (1 + 0.5 * lesion)
    flair = flair + 0.15 * _smooth_field(n, size, 1.5, gen) * unpredictable_region(size)
    stack = torch.cat([t1, t1ce, t2, flair], dim=1)
    return (stack - stack.amin()) / (stack.amax() - stack.amin())


@dataclass
class FitState:
    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    seconds: float = 0.0
    steps: int = 0
    losses: list[float] = field(default_factory=list)


def _evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, flair_missing: torch.Tensor, draws: int = 8
) -> dict[str, float]:
    """Held-out L1 of the mean prediction (z = mu); spread of ``draws`` posterior samples (eval
    mode): its mean, its correlation with the error, and, on the samples whose FLAIR is missing,
    its mean inside the unpredictable region over its mean elsewhere."""
    model.eval()
    with torch.no_grad():
        pred = model(x)[0]
        samples = torch.stack([model(x, sample=True)[0] for _ in range(draws)])
    model.train()
    std = samples.std(dim=0)
    flat_std, error = std.flatten(), (pred - y).abs().flatten()
    corr = torch.corrcoef(torch.stack([flat_std, error]))[0, 1].item() if flat_std.max() > 0 else float("nan")
    region = unpredictable_region(x.shape[-1]).expand_as(std[flair_missing])
    inside, outside = std[flair_missing][region].mean().item(), std[flair_missing][~region].mean().item()
    return {
        "l1": F.l1_loss(pred, y).item(), "std": flat_std.mean().item(), "corr": corr,
        "region_ratio": inside / outside if outside > 0 else float("nan"),
    }


def _missing(drawn: torch.Tensor, target: str) -> torch.Tensor:
    """The missing-modality indices: ``drawn`` in "any" mode, the fixed target's index otherwise."""
    return drawn if target == "any" else torch.full_like(drawn, MODALITIES.index(target))


def sanity_fit(args: argparse.Namespace, target: str) -> str:
    torch.manual_seed(0)
    train, test = structured_stack(64, args.fit_size, seed=1), structured_stack(32, args.fit_size, seed=2)
    missing_test = _missing(torch.arange(32) % 4, target)
    x_test, y_test = assemble_input(test, missing_test, target)
    flair_missing = missing_test == MODALITIES.index("flair")
    states = []
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, args.in_channels).train()
        states.append(FitState(name, model, torch.optim.Adam(model.parameters(), lr=1e-3)))

    gen = torch.Generator().manual_seed(3)
    while min(s.seconds for s in states) < args.fit:
        index = torch.randint(0, len(train), (8,), generator=gen)
        x, y = assemble_input(train[index], _missing(torch.randint(0, 4, (8,), generator=gen), target), target)
        for s in states:  # every model sees the same batches, in turn
            if s.seconds >= args.fit:
                continue
            start = time.perf_counter()
            pred, mu, logvar = s.model(x)
            l1 = F.l1_loss(pred, y)
            loss = l1 + 1e-4 * kl_divergence(mu, logvar)
            s.optimizer.zero_grad()
            loss.backward()
            s.optimizer.step()
            s.seconds += time.perf_counter() - start
            s.steps += 1
            s.losses.append(l1.item())

    lines = [
        f"| model | steps in {args.fit:.0f} s | steps/s | train L1 (last 10 steps) | held-out L1 | "
        "posterior-sample std (mean) | corr(std, abs error) | std in unpredictable region / elsewhere |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in states:
        ev = _evaluate(s.model, x_test, y_test, flair_missing)
        collapsed = ev["std"] < COLLAPSED_STD  # ratios of rounding noise mean nothing
        corr = "– (collapsed)" if collapsed else f"{ev['corr']:.2f}"
        region = "– (collapsed)" if collapsed else f"{ev['region_ratio']:.2f}"
        lines.append(
            f"| {s.label} | {s.steps} | {s.steps / s.seconds:.2f} | {statistics.mean(s.losses[-10:]):.4f} | {ev['l1']:.4f} "
            f"| {ev['std']:.1e} | {corr} | {region} |"
        )
    lines.append("")
    lines.append(
        f"Sanity fit: {args.fit_size}x{args.fit_size}, 64 training and 32 held-out samples, target mode '{target}', "
        "batch 8, Adam lr 1e-3, L1 + 1e-4 KL, same CPU seconds per model (interleaved). Std: 8 posterior "
        "draws in eval mode on the held-out set; the region ratio on its FLAIR-missing samples "
        "(FLAIR carries a term no input shows in that region)."
    )
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="registered models; the first is the reference")
    p.add_argument("--in-channels", type=int, default=8, help="8 = 'any' mode (default), 3 = fixed target")
    p.add_argument("--slices", type=int, default=140)
    p.add_argument("--height", type=int, default=160)
    p.add_argument("--width", type=int, default=176)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats per model (median reported)")
    p.add_argument("--layout-baseline", action="store_true", help="also time vae_unet fed a channels-last input")
    p.add_argument("--fit", type=float, default=0.0, metavar="SECONDS", help="sanity fit: CPU seconds per model (0: skip)")
    p.add_argument("--fit-size", type=int, default=64)
    p.add_argument("--skip-speed", action="store_true", help="only the sanity fit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"`{command_line('model_speed.py', argv)}`\n")
    print(machine_line(machine_info(args.threads)) + "\n")
    sections: list[tuple[str, Callable[[], str]]] = []
    if not args.skip_speed:
        sections.append(("Network time per volume", lambda: speed_table(args)))
    if args.fit > 0:
        target = "any" if args.in_channels == 8 else "flair"
        sections.append(("Sanity fit (same CPU seconds per model)", lambda: sanity_fit(args, target)))
    for title, build in sections:
        print(f"### {title}\n\n{build()}\n", flush=True)
    print(f"Load average at the end: {load_average()}.")


if __name__ == "__main__":
    main()
