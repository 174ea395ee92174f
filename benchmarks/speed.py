"""Speed benchmark: loading, training and synthesis of every contender in one run, as ratios to the seed.

Why one command: on shared machines a timing swings 2-5x with the neighbours' load, so a number
means something only next to the seed's, measured in the same run on the same case. Sections:

1. **Data loading**: training slices per second the seed's way (three NIfTI volumes decoded and
   normalised for every slice) against mrisynth's slice cache (``loader_speed.py``'s functions).
2. **Training on CPU**: slices per second per network (loader + forward + loss + backward + Adam,
   crop 160x160, untrained weights) at batch 4, 8, 16, 32; a model stops growing its batch once a
   step takes more than ``--max-step-s`` or memory fails. Peak resident memory per measurement.
3. **Synthesis on CPU**: seconds for one whole 240x240x155 case, end to end (read, preprocess,
   compute, restore, write NIfTI) and compute alone (the network's forward passes; the baselines'
   own computation), for every contender including ``copy`` and ``voxel-regression``; peak
   resident memory. Contenders take turns (round robin) so a load swing hits all of them. Every
   network that exports to ONNX also runs with ONNX Runtime (``--engine onnx``; ``--no-onnx``
   leaves that out), with its ratio to eager PyTorch.
4. **Compute-bound floor**: each network's multiply-accumulates per volume (counted with
   ``torch.utils.flop_counter.FlopCounterMode`` on one slice at the case's window, times its brain
   slices) divided by this CPU's measured fp32 matrix-multiply throughput (``torch.mm`` of 2048x2048,
   median): the least time the network could take here, and how close it runs to it.
5. **GPU** (``--gpu``): synthesis and training figures on the first CUDA device in under five
   minutes; skipped with a message when CUDA is absent.

Every measurement of sections 2, 3 and 5 runs in a fresh Python process (this script with
``--worker``), so its peak resident memory (``VmHWM``; see :func:`peak_rss_mib` for why not
``ru_maxrss``) is that model's alone, and an out-of-memory kill costs one row, not the run.
Networks are timed with untrained weights: the arithmetic, hence the time, is a trained model's.

Usage, from the repository root::

    .venv/bin/python benchmarks/speed.py --publish   # about 10 min on a quiet 2-core CPU
    .venv/bin/python benchmarks/speed.py --quick     # smoke test, a couple of minutes
    .venv/bin/python benchmarks/speed.py --gpu       # adds the GPU section when CUDA is there

Outputs: the Markdown summary is printed and written with a JSON of everything to ``--out``
(default ``benchmarks/results/speed-<date>-<time>``, git-ignored); ``--publish [DIR]`` copies both
to DIR (default ``docs/results``) as ``speed-<date>.{md,json}``. The slice cache is
``--cache-dir`` (default ``$MRISYNTH_CACHE_DIR`` or the user cache); nothing is written under ``--data``.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from _common import (
    BASELINES, DEFAULT_DATA, PUBLISH_DIR, RESULTS_DIR, SEED_ID, SEED_MODEL, Contender, all_contenders, check_models,
    command_line, commit_line, complete_cases, fmt, git_commit, load_average, machine_info, machine_line, matmul_throughput,
    median, print_summary, ratio, refuse_inside, timestamp, timing_row, use_cache_dir, write_results,
)

RESULT_PREFIX = "SPEED-RESULT "
CROP = 160
GPU_BATCHES = (4, 8, 16, 32, 64, 128)


# --- options -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Speed of every contender (loading, training, synthesis, compute floor) in one run. "
                    "Defaults take about 10 minutes on a 2-core CPU; --quick about 2.",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="root of BraTS cases, read only (default ../shared/data/brats18)")
    p.add_argument("--case", type=Path, default=None, help="case folder to synthesize (default: the first complete case)")
    p.add_argument("--target", default="flair", help="the modality synthesized (default flair)")
    p.add_argument("--models", nargs="*", default=None, help="registered models (default: all; the option alone: none)")
    p.add_argument("--fixed-target-new", action="store_true",
                   help=f"time newer models (not {SEED_MODEL}) as fixed-target models instead of any-target ones")
    p.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES),
                   help="non-network contenders (default: both; the option alone: none)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and scikit-learn in every measurement (default 2)")
    p.add_argument("--runs", type=int, default=3, help="synthesis runs per contender, median reported (default 3)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32], help="CPU training batch sizes to try (default 4 8 16 32)")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per batch size (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps before those (default 2)")
    p.add_argument("--max-step-s", type=float, default=30.0,
                   help="stop growing a model's batch once its median step takes longer than this (default 30 s)")
    p.add_argument("--train-cases", type=int, default=4, help="cases whose cached slices feed training and loading (default 4)")
    p.add_argument("--seed-slices", type=int, default=10, help="slices loaded the seed's way, about 1 s each (default 10)")
    p.add_argument("--cache-slices", type=int, default=2000, help="slices loaded from the cache (default 2000)")
    p.add_argument("--mm-size", type=int, default=2048, help="matrix size of the fp32 throughput reference (default 2048)")
    p.add_argument("--mm-reps", type=int, default=10, help="timed matrix multiplies, median reported (default 10)")
    p.add_argument("--voxels", type=int, default=50_000,
                   help="voxels voxel-regression is fitted on before timing; it always grows its 200 trees (default 50000)")
    p.add_argument("--batch-size", type=int, default=16, help="slices per network pass when synthesizing (default 16)")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=None,
                   help="also synthesize with ONNX Runtime (--engine onnx) every network that exports "
                        "(default: when onnxruntime and onnxscript are installed)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 synthesis run, batches 4 and 8, few steps and slices")
    p.add_argument("--gpu", action="store_true", help="add the GPU section (skipped with a message when CUDA is absent)")
    p.add_argument("--gpu-minutes", type=float, default=4.5, help="time limit of the GPU section (default 4.5)")
    p.add_argument("--out", type=Path, default=None,
                   help="work folder (default benchmarks/results/speed-<date>-<time>, ignored by git)")
    p.add_argument("--publish", nargs="?", type=Path, const=PUBLISH_DIR, default=None, metavar="DIR",
                   help="also copy the Markdown and JSON to DIR (the option alone: docs/results)")
    p.add_argument("--cache-dir", type=Path, default=None, help="slice cache (default: $MRISYNTH_CACHE_DIR or the user cache)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.batch_sizes, args.train_steps, args.warmup = 1, [4, 8], 2, 1
        args.train_cases, args.seed_slices, args.cache_slices, args.mm_reps, args.voxels = 2, 2, 200, 3, 5_000
    args.out = args.out or RESULTS_DIR / f"speed-{timestamp()}"
    return args


# --- measurements inside a worker process ----------------------------------------------------------


def proc_status_mib(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident memory, in MiB.

    Why not only ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the high-water mark across
    ``fork`` + ``exec``, so a worker started by a parent holding 700 MiB reports at least 700 MiB
    whatever it does (checked here: a 14 MiB child of a 500 MiB parent reports 514 MiB). ``VmHWM``
    belongs to the worker's own address space, which ``exec`` starts afresh. ``ru_maxrss`` is
    the fallback where /proc is absent.
    """
    hwm = proc_status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float | None:
    return proc_status_mib("VmRSS")


