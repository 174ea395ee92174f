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
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import DataError

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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a ``.pt`` checkpoint or a ``.safetensors`` export, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise DataError(f"{path}: refused to load, the checkpoint holds more than tensors and plain types ({first[:200]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise DataError(f"{path}: expected an mrisynth checkpoint, the file is truncated or not a checkpoint ({str(exc)[:120]})") from None
    return check_metadata(path, checkpoint)


def check_metadata(path: str | Path, checkpoint: Any) -> dict:
    """Refuse checkpoints of another program or of a newer mrisynth format, with a clear message."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise DataError(f"{path}: expected an mrisynth checkpoint, found another kind of file")
    version = checkpoint.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise DataError(
            f"{path}: checkpoint format {version} was written by a newer mrisynth "
            f"({checkpoint.get('mrisynth_version', '?')}); this is {__version__} (format {FORMAT_VERSION}): upgrade mrisynth"
        )
    for key in ("model", "target", "preprocess", "state_dict"):
        if key not in checkpoint:
            raise DataError(f"{path}: mrisynth checkpoint without '{key}'")
    return checkpoint


def export_safetensors(checkpoint: dict, path: str | Path) -> Path:
    """Weights as ``path`` (.safetensors) and all metadata as ``path`` with ``.json``, both atomic."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "train_state")}
    tensors = {k: v.detach().contiguous().cpu() for k, v in checkpoint["state_dict"].items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"mrisynth": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    json_path = path.with_suffix(".json")
    tmp_json = json_path.with_name(f".{json_path.name}.tmp")
    tmp_json.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_json, json_path)
    return path


def _load_safetensors(path: Path) -> dict:
    """A checkpoint dict from a safetensors export (metadata embedded, or in the JSON beside it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            embedded = (handle.metadata() or {}).get("mrisynth")
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path}: expected safetensors weights, could not read them ({str(exc)[:120]})") from None
    json_path = path.with_suffix(".json")
    if embedded:
        meta = json.loads(embedded)
    elif json_path.is_file():
        meta = json.loads(json_path.read_text())
    else:
        raise DataError(f"{path}: safetensors weights without mrisynth metadata (expected {json_path.name} beside it)")
    return check_metadata(path, {**meta, "state_dict": state_dict})


def build_model_from_checkpoint(checkpoint: dict) -> torch.nn.Module:
    """The checkpoint's model with its weights loaded, in eval mode."""
    from .errors import UsageError
    from .models import build_model

    config = dict(checkpoint["model"])
    try:
        model = build_model(**config)
    except UsageError as exc:
        raise DataError(f"checkpoint names a model this mrisynth does not have: {exc}") from None
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise DataError(f"checkpoint weights do not fit model '{config.get('name')}': {str(exc).splitlines()[0]}") from None
    return model.eval()
