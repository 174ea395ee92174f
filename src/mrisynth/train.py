"""Training: the seed's recipe (VAE-UNet, L1 + beta*KL, Adam) made resumable, reproducible and DDP-ready.

A run folder holds everything about one training run:

* ``config.yaml``: the resolved config (defaults < ``--config`` file < command-line flags);
* ``splits.json``: the patient-level train/validation split, reused on ``--resume``;
* ``metrics.csv``: one row per epoch (or per partial epoch, see ``max_minutes``);
* ``last.pt`` (+ ``last.prev.pt``, the one before), ``best.pt`` (lowest validation L1) and its
  export ``best.safetensors`` + ``best.json``. Checkpoints hold tensors and plain types only.
  With ``ema_decay`` > 0 their ``state_dict`` is the moving average of the weights (what is
  validated and synthesized with); the trained weights behind it travel in ``train_state`` for resume.

``max_minutes`` stops at the first optimizer-step boundary after the budget (counted from the start
of each invocation), then validates and checkpoints; ``--resume`` continues inside that epoch at the
next batch, so an interrupted run ends with the weights of an uninterrupted one (bit-identical on
CPU with ``deterministic``). The per-epoch validation figures are quick slice-level checks on
centre-cropped slices, not the evaluation protocol of ``mrisynth evaluate``.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import functools
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Sampler
from torchmetrics.functional.image import structural_similarity_index_measure
from tqdm import tqdm

from . import __version__, distributed
from .cache import CachedCase, load_cached_case
from .calibration import Calibration, fit_calibration
from .cases import Case, discover_cases
from .checkpoint import checkpoint_metadata, export_safetensors, load_checkpoint, save_checkpoint
from .dataset import SliceDataset, assemble_input, check_target_mode, in_channels_for
from .distributed import DEVICE_CHOICES, DistEnv
from .errors import DataError, MrisynthError, UsageError
from .metrics import SSIM_K1, SSIM_K2, SSIM_RADIUS, SSIM_SIGMA
from .models import build_model, kl_divergence
from .models.blocks import count_parameters
from .predict import Synthesizer
from .preprocess import PreprocessConfig

#: settings that ``--resume`` takes from the command line; every other one comes from the run's config
RESUME_OVERRIDABLE = ("epochs", "max_minutes", "device", "num_workers")

LR_SCHEDULES = ("constant", "cosine")
MAX_CONTEXT = 4  # neighbouring slices on either side (2.5D input); 9 slices per modality at most
_INT_KEYS = ("batch_size", "epochs", "crop", "context_slices", "seed", "num_workers", "val_cases", "val_slices", "slices_per_epoch")
_FLOAT_KEYS = ("beta", "beta_warmup", "histogram_weight", "mse_weight", "ssim_weight", "ema_decay", "lr", "val_fraction", "max_minutes")
_OPTIONAL_KEYS = ("val_cases", "val_slices", "slices_per_epoch", "max_minutes")
_SECTION_KEYS = ("model_options", "preprocess")
_METRICS_COLUMNS = (
    "epoch", "step", "train_l1", "train_kl", "beta", "val_l1", "val_psnr", "val_ssim", "seconds", "slices_per_s"
)


class TrainingDiverged(MrisynthError):
    """The loss became NaN or infinite: training stops, earlier checkpoints are kept (exit code 1)."""


# --- configuration ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _packaged_defaults() -> str:
    return resources.files("mrisynth").joinpath("configs/default.yaml").read_text()


def default_config() -> dict:
    """The seed's recipe, from the packaged ``configs/default.yaml``."""
    return yaml.safe_load(_packaged_defaults())


def model_recipe(model: str) -> dict:
    """A model's own training recipe (``configs/models/<model>.yaml``), or {} for the seed's.

    A new architecture may need other settings than the seed's (learning rate, batch, target
    mode); they sit between the defaults and the user's config file and flags.
    """
    recipe = resources.files("mrisynth").joinpath(f"configs/models/{model}.yaml")
    if not recipe.is_file():
        return {}
    return yaml.safe_load(recipe.read_text()) or {}


def load_config_file(path: str | Path) -> dict:
    """Settings from a YAML file (any subset of the default keys)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path}: expected a YAML config file, found a folder")
    if not path.is_file():
        raise UsageError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: expected YAML, could not parse it ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    return data


def merge_config(base: dict, overrides: dict) -> dict:
    """``overrides`` win; the ``model_options`` and ``preprocess`` sections merge key by key."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if key in _SECTION_KEYS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_config(overrides: dict, use_recipe: bool = True) -> dict:
    """Defaults (+ the model's recipe) + ``overrides``, checked, with numbers coerced (PyYAML reads
    ``1e-4`` as a string).

    ``use_recipe=False`` is for a config saved by an earlier run: it is complete as of its time, so
    a setting it lacks was added later and takes its default (the behaviour the run trained with),
    not what the model's recipe says today.
    """
    defaults = default_config()
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise UsageError(f"unknown training setting(s) {', '.join(unknown)}. Known: {', '.join(sorted(defaults))}")
    model = str(overrides.get("model", defaults["model"]))
    recipe = model_recipe(model) if use_recipe else {}
    config = merge_config(merge_config(defaults, recipe), overrides)
    for key in _INT_KEYS + _FLOAT_KEYS:
        if config[key] is None and key in _OPTIONAL_KEYS:
            continue
        config[key] = _as_number(key, config[key], int if key in _INT_KEYS else float)
    _check_ranges(config)
    try:
        config["target"] = check_target_mode(str(config["target"]))
    except ValueError as exc:
        raise UsageError(f"target: {exc} or 'any'") from None
    config["preprocess"] = _check_preprocess(config["preprocess"])
    if config["crop"] > config["preprocess"]["min_window"]:
        raise UsageError(f"crop {config['crop']} is larger than preprocess.min_window {config['preprocess']['min_window']}")
    return config


