"""Helpers shared by the benchmark scripts: where the data is, what machine ran, how it was invoked.

Why one module: every published figure must say the exact command, the commit and the machine it
came from, and every script must refuse to write next to the (read-only) data. Doing that once
keeps the scripts' headers identical and their safety checks the same.

The scripts are run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path`` and they
import this file as ``_common``.
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ROOT = REPO_ROOT.parent / "shared"  # shared with other developers and CI: never written to
DEFAULT_DATA = SHARED_ROOT / "data" / "brats18"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"  # git-ignored: checkpoints, predictions, raw logs
PUBLISH_DIR = REPO_ROOT / "docs" / "results"  # small files (Markdown, CSV, JSON) meant to be committed

#: the founding prototype's model: every ratio is taken against it (one model per target, its recipe)
SEED_MODEL = "vae_unet"
SEED_ID = f"{SEED_MODEL}:fixed"

#: the trivial baseline: the available modality that looks most like the target
from mrisynth.baselines import MOST_SIMILAR  # noqa: E402  (one table, shared with the demo)


# --- contenders ----------------------------------------------------------------------------------

BASELINES = ("copy", "voxel-regression")


@dataclass(frozen=True)
class Contender:
    """One way to get the missing sequence. Its ``id`` names it in every table, CSV and JSON.

    Networks come in two modes: ``fixed`` (one model per target, the seed's recipe) and ``any``
    (one model for all four targets, told which one is missing).
    """

    id: str
    kind: str  # "baseline" or "network"
    model: str | None = None
    mode: str | None = None  # "fixed" or "any" (networks only)

    @property
    def label(self) -> str:
        if self.kind == "baseline":
            return self.id
        return f"{self.model} ({'one model per target' if self.mode == 'fixed' else 'one any-target model'})"

    def train_target(self, target: str) -> str:
        """The ``target`` setting its training run gets."""
        return "any" if self.mode == "any" else target


def network_contender(model: str, fixed_target_new: bool = False) -> Contender:
    """The seed trains one model per target (its recipe); newer models one model for all targets,
    unless ``fixed_target_new``."""
    mode = "fixed" if model == SEED_MODEL or fixed_target_new else "any"
    return Contender(f"{model}:{mode}", "network", model, mode)


def all_contenders(models: Sequence[str], fixed_target_new: bool = False, baselines: Sequence[str] = BASELINES) -> list[Contender]:
    """Baselines first, then the seed, then the other models in registry order."""
    ordered = sorted(models, key=lambda m: (m != SEED_MODEL, m))
    return [Contender(b, "baseline") for b in baselines] + [network_contender(m, fixed_target_new) for m in ordered]


def check_models(models: Sequence[str]) -> list[str]:
    """Registered model names, or exit naming the ones that are not."""
    from mrisynth.models import available_models

    known = available_models()
    unknown = [m for m in models if m not in known]
    if unknown:
        sys.exit(f"unknown model(s) {', '.join(unknown)}. Available: {', '.join(known)}")
    return list(models)


# --- how the run was invoked, where, and on what -------------------------------------------------


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command as a user would retype it from the repository root."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", f"benchmarks/{script}", *args])


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cpus() -> int:
    """CPUs this process may run on (what ``nproc`` prints), which can be fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def git_commit() -> dict[str, Any]:
    """Short commit of the repository and whether the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def machine_info(threads: int | None) -> dict[str, Any]:
    """Everything about the machine and the software that a timing depends on."""
    import numpy as np
    import torch

    return {
        "nproc": usable_cpus(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "load_average_1min": load_average(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_line(info: dict[str, Any]) -> str:
    """One Markdown line describing the machine."""
    return (
        f"nproc {info['nproc']} (of {info['cpu_count']} CPUs), {info['cpu_model']}, torch {info['torch']} with "
        f"{info['torch_threads']} threads, Python {info['python']}; load average {info['load_average_1min']} at the start "
        "(the machine is shared: timings are noisy, compare rows of one run as ratios)"
    )


def commit_line(commit: dict[str, Any]) -> str:
    return f"{commit['commit']}" + (" + uncommitted changes" if commit.get("dirty") else "")


def timestamp() -> str:
    """Local date and time for default folder names, e.g. ``20250101-1430``."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M")


# --- data and output folders ---------------------------------------------------------------------


