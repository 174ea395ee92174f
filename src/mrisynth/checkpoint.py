"""Checkpoints that are safe to load and enough, alone, to synthesize.

A checkpoint is a dict of tensors and plain Python types only, so ``torch.load(weights_only=True)``
reads it without unpickling arbitrary objects. It carries the model's name and config, the target
mode, the preprocessing settings, a fingerprint of the training data and library versions. Weights
can also be exported as ``.safetensors`` with the same metadata in a JSON file beside them.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import DataError
from .io import first_line, temp_path_beside

FORMAT = "mrisynth-checkpoint"
FORMAT_VERSION = 1


def checkpoint_metadata(model: torch.nn.Module, target: str, preprocess: dict, **extra: Any) -> dict:
    """The part of a checkpoint that describes the model (everything but tensors)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mrisynth_version": __version__,
        "torch_version": str(torch.__version__),
        "model": dict(model.config),
        "target": target,
        "preprocess": dict(preprocess),
        **extra,
    }


def save_checkpoint(path: str | Path, checkpoint: dict) -> Path:
    """Write atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(temp_path_beside(path))
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


#: ``--model pretrained``: the weights shipped inside the package (see docs/model_card.md).
PRETRAINED = "pretrained"
PRETRAINED_FILE = "weights/lite_vae_unet_any.safetensors"


def pretrained_path() -> Path:
    """The packaged pretrained weights (safetensors with their metadata embedded)."""
    from importlib import resources

    path = Path(str(resources.files("mrisynth").joinpath(PRETRAINED_FILE)))
    if not path.is_file():
        raise DataError(f"{path}: the pretrained weights are missing from this installation of mrisynth")
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a ``.pt`` checkpoint or a ``.safetensors`` export, never unpickling arbitrary objects.

    ``path`` may be ``"pretrained"``: the weights shipped with mrisynth. Every failure is a
    one-line :class:`DataError` naming the file: a pickle that would build an object other than
    tensors and plain types (and so could run code) is refused, not loaded.
    """
    if str(path) == PRETRAINED and not Path(path).exists():
        path = pretrained_path()
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: expected a checkpoint file (.pt or .safetensors), found a folder")
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: expected an mrisynth checkpoint, found an empty (0-byte) file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if not magic.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip archive (or, legacy, a pickle)
        raise DataError(f"{path}: expected an mrisynth checkpoint, the file is not one (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():  # the restricted unpickler's warnings about odd files are noise here
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights only" not in text.lower():  # a damaged or foreign pickle, not a refused object
            raise DataError(f"{path}: expected an mrisynth checkpoint, the file is truncated or not a checkpoint ({first_line(exc, 120)})") from None
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise DataError(
                f"{path}: refused to load: the checkpoint holds an object other than tensors and plain types "
                f"({found.group(1)}), which could run code when unpickled"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        raise DataError(
            f"{path}: refused to load: the file holds pickle content that the restricted loader does not accept"
            + (f" ({reason.group(1).strip()[:120]})" if reason else "")
        ) from None
    except Exception as exc:  # noqa: BLE001 - an untrusted file may fail in any way: never a traceback
        raise DataError(f"{path}: expected an mrisynth checkpoint, the file is truncated or not a checkpoint ({first_line(exc, 120)})") from None
    return check_metadata(path, checkpoint)


def check_metadata(path: str | Path, checkpoint: Any) -> dict:
    """Refuse checkpoints of another program or of a newer mrisynth format, with a clear message."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        what = "a dict without mrisynth's 'format' entry" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
        raise DataError(f"{path}: expected an mrisynth checkpoint, found {what} (another program's file?)")
    version = checkpoint.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise DataError(f"{path}: expected an integer checkpoint format version, found {version!r}")
    if version > FORMAT_VERSION:
        raise DataError(
            f"{path}: checkpoint format {version} was written by a newer mrisynth "
            f"({checkpoint.get('mrisynth_version', '?')}); this is {__version__} (format {FORMAT_VERSION}): upgrade mrisynth"
        )
    for key in ("model", "target", "preprocess", "state_dict"):
        if key not in checkpoint:
            raise DataError(f"{path}: mrisynth checkpoint without '{key}'")
    for key in ("model", "preprocess", "state_dict"):
        if not isinstance(checkpoint[key], dict):
            raise DataError(f"{path}: expected '{key}' to be a mapping in the checkpoint, found {type(checkpoint[key]).__name__}")
    if not isinstance(checkpoint["model"].get("name"), str):
        raise DataError(f"{path}: the checkpoint's model has no name")
    return checkpoint


def export_safetensors(checkpoint: dict, path: str | Path) -> Path:
    """Weights as ``path`` (.safetensors) and all metadata as ``path`` with ``.json``, both atomic."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "train_state")}
    tensors = {k: v.detach().contiguous().cpu() for k, v in checkpoint["state_dict"].items()}
    tmp = str(temp_path_beside(path))
    try:
        save_file(tensors, tmp, metadata={"mrisynth": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    json_path = path.with_suffix(".json")
    tmp_json = temp_path_beside(json_path)
    try:
        tmp_json.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_json, json_path)
    finally:
        if tmp_json.exists():
            tmp_json.unlink()
    return path


def _load_safetensors(path: Path) -> dict:
    """A checkpoint dict from a safetensors export (metadata embedded, or in the JSON beside it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:  # one pass: metadata and tensors
            embedded = (handle.metadata() or {}).get("mrisynth")
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - an untrusted file may fail in any way: never a traceback
        raise DataError(f"{path}: expected safetensors weights, could not read them ({first_line(exc, 120)})") from None
    json_path = path.with_suffix(".json")
    if not embedded and not json_path.is_file():
        raise DataError(f"{path}: safetensors weights without mrisynth metadata (expected {json_path.name} beside it)")
    source = path if embedded else json_path
    try:
        meta = json.loads(embedded if embedded else json_path.read_text())
    except (ValueError, OSError) as exc:
        raise DataError(f"{source}: expected mrisynth metadata as JSON, could not parse it ({first_line(exc, 120)})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{source}: expected mrisynth metadata as a JSON object, found {type(meta).__name__}")
    return check_metadata(path, {**meta, "state_dict": state_dict})


def build_model_from_checkpoint(checkpoint: dict) -> torch.nn.Module:
    """The checkpoint's model with its weights loaded, in eval mode."""
    from .errors import UsageError
    from .models import build_model

    config = dict(checkpoint["model"])
    try:
        model = build_model(**config)
    except UsageError as exc:
        raise DataError(f"checkpoint's model cannot be built by this mrisynth {__version__}: {exc}") from None
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:  # options of the wrong kind or value
        raise DataError(f"checkpoint's model settings cannot build model '{config.get('name')}': {first_line(exc, 120)}") from None
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        # the first line of torch's message only says "Error(s) in loading state_dict": show the first error
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        detail = details[0][:200] if details else first_line(exc, 200)
        raise DataError(f"checkpoint weights do not fit model '{config.get('name')}': {detail}") from None
    return model.eval()