def _as_number(key: str, value: Any, kind: type) -> int | float:
    """``value`` as an int or float, refusing booleans, text and fractional counts."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if kind is int and number != int(number):
            raise ValueError
        return kind(number)
    except (TypeError, ValueError):
        raise UsageError(f"{key}: expected {'an integer' if kind is int else 'a number'}, found {value!r}") from None


def _check_ranges(config: dict) -> None:
    """One clear message per out-of-range setting."""
    rules = [
        ("epochs", config["epochs"] >= 1, "at least 1"),
        ("batch_size", config["batch_size"] >= 1, "at least 1"),
        ("lr", config["lr"] > 0, "positive"),
        ("beta", config["beta"] >= 0, "0 or more"),
        ("histogram_weight", config["histogram_weight"] >= 0, "0 or more"),
        ("mse_weight", config["mse_weight"] >= 0, "0 or more"),
        ("ssim_weight", config["ssim_weight"] >= 0, "0 or more"),
        ("ema_decay", 0 <= config["ema_decay"] < 1, "0 (off) or more, below 1"),
        ("beta_warmup", 0 <= config["beta_warmup"] <= 1, "between 0 and 1"),
        ("val_fraction", 0 < config["val_fraction"] < 1, "between 0 and 1"),
        ("crop", config["crop"] >= 16 and config["crop"] % 16 == 0, "a positive multiple of 16"),
        ("context_slices", 0 <= config["context_slices"] <= MAX_CONTEXT, f"between 0 and {MAX_CONTEXT}"),
        ("num_workers", config["num_workers"] >= 0, "0 or more"),
        ("val_cases", config["val_cases"] is None or config["val_cases"] >= 1, "at least 1"),
        ("val_slices", config["val_slices"] is None or config["val_slices"] >= 1, "at least 1"),
        ("slices_per_epoch", config["slices_per_epoch"] is None or config["slices_per_epoch"] >= 1, "at least 1"),
        ("max_minutes", config["max_minutes"] is None or config["max_minutes"] >= 0, "0 or more"),
        ("device", config["device"] in DEVICE_CHOICES, f"one of {', '.join(DEVICE_CHOICES)}"),
        ("deterministic", isinstance(config["deterministic"], bool), "true or false"),
        ("calibrate", isinstance(config["calibrate"], bool), "true or false"),
        ("lr_schedule", config["lr_schedule"] in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}"),
        ("model_options", isinstance(config["model_options"], dict), "a mapping"),
        ("preprocess", isinstance(config["preprocess"], dict), "a mapping"),
    ]
    for key, ok, expected in rules:
        if not ok:
            raise UsageError(f"{key}: expected {expected}, found {config[key]!r}")


def _check_preprocess(section: dict) -> dict:
    """The preprocessing section as a complete :class:`PreprocessConfig` dict."""
    known = PreprocessConfig.__dataclass_fields__
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise UsageError(f"unknown preprocess setting(s) {', '.join(unknown)}. Known: {', '.join(known)}")
    defaults = PreprocessConfig().to_dict()
    values = {k: _as_number(f"preprocess.{k}", section.get(k, v), type(v)) for k, v in defaults.items()}
    config = PreprocessConfig(**values)
    for problem in config.problems():
        raise UsageError(f"preprocess.{problem}")
    return config.to_dict()


def resume_config(saved: dict, overrides: dict, log: Callable[[str], None]) -> dict:
    """The run's saved config; only :data:`RESUME_OVERRIDABLE` settings may change on resume."""
    saved = resolve_config(saved, use_recipe=False)
    wanted = resolve_config(merge_config(saved, overrides), use_recipe=False)
    ignored = [k for k in overrides if k not in RESUME_OVERRIDABLE and wanted[k] != saved[k]]
    if ignored:
        log(
            f"--resume keeps the run's settings: ignoring {', '.join(f'{k}={overrides[k]!r}' for k in ignored)} "
            f"(only {', '.join(RESUME_OVERRIDABLE)} can change)"
        )
    return {**saved, **{k: wanted[k] for k in RESUME_OVERRIDABLE}}


# --- data: cases, patient split, fingerprint ----------------------------------------------------


