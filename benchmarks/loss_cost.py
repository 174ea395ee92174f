"""What each optional loss term costs per training step on this CPU.

Why: the benchmark compares recipes at a fixed wall-clock budget, so a term that slows the step
buys fewer steps. This times one optimizer step of ``lite_vae_unet`` (forward, loss, backward,
Adam) at the recipe's batch and crop with L1 alone and with each extra term, on random tensors
(the network's cost does not depend on the values). torchmetrics' SSIM (a 2-D 11x11 window) is
timed beside ``train.ssim_loss`` (two 1-D passes) because the recipe's choice rests on the ratio.
Timings on shared machines swing: compare rows of one run.

    python benchmarks/loss_cost.py --steps 10 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from _common import commit_line, git_commit, machine_info, machine_line
from mrisynth.dataset import in_channels_for
from mrisynth.models import build_model
from mrisynth.train import histogram_l1, ssim_loss

Term = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

TERMS: dict[str, Term | None] = {
    "L1 only": None,
    "+ mse_weight (squared error)": F.mse_loss,
    "+ histogram_weight (sorted values)": histogram_l1,
    "+ ssim_weight (train.ssim_loss, two 1-D passes)": ssim_loss,
    "+ SSIM, torchmetrics 2-D window (not used)": lambda p, t: 1 - structural_similarity_index_measure(p, t, data_range=1.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per term (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per term (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="default 8, the recipe's")
    p.add_argument("--crop", type=int, default=160)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def time_steps(term: Term | None, args: argparse.Namespace) -> float:
    """Median seconds of one optimizer step with L1 (+ term)."""
    torch.manual_seed(0)
    net = build_model("lite_vae_unet", in_channels=in_channels_for("any"))
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-4)
    inputs = torch.rand(args.batch_size, in_channels_for("any"), args.crop, args.crop)
    target = torch.rand(args.batch_size, 1, args.crop, args.crop)
    seconds = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        pred = net(inputs)[0][:, :1]
        loss = F.l1_loss(pred, target) + (term(pred, target) if term else 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line(machine_info(args.threads)))
    print(commit_line(git_commit()))
    print(f"lite_vae_unet, batch {args.batch_size}, crop {args.crop}, median of {args.steps} steps\n")
    print("| loss | s/step | vs L1 only |\n|---|---:|---:|")
    base = None
    for name, term in TERMS.items():
        seconds = time_steps(term, args)
        base = base or seconds
        print(f"| {name} | {seconds:.3f} | {seconds / base:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
