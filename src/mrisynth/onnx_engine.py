"""ONNX export of a checkpoint, and ONNX Runtime inference behind ``mrisynth predict --engine onnx``.

Why: on a CPU, ONNX Runtime runs the same network faster than eager PyTorch (measured on this
project's 2-core CPU: ``benchmarks/onnx_speed.py``, figures in docs/benchmarks.md), and an
``.onnx`` file runs where PyTorch is not installed or wanted. The exported graph is the
deterministic synthesis (z = mu); posterior sampling (``--samples K``) stays with PyTorch.

An exported file carries the checkpoint's metadata (model, target, preprocessing) as ONNX metadata
under the key ``mrisynth``, so it predicts exactly like the checkpoint it came from: ``predict``
reads the preprocessing from it like from a checkpoint. ``--engine onnx`` with a ``.pt`` /
``.safetensors`` checkpoint (or ``pretrained``) exports it once into the cache folder
(``$MRISYNTH_CACHE_DIR/onnx``) and reuses that file while the checkpoint is unchanged.

Export needs the ``onnx`` extra (``pip install 'mrisynth[onnx]'``: onnx, onnxscript, onnxruntime);
inference needs onnxruntime only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .checkpoint import build_model_from_checkpoint, load_checkpoint, pretrained_path, PRETRAINED
from .errors import DataError, UsageError
from .io import first_line, temp_path_beside

METADATA_KEY = "mrisynth"
INPUT_NAME, OUTPUT_NAME = "input", "synthesis"
EXPORT_SIZE = 160  # example height and width; the exported graph takes any multiple of 16
METADATA_FIELDS = ("format", "format_version", "mrisynth_version", "model", "target", "context_slices", "preprocess", "calibration")
INSTALL_HINT = "pip install 'mrisynth[onnx]'"


class SynthesisGraph(torch.nn.Module):
    """What is exported: input slices -> the synthesis (the mean path, z = mu), nothing else."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, sample=False)[0]


# --- export --------------------------------------------------------------------------------------


def export_onnx(checkpoint: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write ``checkpoint`` (a .pt, .safetensors or ``pretrained``) as an ONNX file with its metadata."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise UsageError(f"{output} exists (use --overwrite to replace it)")
    if output.suffix != ".onnx":
        raise UsageError(f"--output {output}: expected a file name ending in .onnx")
    _require("onnx", "onnxscript")
    loaded = load_checkpoint(checkpoint)
    model = build_model_from_checkpoint(loaded).eval()
    metadata = {k: loaded[k] for k in METADATA_FIELDS if k in loaded}
    output.parent.mkdir(parents=True, exist_ok=True)
    proto = _trace(model, int(loaded["model"]["in_channels"]))
    _verify(proto, model, int(loaded["model"]["in_channels"]))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    tmp = temp_path_beside(output)
    try:
        tmp.write_bytes(proto.SerializeToString())
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    return output


def _trace(model: torch.nn.Module, in_channels: int) -> Any:
    """The ONNX ModelProto of the synthesis graph, batch, height and width dynamic (multiples of 16)."""
    example = torch.zeros(2, in_channels, EXPORT_SIZE, EXPORT_SIZE)
    batch = torch.export.Dim("batch", min=1, max=4096)
    height, width = (torch.export.Dim(name, min=1, max=256) * 16 for name in ("height", "width"))
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # notes about absent torchvision ops and the like are not the user's business
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                SynthesisGraph(model), (example,), dynamo=True, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": {0: batch, 2: height, 3: width}},
            )
        except Exception as exc:  # noqa: BLE001 - the exporter fails in many ways; say which model
            raise DataError(f"the model '{model.config['name']}' could not be exported to ONNX ({first_line(exc, 160)})") from None
        finally:
            exporter_log.setLevel(level)
    return program.model_proto


def _verify(proto: Any, model: torch.nn.Module, in_channels: int, tolerance: float = 1e-4) -> None:
    """Run the exported graph at another batch and size than the example and compare with eager.

    An exporter may specialise a shape-dependent op to the example's size (``vae_unet``'s
    adaptive pooling before its fully connected latent does): such a graph would fail, or be
    wrong, on real windows. Refuse it here rather than at prediction time.
    """
    import onnxruntime as ort

    x = torch.rand(1, in_channels, EXPORT_SIZE, EXPORT_SIZE + 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = SynthesisGraph(model)(x).numpy()
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # a failing graph is reported below in one line, not logged by the runtime
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        error = float(np.abs(got - expected).max())
    except Exception as exc:  # noqa: BLE001
        error, detail = float("inf"), first_line(exc, 100)
    else:
        detail = f"max difference {error:.2g}"
    if not error <= tolerance:
        raise DataError(
            f"the model '{model.config['name']}' does not export to an ONNX graph that works at every slice size "
            f"(checked at {EXPORT_SIZE}x{EXPORT_SIZE + 32}: {detail}); use --engine torch"
        )


# --- inference -----------------------------------------------------------------------------------


class OnnxModel:
    """An ONNX Runtime session that answers like mrisynth's torch models: ``(prediction, None, None)``."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        _require("onnxruntime")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        # idle runtime threads sleep instead of spinning: between batches the CPU goes to the
        # preprocessing and writing around the network, not to threads waiting for work
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
            raise DataError(f"{path}: expected an ONNX model exported by mrisynth, could not load it ({first_line(exc, 120)})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise DataError(f"{path}: an ONNX model without mrisynth's metadata (export it with mrisynth export)")
        self.metadata: dict = json.loads(raw)

    def __call__(self, x: torch.Tensor, sample: bool | None = None) -> tuple[torch.Tensor, None, None]:
        if sample:
            raise UsageError("posterior samples (--samples K) need --engine torch: the ONNX graph is the deterministic synthesis")
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(out), None, None

    def to(self, device: torch.device) -> "OnnxModel":
        if torch.device(device).type != "cpu":
            raise UsageError("--engine onnx runs on the CPU (use --device cpu, or --engine torch on a GPU)")
        return self

    def eval(self) -> "OnnxModel":
        return self


def onnx_file_for(checkpoint: str | Path, cache_dir: Path | None = None) -> Path:
    """An ``.onnx`` model as is; a checkpoint exported once into the cache (keyed by its bytes)."""
    path = Path(checkpoint)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise DataError(f"{path}: ONNX model not found")
        return path
    if str(checkpoint) == PRETRAINED and not path.exists():
        path = pretrained_path()
    if not path.is_file():
        load_checkpoint(path)  # the checkpoint's own one-line error (not found, a folder, ...)
    if cache_dir is None:
        from .cache import default_cache_dir

        cache_dir = default_cache_dir() / "onnx"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:20]
    cached = cache_dir / f"{digest}-mrisynth{__version__}-torch{torch.__version__.split('+')[0]}.onnx"
    if not cached.is_file():
        export_onnx(path, cached, overwrite=True)
    return cached


def _require(*modules: str) -> None:
    """A usage error naming the extra to install, not an ImportError traceback."""
    import importlib.util

    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        raise UsageError(f"ONNX support needs {', '.join(absent)}: {INSTALL_HINT}")