def usable_cases(root: str | Path, log: Callable[[str], None]) -> list[Case]:
    """Cases with all four modalities and no problems; every skipped case gets one printed line."""
    usable: list[Case] = []
    seen: dict[str, Path] = {}
    for case in discover_cases(root):
        if case.missing:
            log(f"skipping {case.id}: missing {', '.join(case.missing)}")
        elif case.problems:
            log(f"skipping {case.id}: {'; '.join(case.problems)}")
        elif case.id in seen:
            log(f"skipping {case.id} in {case.folder}: same case ID as in {seen[case.id]}")
        else:
            usable.append(case)
            seen[case.id] = case.folder
    return usable


def patient_id(case: Case) -> str:
    """BraTS 2023+ IDs end in a timepoint (``-000``, ``-001``): all timepoints of a patient go together."""
    if case.scheme == "brats2023":
        match = re.match(r"^(.+)-\d{3}$", case.id)
        if match:
            return match.group(1)
    return case.id


def split_patients(cases: list[Case], seed: int, val_fraction: float, val_cases: int | None = None) -> dict:
    """``{"train": [ids], "val": [ids], "seed": seed}``: a random split of PATIENTS, fixed by ``seed``."""
    patients = sorted({patient_id(c) for c in cases})
    if len(patients) < 2:
        raise DataError(
            f"training needs at least 2 patients with all four modalities (one for validation), found {len(patients)}"
        )
    n_val = val_cases if val_cases is not None else max(1, round(val_fraction * len(patients)))
    if n_val >= len(patients):
        raise UsageError(f"{n_val} validation patient(s) leave none of the {len(patients)} for training")
    order = np.random.default_rng(seed).permutation(len(patients))
    val_patients = {patients[i] for i in order[:n_val]}
    return {
        "train": sorted(c.id for c in cases if patient_id(c) not in val_patients),
        "val": sorted(c.id for c in cases if patient_id(c) in val_patients),
        "seed": seed,
    }


def cases_of_split(cases: list[Case], ids: list[str], where: str) -> list[Case]:
    """The cases named in a split, in its order; a clear error when one is no longer usable."""
    by_id = {c.id: c for c in cases}
    absent = [i for i in ids if i not in by_id]
    if absent:
        more = ", ..." if len(absent) > 5 else ""
        raise DataError(f"{len(absent)} case(s) of {where} are missing or incomplete: {', '.join(absent[:5])}{more}")
    return [by_id[i] for i in ids]


def data_fingerprint(cases: list[Case]) -> dict:
    """Sorted training case IDs and a sha256 of their file names and sizes (paths may move)."""
    files = sorted([p.name, p.stat().st_size] for c in cases for p in c.modalities.values())
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return {"train_cases": sorted(c.id for c in cases), "sha256": digest}


# --- schedule and sampling ----------------------------------------------------------------------


def beta_at(step: int, total_steps: int, beta: float, warmup: float) -> float:
    """KL weight at optimizer step ``step`` (0-based): linear from 0 over ``warmup * total_steps`` steps."""
    warmup_steps = warmup * total_steps
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


def lr_at(step: int, total_steps: int, lr: float, schedule: str) -> float:
    """Learning rate for optimizer step ``step`` (0-based): ``lr`` throughout (constant), or
    half a cosine from ``lr`` down to 0 at ``total_steps`` (cosine). A function of the step alone,
    so a resumed run continues the schedule exactly (raising ``epochs`` on resume stretches it)."""
    if schedule == "constant" or total_steps <= 0:
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def ema_decay_at(step: int, decay: float) -> float:
    """Averaging decay after optimizer step ``step`` (0-based): ``decay``, capped by (1 + step) / (10 + step)
    early on so the average is not dominated by the random initial weights for thousands of steps."""
    return min(decay, (1 + step) / (10 + step))