def write_results(texts: dict[str, str], out: Path, name: str, started: str, publish: Path | None,
                  tag: str = "") -> list[Path]:
    """``out/NAME.EXT`` for each ``{EXT: text}``; with ``publish``, the same texts as
    ``publish/NAME[-TAG]-YYYYMMDD.EXT`` (the small files meant to be committed). Returns the paths."""
    written = []
    for ext, text in texts.items():
        path = out / f"{name}.{ext}"
        path.write_text(text)
        written.append(path)
    if publish is not None:
        publish.mkdir(parents=True, exist_ok=True)
        date = started[:10].replace("-", "")
        for ext, text in texts.items():
            path = publish / f"{name}{'-' + tag if tag else ''}-{date}.{ext}"
            path.write_text(text)
            written.append(path)
    return written


def print_summary(markdown_text: str, written: list[Path]) -> None:
    """The run's Markdown summary and the files it wrote, at the end of a benchmark."""
    print("\n===== summary (paste into docs/benchmarks.md) =====\n")
    print(markdown_text)
    print("\nwrote " + ", ".join(str(p) for p in written))


def complete_cases(root: Path, n: int | None = None) -> list:
    """The first ``n`` (all when None) cases under ``root`` with four modalities and no problems."""
    from mrisynth.cases import discover_cases

    cases = [c for c in discover_cases(root) if not c.missing and not c.problems]
    if n is not None:
        if len(cases) < n:
            sys.exit(f"{root}: expected {n} complete cases, found {len(cases)}")
        cases = cases[:n]
    if not cases:
        sys.exit(f"{root}: no case with all four modalities found")
    return cases


def refuse_inside(path: Path, data_root: Path, what: str) -> None:
    """Stop before writing anything under the data folder or the shared folder beside the repository.

    Why both: file permissions do not protect them from a process running as root (these
    machines run as root), so the check must be ours.
    """
    path = path.resolve()
    for protected in (data_root.resolve(), SHARED_ROOT.resolve()):
        if path == protected or protected in path.parents:
            sys.exit(f"{what} {path} lies inside {protected}, which must stay untouched: choose a folder elsewhere")


def use_cache_dir(cache_dir: Path | None, data_root: Path) -> Path:
    """Pin mrisynth's slice cache (``MRISYNTH_CACHE_DIR``) for this process and its children.

    ``None`` keeps mrisynth's default (``$MRISYNTH_CACHE_DIR`` or the user cache directory).
    Training reads the variable, so setting it here is what makes ``train()`` use this folder.
    """
    from mrisynth.cache import default_cache_dir

    chosen = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    refuse_inside(chosen, data_root, "the slice cache")
    os.environ["MRISYNTH_CACHE_DIR"] = str(chosen.resolve())
    return chosen.resolve()


# --- timings of one synthesized case ---------------------------------------------------------------

TIMING_KEYS = ("read_s", "preprocess_s", "compute_s", "restore_s", "write_s", "total_s")


def timing_row(case_id: str, timings: dict[str, float], write_s: float, total_s: float) -> dict[str, Any]:
    """Seconds per stage of one synthesized case, the same columns for networks and baselines.

    ``compute_s`` is the network's forward passes (``timings["network"]`` of mrisynth's
    ``SynthesisResult``) or a baseline's own computation (``timings["compute"]``).
    """
    seconds = {
        "read_s": timings.get("read", 0.0), "preprocess_s": timings.get("preprocess", 0.0),
        "compute_s": timings.get("network", timings.get("compute", 0.0)), "restore_s": timings.get("restore", 0.0),
        "write_s": write_s, "total_s": total_s,
    }
    return {"case": case_id, **{k: round(v, 4) for k, v in seconds.items()}}


# --- statistics ----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    """A number for a Markdown cell; '–' for a missing one."""
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def matmul_throughput(size: int = 2048, reps: int = 5, threads: int | None = None) -> dict:
    """This CPU's fp32 FLOP/s on a large matrix product: what a compute-bound network could reach.

    ``threads`` sets torch's thread count first (None keeps it). Two warm-up products, then the
    median and best of ``reps`` timed ones.
    """
    import time

    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    flops = 2 * size**3
    return {"size": size, "threads": torch.get_num_threads(), "reps": reps, "median_s": median(times),
            "gflops_median": flops / median(times) / 1e9, "gflops_best": flops / min(times) / 1e9}
