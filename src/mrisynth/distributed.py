"""Process-group helpers for training under ``torchrun``: one process per device, rank 0 writes.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every helper is a no-op, so the training loop has
one code path. Backends: ``nccl`` on CUDA, ``gloo`` on CPU (what the tests use).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a usage error."""
    if choice not in DEVICE_CHOICES:
        raise UsageError(f"unknown device '{choice}'. Valid: {', '.join(DEVICE_CHOICES)}")
    if choice == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UsageError(f"--device cuda: no CUDA device is available (torch {torch.__version__}, {built})")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(device_choice: str) -> DistEnv:
    """Read torchrun's environment, pick the device and join the process group when there are several."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup(env: DistEnv) -> None:
    """Leave the process group (torch warns at exit otherwise)."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum over all processes (float64, so counts of pixels stay exact)."""
    if not env.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """One picklable object per rank, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


@contextmanager
def local_main_first(env: DistEnv) -> Iterator[None]:
    """The first process of each machine runs the block first (e.g. building the slice cache on its
    disk), then the others reuse its work. Every rank reaches the one barrier, even after an error."""
    first = env.local_rank == 0
    if env.distributed and not first:
        dist.barrier()
    try:
        yield
    finally:
        if env.distributed and first:
            dist.barrier()