def averaged_copy(net: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``net`` to hold the moving average of its weights."""
    average = copy.deepcopy(net).eval()
    average.requires_grad_(False)
    return average


@torch.no_grad()
def update_average(average: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * net, for every floating-point parameter and buffer."""
    for mean, value in zip(average.state_dict().values(), net.state_dict().values()):
        if mean.is_floating_point():
            mean.lerp_(value, 1.0 - decay)
        else:
            mean.copy_(value)


def cpu_state(net: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


class EpochSampler(Sampler[int]):
    """This rank's share of one epoch's sample order, drawn from (seed, epoch) alone.

    Why not ``DistributedSampler``: it cannot draw K < N samples per epoch nor start mid-epoch,
    which ``slices_per_epoch`` and resuming after ``max_minutes`` need. The epoch's order is padded
    (by repeating its start) to a multiple of the world size, then dealt out rank by rank.
    """

    def __init__(self, n_items: int, per_epoch: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n_items = n_items
        self.per_epoch = per_epoch or n_items
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    @property
    def epoch_length(self) -> int:
        """Samples this rank draws in a whole epoch."""
        return -(-self.per_epoch // self.world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch, and how many of this rank's samples were already used (resume)."""
        self.epoch = epoch
        self.skip = skip

    def _rank_order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        rounds = -(-self.per_epoch // self.n_items)
        order = np.concatenate([rng.permutation(self.n_items) for _ in range(rounds)])[: self.per_epoch]
        order = np.resize(order, self.epoch_length * self.world_size)
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_order()[self.skip :].tolist())

    def __len__(self) -> int:
        return max(self.epoch_length - self.skip, 0)


def validation_indices(n_items: int, n_wanted: int | None, env: DistEnv) -> list[int]:
    """Evenly spaced validation slices (all when ``n_wanted`` is None), dealt out by rank without padding."""
    indices = np.arange(n_items)
    if n_wanted is not None and n_wanted < n_items:
        indices = np.unique(np.linspace(0, n_items - 1, n_wanted).round().astype(int))
    return indices[env.rank :: env.world_size].tolist()


# --- the trainer --------------------------------------------------------------------------------


def loss_terms(
    pred: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, KL) in float32, whatever precision the forward pass ran in."""
    return F.l1_loss(pred.float(), target.float()), kl_divergence(mu.float(), logvar.float())


def histogram_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the sorted values of each predicted and target slice: a 1-D Wasserstein distance.

    Why: per-voxel L1 pulls every uncertain voxel towards the conditional median, so the brightest
    (and darkest) tissue comes out compressed. Scorers and segmenters rescale each volume by its
    own percentiles, so a compressed top end stretches the whole brain brighter. This term asks for
    the right intensity distribution per slice, wherever the voxels are.
    """
    pred_sorted = pred.float().flatten(1).sort(dim=1).values
    target_sorted = target.float().flatten(1).sort(dim=1).values
    return F.l1_loss(pred_sorted, target_sorted)


def _gaussian_window() -> torch.Tensor:
    """The evaluation's SSIM window (mrisynth.metrics): sigma 1.5, 11 taps, sum 1."""
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float32)
    window = torch.exp(-offsets**2 / (2 * SSIM_SIGMA**2))
    return window / window.sum()


def ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - SSIM of [B, 1, H, W] slices (Wang et al. 2004: 11-tap Gaussian, sigma 1.5, data range 1,
    valid windows only), averaged over all windows of the batch.

    Why: L1 and squared error score each voxel alone, so a blurred border costs little where the
    intensities are near; SSIM compares local means, contrasts and structure, so it asks for edges
    and texture where the target has them (Zhao et al. 2017, "Loss functions for image restoration").
    The Gaussian is applied as two 1-D passes: with torchmetrics' 2-D window a CPU training step of
    lite_vae_unet (batch 8, crop 160) took 3.17x as long as with L1 alone, with this 1.04x
    (benchmarks/loss_cost.py).
    """
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    pred, target = pred.float(), target.float()
    window = _gaussian_window().to(pred.device)
    maps = torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1)
    n = maps.shape[1]
    maps = F.conv2d(maps, window.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)
    maps = F.conv2d(maps, window.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)
    mu_p, mu_t, pp, tt, pt = maps.split(1, dim=1)
    var_p, var_t, cov = pp - mu_p**2, tt - mu_t**2, pt - mu_p * mu_t
    ssim = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return 1 - ssim.mean()


def laplace_nll(mean: torch.Tensor, log_scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Laplace negative log-likelihood of ``target`` (up to log 2) for a predicted log scale.

    The mean is detached: the scale head learns the size of the error the synthesis makes, while
    the synthesis keeps its L1 objective unchanged (a joint NLL lets a network buy likelihood by
    declaring hard regions uncertain instead of fitting them).
    """
    residual = (target.float() - mean.detach().float()).abs()
    log_scale = log_scale.float()
    return (residual * torch.exp(-log_scale) + log_scale).mean()


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it, fp16 (with a GradScaler) on older ones, none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic kernels when asked; otherwise let cuDNN pick the fastest ones.

    On CUDA a few kernels of the VAE-UNet (adaptive average pooling's backward) have no
    deterministic version: they warn instead of failing, so bit-identity is promised on CPU only.
    """
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=device.type == "cuda")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def rng_state(device: torch.device) -> dict:
    """This process's random states as tensors and plain Python values (``weights_only`` loads them)."""
    state = {"torch": torch.get_rng_state(), "numpy": _plain(np.random.get_state(legacy=False))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (inside dicts and lists) as Python lists, ints and floats."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def versions() -> dict:
    """Library versions as plain strings (``torch.__version__`` is a TorchVersion, which ``weights_only`` refuses)."""
    return {"mrisynth": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


@dataclass
class EpochResult:
    """Training figures of one (possibly partial) epoch, summed over ranks."""

    train_l1: float
    train_kl: float
    beta: float
    slices: int
    seconds: float
    stopped_early: bool


class Trainer:
    """The model, optimizer and data of one run, and its position (epoch, batch, step).

    Files are not its business (see :func:`fit`), so benchmarks can time its steps directly.
    """

    def __init__(self, config: dict, env: DistEnv, train_cases: list[CachedCase], val_cases: list[CachedCase]):
        self.config = config
        self.env = env
        self.target = config["target"]
        torch.manual_seed(config["seed"])  # the same initial weights on every rank
        self.context = config["context_slices"]
        self.net = build_model(config["model"], in_channels_for(self.target, self.context), 1, **config["model_options"])
        self.channels_last = env.device.type == "cuda"
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.net = self.net.to(env.device, memory_format=memory_format)
        self.model = self._wrap_ddp(self.net)
        self.ema = averaged_copy(self.net) if config["ema_decay"] > 0 else None
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config["lr"])
        self.amp_dtype = amp_dtype(env.device)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.amp_dtype == torch.float16)
        torch.manual_seed(config["seed"] + env.rank)  # each rank draws its own latent noise

        self.train_set = SliceDataset(
            train_cases, self.target, config["crop"], train=True, seed=config["seed"], context=self.context
        )
        self.sampler = EpochSampler(
            len(self.train_set), config["slices_per_epoch"], config["seed"], env.rank, env.world_size
        )
        # private generators: creating a loader iterator (each epoch, each validation) draws a seed
        # from its generator, and must not move the global torch RNG that the latent noise uses
        loader_options = {"num_workers": config["num_workers"], "pin_memory": env.device.type == "cuda"}
        self.loader = DataLoader(
            self.train_set, batch_size=config["batch_size"], sampler=self.sampler,
            generator=torch.Generator().manual_seed(config["seed"]), **loader_options,
        )
        self.val_set = SliceDataset(val_cases, self.target, config["crop"], train=False, context=self.context)
        self.val_loader = DataLoader(
            self.val_set, batch_size=config["batch_size"], generator=torch.Generator(),
            sampler=validation_indices(len(self.val_set), config["val_slices"], env), **loader_options,
        )
        self.steps_per_epoch = -(-self.sampler.epoch_length // config["batch_size"])
        self.total_steps = config["epochs"] * self.steps_per_epoch
        self.epoch = 0  # completed epochs
        self.batch_in_epoch = 0  # batches done in the current epoch (non-zero after a time-budget stop)
        self.global_step = 0
        self.best_val_l1 = math.inf

    def _wrap_ddp(self, net: torch.nn.Module) -> torch.nn.Module:
        if not self.env.distributed:
            return net
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=self.amp_dtype)

    def _batch(self, stack: torch.Tensor, missing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network input and target on the device (channels-last on CUDA)."""
        inputs, target = assemble_input(stack, missing, self.target)
        inputs = inputs.to(self.env.device, non_blocking=True)
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, target.to(self.env.device, non_blocking=True)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any, so all ranks take the same branch."""
        return distributed.all_sum([float(flag)], self.env)[0] > 0

    def beta(self) -> float:
        return beta_at(self.global_step, self.total_steps, self.config["beta"], self.config["beta_warmup"])

    def train_step(self, stack: torch.Tensor, missing: torch.Tensor, beta: float) -> tuple[float, float]:
        """One optimizer step; a non-finite loss on any rank raises :class:`TrainingDiverged` on all, before the update."""
        inputs, target = self._batch(stack, missing)
        with self._autocast():
            pred, mu, logvar = self.model(inputs)
        l1, kl = loss_terms(pred[:, :1], mu, logvar, target)
        loss = l1 + beta * kl
        if self.config["mse_weight"] > 0:  # squared error: PSNR's own measure, and less pull to the median
            loss = loss + self.config["mse_weight"] * F.mse_loss(pred[:, :1].float(), target.float())
        if self.config["histogram_weight"] > 0:
            loss = loss + self.config["histogram_weight"] * histogram_l1(pred[:, :1], target)
        if self.config["ssim_weight"] > 0:
            loss = loss + self.config["ssim_weight"] * ssim_loss(pred[:, :1], target)
        if pred.shape[1] == 2:  # a scale-predicting model (predict_scale): channel 1 is log b
            loss = loss + laplace_nll(pred[:, :1], pred[:, 1:], target)
        l1_value, kl_value = torch.stack([l1.detach(), kl.detach()]).tolist()
        if self.any_rank(not (math.isfinite(l1_value) and math.isfinite(kl_value))):
            raise TrainingDiverged(
                f"the loss is not finite at epoch {self.epoch + 1}, step {self.global_step + 1} "
                f"(L1 {l1_value:.4g}, KL {kl_value:.4g}): training stopped, the checkpoints of earlier epochs "
                f"are kept (try a lower lr)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.global_step, self.total_steps, self.config["lr"], self.config["lr_schedule"])
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            update_average(self.ema, self.net, ema_decay_at(self.global_step, self.config["ema_decay"]))
        return l1_value, kl_value

    @property
    def synthesis_net(self) -> torch.nn.Module:
        """The weights that validation, the checkpoint's ``state_dict`` and predict use: the average when kept."""
        return self.ema if self.ema is not None else self.net

    def run_epoch(self, deadline: float = math.inf) -> EpochResult:
        """Train through the rest of the current epoch, or until ``deadline`` (time.monotonic) passes."""
        self.model.train()
        self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * self.config["batch_size"])
        self.train_set.set_epoch(self.epoch)
        l1_sum = kl_sum = 0.0
        batches = slices = 0
        beta = self.beta()
        start = time.monotonic()
        bar = tqdm(
            self.loader, total=self.steps_per_epoch, initial=self.batch_in_epoch, leave=False,
            desc=f"epoch {self.epoch + 1}/{self.config['epochs']}",
            disable=not (self.env.is_main and sys.stderr.isatty()),
        )
        stopped_early = False
        for stack, missing in bar:
            beta = self.beta()
            l1, kl = self.train_step(stack, missing, beta)
            self.global_step += 1
            self.batch_in_epoch += 1
            l1_sum, kl_sum, batches, slices = l1_sum + l1, kl_sum + kl, batches + 1, slices + len(stack)
            bar.set_postfix(l1=f"{l1:.4f}")
            if self.batch_in_epoch < self.steps_per_epoch and self.any_rank(time.monotonic() > deadline):
                stopped_early = True
                break
        bar.close()
        seconds = time.monotonic() - start
        if not stopped_early:
            self.epoch += 1
            self.batch_in_epoch = 0
        l1_sum, kl_sum, batches, slices = distributed.all_sum([l1_sum, kl_sum, batches, slices], self.env)
        return EpochResult(l1_sum / max(batches, 1), kl_sum / max(batches, 1), beta, int(slices), seconds, stopped_early)

    @torch.no_grad()
    def validate(self) -> dict:
        """Quick slice-level figures on centre-cropped validation slices (model.eval(), z = mu).

        L1 and PSNR are over every pixel of every slice (PSNR = -10 log10 of the mean squared
        error, data range 1); SSIM is torchmetrics' 2D SSIM averaged over slices. Not the
        evaluation protocol: whole volumes, brain masks and BraSyn scores are ``mrisynth evaluate``'s job.
        """
        net = self.synthesis_net
        net.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.env.device)
        n_pixels = n_slices = 0
        for stack, missing in self.val_loader:
            inputs, target = self._batch(stack, missing)
            with self._autocast():
                pred = net(inputs)[0][:, :1]  # the synthesis (channel 1 of a scale model is log b)
            pred = pred.float()
            error = pred - target
            ssim = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="sum")
            sums += torch.stack([error.abs().sum(), error.pow(2).sum(), ssim]).double()
            n_pixels += error.numel()
            n_slices += len(stack)
        abs_sum, sq_sum, ssim_sum, n_pixels, n_slices = distributed.all_sum([*sums.tolist(), n_pixels, n_slices], self.env)
        mse = sq_sum / n_pixels
        return {
            "val_l1": abs_sum / n_pixels,
            "val_psnr": -10 * math.log10(mse) if mse > 0 else math.inf,
            "val_ssim": ssim_sum / n_slices,
            "val_slices": int(n_slices),
        }

    def checkpoint(self, metrics: dict, fingerprint: dict) -> dict:
        """Everything to synthesize and to resume; a collective call (it gathers every rank's RNG state)."""
        rng_states = distributed.all_gather_objects(rng_state(self.env.device), self.env)
        checkpoint = checkpoint_metadata(
            self.synthesis_net, self.target, self.config["preprocess"], context_slices=self.context,
            epoch=self.epoch, step=self.global_step, metrics=dict(metrics),
            data=fingerprint, config=copy.deepcopy(self.config), versions=versions(),
        )
        checkpoint["state_dict"] = cpu_state(self.synthesis_net)
        checkpoint["train_state"] = {
            "net": cpu_state(self.net) if self.ema is not None else None,  # the trained (not averaged) weights
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "best_val_l1": self.best_val_l1,
            "world_size": self.env.world_size,
            "rng": rng_states,
        }
        return checkpoint

    def restore(self, checkpoint: dict, log: Callable[[str], None]) -> None:
        """Continue from a checkpoint written by :meth:`checkpoint`."""
        state = checkpoint["train_state"]
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint["state_dict"])
            self.net.load_state_dict(state["net"])
        else:
            self.net.load_state_dict(checkpoint["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step, self.best_val_l1 = state["global_step"], state["best_val_l1"]
        if len(state["rng"]) == self.env.world_size:
            set_rng_state(state["rng"][self.env.rank], self.env.device)
        else:
            log(
                f"the run was trained by {len(state['rng'])} process(es), this is {self.env.world_size}: "
                "random streams restart, so the result will differ from an uninterrupted run"
            )


# --- the run folder -----------------------------------------------------------------------------


def refuse_existing_run(run_dir: Path) -> None:
    """Never overwrite a run by accident."""
    if (run_dir / "last.pt").exists() or (run_dir / "last.prev.pt").exists():
        raise UsageError(f"{run_dir} already holds a training run: add --resume to continue it, or choose another --out")


def load_resume_checkpoint(run_dir: Path, log: Callable[[str], None]) -> dict:
    """``last.pt``, or ``last.prev.pt`` when the last one is damaged (e.g. the disk filled up)."""
    last, prev = run_dir / "last.pt", run_dir / "last.prev.pt"
    if not last.exists() and not prev.exists():
        raise UsageError(f"{run_dir}: nothing to resume (no last.pt)")
    try:
        checkpoint = load_checkpoint(last)
    except DataError as exc:
        if not prev.exists():
            raise
        log(f"{exc}; resuming from {prev.name} instead")
        checkpoint = load_checkpoint(prev)
    if "train_state" not in checkpoint or "config" not in checkpoint:
        raise DataError(f"{run_dir}: last.pt has no training state; it cannot be resumed")
    return checkpoint


def read_split(run_dir: Path) -> dict:
    path = run_dir / "splits.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; a resumed run needs the split it started with")
    try:
        split = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: expected the run's split as JSON, could not parse it ({exc})") from None
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "val")):
        raise DataError(f"{path}: expected {{\"train\": [...], \"val\": [...]}}, found something else")
    return split


def write_run_files(run_dir: Path, config: dict, split: dict) -> None:
    """The resolved config and the split, written before training starts (again on resume: epochs may change)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "splits.json").write_text(json.dumps(split, indent=1) + "\n")


def save_run_checkpoints(run_dir: Path, checkpoint: dict, is_best: bool) -> None:
    """``last.pt`` (the previous one kept as ``last.prev.pt``), and ``best.pt`` + safetensors export."""
    last = run_dir / "last.pt"
    if last.exists():
        os.replace(last, run_dir / "last.prev.pt")
    save_checkpoint(last, checkpoint)
    if is_best:
        save_checkpoint(run_dir / "best.pt", checkpoint)
        export_safetensors(checkpoint, run_dir / "best.safetensors")


def append_metrics_row(path: Path, row: dict) -> None:
    """One CSV row; a partial last line (a process killed while appending) is dropped first."""
    if path.exists():
        text = path.read_bytes()
        if text and not text.endswith(b"\n"):
            path.write_bytes(text[: text.rfind(b"\n") + 1])
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_METRICS_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row[k] for k in _METRICS_COLUMNS})


def epoch_line(trainer: Trainer, result: EpochResult, metrics: dict, is_best: bool) -> str:
    """The one line printed per epoch."""
    position = f"epoch {trainer.epoch}/{trainer.config['epochs']}"
    if result.stopped_early:
        position = (
            f"epoch {trainer.epoch + 1}/{trainer.config['epochs']} "
            f"(batch {trainer.batch_in_epoch}/{trainer.steps_per_epoch})"
        )
    return (
        f"{position}  step {trainer.global_step}  train L1 {result.train_l1:.4f} KL {result.train_kl:.4g} "
        f"(beta {result.beta:.2g})  val L1 {metrics['val_l1']:.4f} PSNR {metrics['val_psnr']:.2f} dB "
        f"SSIM {metrics['val_ssim']:.4f}  {result.seconds:.0f} s, {result.slices / max(result.seconds, 1e-9):.1f} slices/s"
        + ("  (best)" if is_best else "")
    )


def fit(trainer: Trainer, run_dir: Path, fingerprint: dict, log: Callable[[str], None]) -> Path:
    """Epochs of training, each followed by validation, a metrics row and checkpoints; returns best.pt."""
    config, env = trainer.config, trainer.env
    budget = config["max_minutes"]
    deadline = time.monotonic() + 60 * budget if budget is not None else math.inf
    if trainer.epoch >= config["epochs"]:
        log(f"{run_dir} is already trained for {trainer.epoch} epochs: nothing to do (raise --epochs to continue)")
    while trainer.epoch < config["epochs"]:
        result = trainer.run_epoch(deadline)
        metrics = trainer.validate()
        if not math.isfinite(metrics["val_l1"]):
            raise TrainingDiverged(f"validation L1 is {metrics['val_l1']} at epoch {trainer.epoch}: training stopped")
        is_best = metrics["val_l1"] < trainer.best_val_l1
        trainer.best_val_l1 = min(trainer.best_val_l1, metrics["val_l1"])
        checkpoint = trainer.checkpoint(metrics, fingerprint)
        if env.is_main:
            save_run_checkpoints(run_dir, checkpoint, is_best)
            done = trainer.epoch + trainer.batch_in_epoch / trainer.steps_per_epoch
            slices_per_s = result.slices / max(result.seconds, 1e-9)
            row = {"epoch": round(done, 4), "step": trainer.global_step, "train_l1": result.train_l1,
                   "train_kl": result.train_kl, "beta": result.beta, "seconds": round(result.seconds, 2),
                   "slices_per_s": round(slices_per_s, 3), **metrics}
            append_metrics_row(run_dir / "metrics.csv", row)
            log(epoch_line(trainer, result, metrics, is_best))
        out_of_time = result.stopped_early or trainer.any_rank(time.monotonic() > deadline)
        if out_of_time and trainer.epoch < config["epochs"]:
            log(f"time budget of {budget:g} min used up: stopped after step {trainer.global_step}; continue with --resume")
            break
    log(f"best checkpoint: {run_dir / 'best.pt'} (val L1 {trainer.best_val_l1:.4f})")
    return run_dir / "best.pt"


# --- entry point --------------------------------------------------------------------------------


def train(config: dict, data_root: str | Path, out_dir: str | Path, resume: bool = False) -> Path:
    """Train on the complete cases under ``data_root``, writing the run folder ``out_dir``; returns best.pt.

    ``config`` holds any subset of the settings in ``configs/default.yaml`` (the rest are the
    defaults). With ``resume`` the run's saved config and split are used, and only ``epochs``,
    ``max_minutes``, ``device`` and ``num_workers`` may be changed. Under ``torchrun`` (WORLD_SIZE > 1)
    each process trains on its share of every batch with DistributedDataParallel; rank 0 writes.
    """
    overrides = dict(config)
    device_choice = resolve_config(overrides)["device"]
    env = distributed.setup(device_choice)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        with run_folder_lock(Path(out_dir), env.is_main):
            return _train(env, overrides, Path(data_root), Path(out_dir), resume)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        distributed.cleanup(env)


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, is_main: bool) -> Iterator[None]:
    """Refuse a second ``mrisynth train`` on a run folder in use (e.g. ``--resume`` while the first
    still runs): two writers would interleave checkpoints. A lock left by a killed run is taken over."""
    if not is_main or (run_dir.exists() and not run_dir.is_dir()):
        yield
        return
    lock = run_dir / ".train.lock"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        owner = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        owner = 0
    if owner and owner != os.getpid() and _process_alive(owner):
        raise UsageError(f"--out {run_dir}: another mrisynth train (process {owner}) is using this run folder")
    lock.write_text(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _train(env: DistEnv, overrides: dict, data_root: Path, run_dir: Path, resume: bool) -> Path:
    log = _logger(env)
    checkpoint = split = None
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir}: expected a run folder, found a file")
    if resume:
        checkpoint = load_resume_checkpoint(run_dir, log)
        config = resume_config(checkpoint["config"], overrides, log)
        split = read_split(run_dir)
    else:
        refuse_existing_run(run_dir)
        config = resolve_config(overrides)
    configure_determinism(config["deterministic"], env.device)

    cases = usable_cases(data_root, log)
    split = split or split_patients(cases, config["seed"], config["val_fraction"], config["val_cases"])
    train_cases = cases_of_split(cases, split["train"], f"the training split under {data_root}")
    val_cases = cases_of_split(cases, split["val"], f"the validation split under {data_root}")
    if env.is_main:
        write_run_files(run_dir, config, split)

    preprocess = PreprocessConfig.from_dict(config["preprocess"])
    log(f"preparing {len(train_cases) + len(val_cases)} cases (decoded once, then read from the slice cache)")
    with distributed.local_main_first(env):
        cached_train = [load_cached_case(c, preprocess) for c in train_cases]
        cached_val = [load_cached_case(c, preprocess) for c in val_cases]
    trainer = Trainer(config, env, cached_train, cached_val)
    fingerprint = data_fingerprint(train_cases)
    if checkpoint is not None:
        trainer.restore(checkpoint, log)
        if checkpoint.get("data", {}).get("sha256") != fingerprint["sha256"]:
            log("note: the training files differ in name or size from those the run started with")
    log(_summary(trainer, len(cached_train), len(cached_val)))
    best = fit(trainer, run_dir, fingerprint, log)
    if env.is_main and config["calibrate"]:
        calibrate_run(run_dir, train_cases, val_cases, env.device.type, log)
    return best


def calibrate_run(
    run_dir: Path, train_cases: list[Case], val_cases: list[Case], device: str = "cpu",
    log: Callable[[str], None] = print,
) -> Calibration:
    """Fit ``best.pt``'s output calibration (templates from the training patients, each modality on
    or off by its effect on the validation patients, see :mod:`mrisynth.calibration`) and store
    it in ``best.pt`` and its safetensors export."""
    start = time.monotonic()
    best = run_dir / "best.pt"
    synthesizer = Synthesizer.from_checkpoint(best, device=device)
    calibration = fit_calibration(synthesizer, synthesizer.modalities, train_cases, val_cases, log)
    checkpoint = load_checkpoint(best)
    checkpoint["calibration"] = calibration.to_dict()
    save_checkpoint(best, checkpoint)
    export_safetensors(checkpoint, run_dir / "best.safetensors")
    enabled = ", ".join(calibration.enabled) or "none"
    log(f"calibration stored in {best} (on for: {enabled}; {time.monotonic() - start:.0f} s)")
    return calibration


def _summary(trainer: Trainer, n_train: int, n_val: int) -> str:
    config, env = trainer.config, trainer.env
    n_params = count_parameters(trainer.net)
    where = f"{env.device.type}" + (f" x {env.world_size} processes" if env.distributed else "")
    if trainer.amp_dtype is not None:
        where += f", autocast {str(trainer.amp_dtype).replace('torch.', '')}"
    return (
        f"training {config['model']} ({n_params / 1e6:.2f} M parameters) to synthesize {config['target']}: "
        f"{n_train} training cases ({len(trainer.train_set)} slices), {n_val} validation cases "
        f"({min(len(trainer.val_set), config['val_slices'] or math.inf)} slices); {trainer.steps_per_epoch} steps of "
        f"{config['batch_size']} per epoch and process, {config['epochs']} epochs, on {where}"
    )


def _logger(env: DistEnv) -> Callable[[str], None]:
    """``print`` on rank 0 (flushed, so torchrun shows it at once); silence elsewhere."""
    if env.is_main:
        return functools.partial(print, flush=True)
    return lambda message: None