def forward_flops(model: torch.nn.Module, in_channels: int, height: int, width: int, device: torch.device) -> int:
    """FLOPs (2 per multiply-accumulate) of one slice through the network in eval mode.

    FlopCounterMode counts matrix products and convolutions (transposed ones too): the arithmetic
    that bounds the time; normalisations and activations are memory-bound extras it leaves out.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    x = torch.zeros(1, in_channels, height, width, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def train_flops_per_slice(model: torch.nn.Module, in_channels: int, crop: int) -> int:
    """FLOPs of forward + backward per training slice (batch of 2, halved; BatchNorm wants 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    x = torch.rand(2, in_channels, crop, crop)
    with FlopCounterMode(display=False) as counter:
        pred, mu, logvar = model(x)
        (pred.mean() + mu.pow(2).mean() + logvar.mean()).backward()
    return int(counter.get_total_flops()) // 2


def worker_synth(task: dict) -> dict:
    """Synthesize one case ``task['runs']`` times with one contender, writing NIfTI like ``mrisynth predict``."""
    from mrisynth.cases import find_case
    from mrisynth.dataset import in_channels_for
    from mrisynth.predict import Synthesizer, write_result

    torch.set_num_threads(task["threads"])
    idle = current_rss_mib()
    case, target, out = find_case(task["case"]), task["target"], Path(task["out"])
    device = torch.device(task["device"])
    synthesizer = None
    if task["kind"] == "network":
        synthesizer = Synthesizer.from_checkpoint(task["checkpoint"], device=task["device"], threads=task["threads"],
                                                  engine=task.get("engine"))
        in_channels = in_channels_for(synthesizer.target)
        with torch.inference_mode():  # first-call set-up (thread pool, allocator) is not what we time
            synthesizer.model(torch.zeros(2, in_channels, CROP, CROP, device=device))
        predict: Callable[[], Any] = lambda: synthesizer.predict(case, missing=target, batch_size=task["batch_size"])
    elif task["contender"] == "copy":
        from baselines import copy_predict

        predict = lambda: copy_predict(case, target)
    else:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=task["threads"])
        with open(task["regressor"], "rb") as handle:
            regression = pickle.load(handle)  # our own object, written by the parent process of this run
        predict = lambda: regression.predict(case)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(task["runs"]):
        start = time.perf_counter()
        result = predict()
        written = time.perf_counter()
        write_result(result, out, overwrite=True)
        done = time.perf_counter()
        runs.append(timing_row(case.id, result.timings, done - written, done - start))
    answer: dict[str, Any] = {"runs": runs, "peak_rss_mib": peak_rss_mib(), "idle_rss_mib": idle}
    if synthesizer is not None:
        answer.update(n_slices=result.n_slices, window=list(result.window))
        if device.type == "cuda":
            answer["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        if task.get("count_flops") and task.get("engine") != "onnx":
            per_slice = forward_flops(synthesizer.model, in_channels, *result.window, device)
            answer.update(forward_flops_per_slice=per_slice, forward_flops_per_volume=per_slice * result.n_slices)
    return answer


def worker_train(task: dict) -> dict:
    """Training throughput of one model at each batch size in turn (``train_speed.py``'s timing loop)."""
    from mrisynth.cache import load_cached_case
    from mrisynth.cases import find_case
    from mrisynth.dataset import in_channels_for
    from mrisynth.distributed import DistEnv
    from mrisynth.preprocess import PreprocessConfig
    from mrisynth.train import Trainer, configure_determinism, resolve_config
    from train_speed import time_cached_loader

    torch.set_num_threads(task["threads"])
    idle = current_rss_mib()
    device = torch.device(task["device"])
    configure_determinism(False, device)
    base = resolve_config({"model": task["model"], "target": task["train_target"], "device": task["device"], "crop": CROP})
    cached = [load_cached_case(find_case(path), PreprocessConfig.from_dict(base["preprocess"])) for path in task["cases"]]
    deadline = time.monotonic() + task.get("budget_s", math.inf)
    rows: list[dict[str, Any]] = []
    parameters = None
    for batch in task["batch_sizes"]:
        if time.monotonic() > deadline:
            rows.append({"batch": batch, "error": "skipped: time limit of the section reached"})
            break
        needed = (task["warmup"] + task["steps"]) * batch  # one epoch long enough for every timed step
        config = {**base, "batch_size": batch, "slices_per_epoch": needed}
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            trainer = Trainer(config, DistEnv(device=device), cached, cached[:1])
            parameters = sum(p.numel() for p in trainer.net.parameters())
            load_s, step_s = time_cached_loader(trainer, task["steps"], task["warmup"])
        except (RuntimeError, MemoryError) as exc:  # out of memory (torch raises RuntimeError subclasses)
            rows.append({"batch": batch, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
            break
        per_step = [a + b for a, b in zip(load_s, step_s)]
        row = {"batch": batch, "median_step_s": median(per_step), "median_loader_s": median(load_s),
               "slices_per_s": batch / median(per_step), "step_s": per_step}
        if device.type == "cuda":
            row["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
        del trainer
        if row["median_step_s"] > task["max_step_s"]:
            break
    answer: dict[str, Any] = {"batches": rows, "parameters": parameters, "peak_rss_mib": peak_rss_mib(), "idle_rss_mib": idle}
    if task.get("count_flops"):
        from mrisynth.models import build_model

        model = build_model(task["model"], in_channels_for(task["train_target"]))
        answer["train_flops_per_slice"] = train_flops_per_slice(model, in_channels_for(task["train_target"]), CROP)
    return answer


WORKERS: dict[str, Callable[[dict], dict]] = {"synth": worker_synth, "train": worker_train}


def worker_main(task_json: str) -> int:
    """Run one measurement and print its result as one JSON line (errors included, for the table)."""
    task = json.loads(task_json)
    try:
        result = WORKERS[task["task"]](task)
    except Exception as exc:  # reported in the table as this row's error; the run goes on
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def run_worker(task: dict, timeout_s: float = 1800) -> dict:
    """One measurement in a fresh Python process; its peak memory is its own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    how = f"killed by signal {-done.returncode} (9: probably out of memory)" if done.returncode < 0 else f"exit code {done.returncode}"
    tail = " | ".join(done.stderr.strip().splitlines()[-3:])
    return {"error": f"worker {how}: {tail[:300]}"}


# --- measurements in the main process --------------------------------------------------------------


def measure_loading(cases: list, n_seed: int, n_cache: int) -> dict:
    """Median seconds per training slice: the seed's per-slice NIfTI reading against the slice cache."""
    from mrisynth.cache import load_cached_case
    from mrisynth.dataset import SliceDataset
    from mrisynth.preprocess import PreprocessConfig

    from loader_speed import seed_slice

    rng = np.random.default_rng(0)
    cached = [load_cached_case(c, PreprocessConfig()) for c in cases]
    dataset = SliceDataset(cached, "any", crop=CROP, train=True, seed=0)
    dataset[0]  # first touch of the memory map
    cache_times = []
    for i in rng.integers(len(dataset), size=n_cache):
        start = time.perf_counter()
        dataset[int(i)]
        cache_times.append(time.perf_counter() - start)
    seed_times = []
    for _ in range(n_seed):
        k = int(rng.integers(len(cases)))
        z = int(rng.choice(cached[k].meta["brain_slices"]))
        start = time.perf_counter()
        seed_slice(cases[k], z)
        seed_times.append(time.perf_counter() - start)
    return {"seed": {"slices": n_seed, "median_s": median(seed_times)},
            "cache": {"slices": n_cache, "median_s": median(cache_times)}}


def prepare_contenders(contenders: list[Contender], args: argparse.Namespace, train_cases: list) -> dict[str, dict]:
    """Untrained checkpoints for the networks; a fitted, pickled voxel-regression."""
    from predict_speed import untrained_checkpoint

    prepared: dict[str, dict] = {}
    folder = args.out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for c in contenders:
        if c.kind == "network":
            prepared[c.id] = {"checkpoint": str(untrained_checkpoint(folder, c.train_target(args.target), c.model))}
        elif c.id == "voxel-regression":
            from threadpoolctl import threadpool_limits

            from baselines import VoxelRegression

            regression = VoxelRegression(args.target, n_voxels=args.voxels, early_stopping=False)
            with threadpool_limits(limits=args.threads):
                fit = regression.fit(train_cases)
            path = args.out / "voxel-regression.pkl"
            path.write_bytes(pickle.dumps(regression))
            prepared[c.id] = {"regressor": str(path), "fit": fit, "settings": regression.settings()}
        else:
            prepared[c.id] = {}
    return prepared


ONNX_SUFFIX = "+onnx"


def onnx_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript", "onnx"))


def add_onnx_contenders(contenders: list[Contender], prepared: dict[str, dict], out: Path) -> tuple[list[Contender], dict[str, str]]:
    """For every network that exports to ONNX, a synthesis-only contender running it with --engine onnx."""
    from mrisynth.errors import MrisynthError
    from mrisynth.onnx_engine import export_onnx

    extra, problems = [], {}
    for c in contenders:
        if c.kind != "network":
            continue
        checkpoint = prepared[c.id]["checkpoint"]
        try:
            onnx_path = export_onnx(checkpoint, Path(checkpoint).with_suffix(".onnx"), overwrite=True)
        except MrisynthError as exc:
            problems[c.id] = str(exc)
            print(f"  {c.id}: not exported to ONNX: {exc}", flush=True)
            continue
        onnx_id = c.id + ONNX_SUFFIX
        extra.append(Contender(onnx_id, "network", c.model, c.mode))
        prepared[onnx_id] = {"checkpoint": str(onnx_path), "engine": "onnx"}
    return extra, problems


def onnx_lines(synthesis: dict, labels: dict[str, str], problems: dict[str, str]) -> list[str]:
    """ONNX Runtime against eager PyTorch, the same model in the same run."""
    lines = []
    for cid, entry in synthesis.items():
        if not cid.endswith(ONNX_SUFFIX):
            continue
        eager = synthesis.get(cid[: -len(ONNX_SUFFIX)], {})
        lines.append(
            f"- {labels[cid[: -len(ONNX_SUFFIX)]]}: ONNX Runtime is {times(ratio(eager.get('median_compute_s'), entry.get('median_compute_s')))} "
            f"eager PyTorch's speed in compute, {times(ratio(eager.get('median_total_s'), entry.get('median_total_s')))} end to end."
        )
    for cid, problem in problems.items():
        lines.append(f"- {labels[cid]}: no ONNX row: {problem}")
    return lines


def measure_training(contenders: list[Contender], args: argparse.Namespace, case_dirs: list[str], device: str,
                     batch_sizes: list[int], budget_s: float = math.inf) -> dict[str, dict]:
    """Per network: slices/s at growing batch sizes, models taking turns at each size.

    On CPU each (model, batch) is its own process (an out-of-memory kill loses one row); on GPU one
    process per model walks the batch sizes (CUDA start-up is slow, and CUDA memory errors are clean).
    """
    networks = [c for c in contenders if c.kind == "network"]
    results: dict[str, dict] = {c.id: {"batches": []} for c in networks}
    deadline = time.monotonic() + budget_s
    base = {"task": "train", "threads": args.threads, "device": device, "cases": case_dirs, "steps": args.train_steps,
            "warmup": args.warmup, "max_step_s": args.max_step_s}
    if device == "cuda":
        for i, c in enumerate(networks):
            share = (deadline - time.monotonic()) / (len(networks) - i)  # what is left, split evenly
            print(f"  training {c.id} on the GPU (at most {share:.0f} s)", flush=True)
            task = {**base, "model": c.model, "train_target": c.train_target(args.target), "batch_sizes": batch_sizes,
                    "budget_s": share - 30}  # the worker starts no new batch size after this; 30 s for the last one
            results[c.id] = run_worker(task, timeout_s=share)
        return results
    active = list(networks)
    for batch in batch_sizes:
        for c in list(active):
            print(f"  training {c.id} at batch {batch}", flush=True)
            task = {**base, "model": c.model, "train_target": c.train_target(args.target), "batch_sizes": [batch],
                    "count_flops": batch == batch_sizes[0]}
            answer = run_worker(task)
            entry = results[c.id]
            entry["batches"] += answer.get("batches", [{"batch": batch, "error": answer.get("error")}])
            row = entry["batches"][-1]
            row["peak_rss_mib"] = answer.get("peak_rss_mib")
            for key in ("parameters", "train_flops_per_slice", "idle_rss_mib"):
                if answer.get(key) is not None:
                    entry[key] = answer[key]
            if "error" in row or row["median_step_s"] > args.max_step_s:
                active.remove(c)
    return results


def measure_synthesis(contenders: list[Contender], args: argparse.Namespace, prepared: dict, case_dir: str,
                      device: str, runs: int, per_process: int, budget_s: float = math.inf) -> dict[str, dict]:
    """Seconds per case for every contender; contenders take turns, ``per_process`` runs in each process."""
    results: dict[str, dict] = {c.id: {"runs": [], "errors": []} for c in contenders}
    deadline = time.monotonic() + budget_s
    for round_index in range(math.ceil(runs / per_process)):
        for c in contenders:
            if c.kind != "network" and device == "cuda":
                continue
            remaining = deadline - time.monotonic()
            if remaining < 20:
                results[c.id]["errors"].append("skipped: time limit of the section reached")
                continue
            print(f"  synthesizing with {c.id} ({device}, round {round_index + 1})", flush=True)
            task = {"task": "synth", "contender": c.id, "kind": c.kind, "target": args.target, "case": case_dir,
                    "threads": args.threads, "device": device, "batch_size": args.batch_size, "runs": per_process,
                    "out": str(args.out / "predictions" / device / c.id.replace(":", "-")),
                    "count_flops": round_index == 0 and device == "cpu", **prepared.get(c.id, {})}
            task = {k: v for k, v in task.items() if k not in ("fit", "settings")}
            answer = run_worker(task, timeout_s=min(remaining, 1800))
            entry = results[c.id]
            if "error" in answer:
                entry["errors"].append(answer["error"])
                continue
            entry["runs"] += answer.pop("runs")
            entry["peak_rss_mib"] = max(entry.get("peak_rss_mib", 0.0), answer.pop("peak_rss_mib"))
            entry.update(answer)
    for entry in results.values():
        for key in ("total_s", "compute_s", "read_s", "preprocess_s", "restore_s", "write_s"):
            entry[f"median_{key}"] = median([r[key] for r in entry["runs"]])
    return results


def compute_floor(synthesis: dict, training: dict, matmul: dict) -> dict[str, dict]:
    """Least seconds per volume (and most slices/s in training) at this CPU's matmul throughput."""
    peak = matmul["gflops_median"] * 1e9
    floor: dict[str, dict] = {}
    for cid, entry in synthesis.items():
        # an ONNX Runtime row does the arithmetic of its eager twin (FlopCounterMode counts torch ops only)
        flops = entry.get("forward_flops_per_volume") or synthesis.get(cid.removesuffix(ONNX_SUFFIX), {}).get("forward_flops_per_volume")
        if not flops:
            continue
        floor_s = flops / peak
        measured = entry.get("median_compute_s")
        row = {"gmac_per_volume": flops / 2e9, "floor_s": floor_s, "measured_compute_s": measured,
               "fraction_of_peak": ratio(floor_s, measured)}
        train = training.get(cid, {})
        train_flops = train.get("train_flops_per_slice")
        if train_flops:
            first = next((b for b in train.get("batches", []) if "slices_per_s" in b), None)
            row.update(train_gflop_per_slice=train_flops / 1e9, train_floor_slices_per_s=peak / train_flops,
                       train_measured_slices_per_s=first["slices_per_s"] if first else None,
                       train_batch=first["batch"] if first else None)
            row["train_fraction_of_peak"] = ratio(row["train_measured_slices_per_s"], row["train_floor_slices_per_s"])
        floor[cid] = row
    return floor


# --- report --------------------------------------------------------------------------------------


def mib(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def times(value: float | None) -> str:
    """A ratio with as many decimals as it deserves (2,972× but 1.30×)."""
    if value is None:
        return "–"
    return f"{value:,.0f}×" if value >= 100 else f"{value:.1f}×" if value >= 10 else f"{value:.2f}×"


def loading_table(loading: dict) -> list[str]:
    seed, cache = loading["seed"]["median_s"], loading["cache"]["median_s"]
    return [
        "| loader | slices timed | median ms/slice | slices/s | × seed |",
        "|---|---:|---:|---:|---:|",
        f"| seed: decode + normalise 3 NIfTI volumes per slice | {loading['seed']['slices']} | {seed * 1e3:,.0f} | {1 / seed:.2f} | 1.00× |",
        f"| mrisynth: memory-mapped slice cache (`SliceDataset`) | {loading['cache']['slices']} | {cache * 1e3:.3f} "
        f"| {1 / cache:,.0f} | {times(seed / cache)} |",
    ]


def training_table(training: dict, labels: dict[str, str]) -> list[str]:
    seed_row = next((b for b in training.get(SEED_ID, {}).get("batches", []) if b["batch"] == 4 and "slices_per_s" in b), None)
    seed_rate = seed_row["slices_per_s"] if seed_row else None
    lines = ["| model | parameters | batch | median s/step | slices/s | × seed at batch 4 | peak RSS MiB | GPU peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cid, entry in training.items():
        params = entry.get("parameters")
        if "error" in entry and not entry.get("batches"):
            lines.append(f"| {labels[cid]} | – | – | {entry['error']} | | | | |")
            continue
        for row in entry.get("batches", []):
            p = "–" if params is None else f"{params / 1e6:.2f} M"
            if "error" in row:
                lines.append(f"| {labels[cid]} | {p} | {row['batch']} | {row['error']} | | | {mib(row.get('peak_rss_mib'))} | |")
                continue
            lines.append(
                f"| {labels[cid]} | {p} | {row['batch']} | {row['median_step_s']:.3f} | {row['slices_per_s']:.2f} "
                f"| {times(ratio(row['slices_per_s'], seed_rate))} | {mib(row.get('peak_rss_mib', entry.get('peak_rss_mib')))} "
                f"| {mib(row.get('gpu_peak_mib'))} |"
            )
    return lines


def synthesis_table(synthesis: dict, labels: dict[str, str]) -> list[str]:
    seed = synthesis.get(SEED_ID, {})
    lines = ["| contender | runs | end-to-end s/case | compute s/case | × seed (end to end) | × seed (compute) | peak RSS MiB | GPU peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cid, entry in synthesis.items():
        if not entry["runs"]:
            lines.append(f"| {labels[cid]} | 0 | {'; '.join(entry['errors'])[:200]} | | | | | |")
            continue
        total, compute = entry["median_total_s"], entry["median_compute_s"]
        compute_ratio = ratio(seed.get("median_compute_s"), compute) if compute and compute >= 0.01 else None
        lines.append(
            f"| {labels[cid]} | {len(entry['runs'])} | {total:.2f} | {compute:.2f} | {times(ratio(seed.get('median_total_s'), total))} "
            f"| {times(compute_ratio)} | {mib(entry.get('peak_rss_mib'))} | {mib(entry.get('gpu_peak_mib'))} |"
        )
    return lines


def floor_table(floor: dict, labels: dict[str, str], matmul: dict) -> list[str]:
    lines = ["| model | GMAC/volume | floor s/volume | measured network s | share of peak | train GFLOP/slice "
             "| floor slices/s | measured slices/s (batch) | share of peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cid, row in floor.items():
        lines.append(
            f"| {labels[cid]} | {row['gmac_per_volume']:.1f} | {row['floor_s']:.2f} | {fmt(row['measured_compute_s'])} "
            f"| {percent(row['fraction_of_peak'])} | {fmt(row.get('train_gflop_per_slice'), 1)} "
            f"| {fmt(row.get('train_floor_slices_per_s'), 1)} | {fmt(row.get('train_measured_slices_per_s'), 2)} "
            f"({row.get('train_batch', '–')}) | {percent(row.get('train_fraction_of_peak'))} |"
        )
    return lines


def markdown(report: dict) -> str:
    labels = report["labels"]
    case = report["case"]
    matmul = report["matmul"]
    lines = [
        "### Speed: loading, training and synthesis, all contenders in one run",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: {commit_line(report['commit'])}; date {report['started']}; wall time {report['wall_s'] / 60:.1f} min "
        f"(load average {report.get('load_average_end')} at the end)  ",
        f"Machine: {machine_line(report['machine'])}  ",
        f"Case: {case['id']} (240×240×155), {case.get('n_slices', '?')} brain slices, window "
        f"{'×'.join(str(s) for s in case.get('window', []))}; target {report['target']}; networks with untrained weights.",
        "",
        "#### Data loading (training slices, 160×160 crop)",
        "",
        *loading_table(report["loading"]),
        "",
        f"#### Training on CPU (crop {CROP}×{CROP}; loader + forward + loss + backward + Adam; "
        f"median of {report['settings']['train_steps']} steps after {report['settings']['warmup']} warm-up)",
        "",
        *training_table(report["training"], labels),
        "",
        "#### Synthesis on CPU (one whole case; median of the runs; contenders took turns)",
        "",
        *synthesis_table(report["synthesis"], labels),
        "",
        *onnx_lines(report["synthesis"], labels, report.get("onnx_problems", {})),
        "",
        f"#### Compute-bound floor (fp32 `torch.mm` {matmul['size']}², {matmul['threads']} threads: "
        f"{matmul['gflops_median']:.1f} GFLOP/s median, {matmul['gflops_best']:.1f} best)",
        "",
        *floor_table(report["floor"], labels, matmul),
        "",
        "Compute = the network's forward passes (copy: picking the volume; voxel-regression: features + 200 boosting "
        "trees on every brain voxel). Peak RSS: peak resident memory (`VmHWM`) of the fresh process that made the "
        "measurement (Python, torch and the case included). Floor: FLOPs counted by `FlopCounterMode` (convolutions and matrix products; "
        "2 per multiply-accumulate) divided by the matmul throughput; share of peak = floor / measured.",
    ]
    gpu = report.get("gpu")
    if gpu is not None:
        lines += ["", "#### GPU", ""]
        if "skipped" in gpu:
            lines.append(f"Skipped: {gpu['skipped']}")
        else:
            lines += [f"Device: {gpu['device']}; section wall time {gpu['wall_s'] / 60:.1f} min.", ""]
            lines += synthesis_table(gpu["synthesis"], labels) + [""] + training_table(gpu["training"], labels)
    return "\n".join(lines)


def write_report(report: dict, out: Path, publish: Path | None) -> list[Path]:
    from mrisynth.evaluate import json_safe

    texts = {"md": markdown(report) + "\n", "json": json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n"}
    return write_results(texts, out, "speed", report["started"], publish)


# --- the run -------------------------------------------------------------------------------------


def gpu_section(contenders: list[Contender], args: argparse.Namespace, prepared: dict, case_dir: str,
                train_dirs: list[str]) -> dict:
    """The networks' synthesis and training figures on the first CUDA device, within ``--gpu-minutes``."""
    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        reason = f"CUDA is not available (torch {torch.__version__}, {build})"
        print(f"GPU section skipped: {reason}", flush=True)
        return {"skipped": reason}
    start = time.monotonic()
    budget = 60 * args.gpu_minutes
    networks = [c for c in contenders if c.kind == "network"]
    print(f"GPU section on {torch.cuda.get_device_name(0)} (at most {args.gpu_minutes:g} min)", flush=True)
    synthesis = measure_synthesis(networks, args, prepared, case_dir, "cuda", runs=3, per_process=3, budget_s=budget / 3)
    remaining = budget - (time.monotonic() - start)
    training = measure_training(networks, args, train_dirs, "cuda", list(GPU_BATCHES), budget_s=remaining)
    return {"device": torch.cuda.get_device_name(0), "synthesis": synthesis, "training": training,
            "wall_s": time.monotonic() - start}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    started = time.strftime("%Y-%m-%d %H:%M")
    clock = time.perf_counter()
    refuse_inside(args.out, args.data, "--out")
    if args.publish is not None:
        refuse_inside(args.publish, args.data, "--publish")
    cache_dir = use_cache_dir(args.cache_dir, args.data)
    from mrisynth.cases import find_case
    from mrisynth.models import available_models
    from mrisynth.predict import parse_missing

    args.target = parse_missing(args.target, "--target")
    contenders = all_contenders(check_models(available_models() if args.models is None else args.models),
                                args.fixed_target_new, args.baselines)
    cases = complete_cases(args.data)
    case = find_case(args.case) if args.case else cases[0]
    train_cases = [c for c in cases if c.id != case.id][: args.train_cases]
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "speed", "command": command_line("speed.py", argv), "commit": git_commit(), "started": started,
        "machine": machine_info(args.threads), "target": args.target, "cache_dir": str(cache_dir),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "labels": {c.id: c.label for c in contenders}, "case": {"id": case.id, "folder": str(case.folder)},
        "train_cases": [c.id for c in train_cases],
    }
    print(f"contenders: {', '.join(c.id for c in contenders)}; case {case.id}; work folder {args.out}", flush=True)

    print("data loading", flush=True)
    report["loading"] = measure_loading(train_cases, args.seed_slices, args.cache_slices)
    print("fp32 matmul throughput", flush=True)
    report["matmul"] = matmul_throughput(args.mm_size, args.mm_reps, args.threads)
    print("preparing contenders (untrained checkpoints; fitting voxel-regression)", flush=True)
    prepared = prepare_contenders(contenders, args, train_cases)
    report["voxel_regression"] = {k: v for k, v in prepared.get("voxel-regression", {}).items() if k != "regressor"}
    train_dirs = [str(c.folder) for c in train_cases]
    print("training on CPU", flush=True)
    report["training"] = measure_training(contenders, args, train_dirs, "cpu", args.batch_sizes)
    synth_contenders, report["onnx_problems"] = list(contenders), {}
    if args.onnx or (args.onnx is None and onnx_available()):
        print("exporting the networks to ONNX", flush=True)
        onnx_contenders, report["onnx_problems"] = add_onnx_contenders(contenders, prepared, args.out)
        synth_contenders += onnx_contenders
        report["labels"].update({c.id: f"{report['labels'][c.id[: -len(ONNX_SUFFIX)]]}, ONNX Runtime" for c in onnx_contenders})
    print("synthesis on CPU", flush=True)
    report["synthesis"] = measure_synthesis(synth_contenders, args, prepared, str(case.folder), "cpu", args.runs, 1)
    seed_synth = next((e for e in report["synthesis"].values() if "n_slices" in e), {})
    report["case"].update(n_slices=seed_synth.get("n_slices"), window=seed_synth.get("window", []))
    report["floor"] = compute_floor(report["synthesis"], report["training"], report["matmul"])
    if args.gpu:
        report["gpu"] = gpu_section(contenders, args, prepared, str(case.folder), train_dirs)
    report["wall_s"] = round(time.perf_counter() - clock, 1)
    report["load_average_end"] = load_average()

    print_summary(markdown(report), write_report(report, args.out, args.publish))
    return 0


if __name__ == "__main__":
    sys.exit(main())
