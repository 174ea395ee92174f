"""``mrisynth export --format onnx`` and ``predict --engine onnx``: same numbers as eager PyTorch, clear errors."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import write_case  # noqa: E402
from mrisynth.checkpoint import checkpoint_metadata, save_checkpoint  # noqa: E402
from mrisynth.cli import main  # noqa: E402
from mrisynth.dataset import in_channels_for  # noqa: E402
from mrisynth.errors import DataError, UsageError  # noqa: E402
from mrisynth.models import build_model  # noqa: E402
from mrisynth.onnx_engine import OnnxModel, export_onnx, onnx_file_for  # noqa: E402
from mrisynth.predict import Synthesizer, predict_folder  # noqa: E402
from mrisynth.preprocess import PreprocessConfig  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # slow: each export traces the model


def tiny_checkpoint(path: Path, model: str = "lite_vae_unet", target: str = "any", **options) -> Path:
    torch.manual_seed(0)
    net = build_model(model, in_channels=in_channels_for(target), base_channels=4, **options)
    checkpoint = {**checkpoint_metadata(net, target, PreprocessConfig(min_window=32).to_dict()), "state_dict": net.state_dict()}
    return save_checkpoint(path, checkpoint)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    checkpoint = tiny_checkpoint(folder / "lite.pt")
    return checkpoint, export_onnx(checkpoint, folder / "lite.onnx")


@pytest.mark.parametrize("shape", [(1, 8, 32, 48), (5, 8, 64, 32)])
def test_onnx_runtime_matches_eager_pytorch_at_any_batch_and_size(exported, shape):
    checkpoint, onnx_path = exported
    eager = Synthesizer.from_checkpoint(checkpoint, device="cpu").model
    runtime = OnnxModel(onnx_path, threads=1)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = eager(x)[0]
    got = runtime(x)[0]
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)
    assert runtime.metadata["target"] == "any" and runtime.metadata["preprocess"]["min_window"] == 32


def test_predict_with_the_onnx_engine_writes_what_torch_writes(exported, tmp_path):
    checkpoint, onnx_path = exported
    case = write_case(tmp_path / "data", modalities=("t1", "t1ce", "t2"), shape=(40, 48, 12))
    outputs = {}
    for name, model, engine in (("torch", checkpoint, "torch"), ("onnx-file", onnx_path, None), ("onnx-ckpt", checkpoint, "onnx")):
        report = predict_folder(case, tmp_path / name, checkpoint=model, engine=engine, device="cpu", progress=False)
        outputs[name] = np.asarray(nib.load(str(report.written[0])).dataobj)
    assert outputs["torch"].max() > 0
    np.testing.assert_allclose(outputs["onnx-file"], outputs["torch"], atol=1e-5)
    np.testing.assert_allclose(outputs["onnx-ckpt"], outputs["torch"], atol=1e-5)


def test_a_checkpoint_is_exported_once_into_the_cache(exported, tmp_path):
    checkpoint, _ = exported
    first = onnx_file_for(checkpoint, cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert onnx_file_for(checkpoint, cache_dir=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def test_the_onnx_graph_of_a_scale_model_is_its_plain_synthesis(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "scale.pt", predict_scale=True)
    runtime = OnnxModel(export_onnx(checkpoint, tmp_path / "scale.onnx"))
    assert runtime(torch.rand(2, 8, 32, 32))[0].shape == (2, 1, 32, 32)


def test_cli_export_and_its_usage_errors(exported, tmp_path, capsys):
    checkpoint, onnx_path = exported
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(checkpoint), "--output", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["export", "--model", str(checkpoint), "--output", str(out)]) == 2  # exists, no --overwrite
    assert "use --overwrite" in capsys.readouterr().err
    assert main(["export", "--model", str(checkpoint), "--output", str(tmp_path / "m.bin")]) == 2
    assert main(["export", "--model", str(tmp_path / "absent.pt"), "--output", str(tmp_path / "x.onnx")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_predict_usage_errors_with_the_onnx_engine(exported, tmp_path, capsys):
    checkpoint, onnx_path = exported
    case = write_case(tmp_path / "data", modalities=("t1", "t1ce", "t2"), shape=(40, 48, 12))
    base = ["predict", "--input", str(case), "--output", str(tmp_path / "out"), "--device", "cpu"]
    assert main(base + ["--model", str(onnx_path), "--samples", "2"]) == 2
    assert "--engine torch" in capsys.readouterr().err
    assert main(base + ["--model", str(onnx_path), "--engine", "torch"]) == 2
    assert "runs with --engine onnx" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_onnx_packages_are_a_usage_error_naming_the_extra(exported, monkeypatch, tmp_path):
    checkpoint, onnx_path = exported
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("onnx") else real(name, *a))
    with pytest.raises(UsageError, match=r"mrisynth\[onnx\]"):
        OnnxModel(onnx_path)
    with pytest.raises(UsageError, match=r"mrisynth\[onnx\]"):
        export_onnx(checkpoint, tmp_path / "x.onnx")


def test_a_model_whose_graph_only_works_at_the_example_size_is_refused(tmp_path):
    """vae_unet's adaptive pooling before its fully connected latent is fixed at export time."""
    checkpoint = tiny_checkpoint(tmp_path / "seed.pt", model="vae_unet", target="flair", latent_dim=8)
    with pytest.raises(DataError, match="does not export to an ONNX graph that works at every slice size"):
        export_onnx(checkpoint, tmp_path / "seed.onnx")
    assert not (tmp_path / "seed.onnx").exists()


def test_an_exported_graph_carries_the_checkpoints_calibration(tmp_path):
    from mrisynth.calibration import LEVELS, Calibration

    plain = Synthesizer.from_checkpoint(tiny_checkpoint(tmp_path / "plain.pt"), device="cpu")
    template = list(np.linspace(0.0, 0.8, len(LEVELS)) ** 2)
    calibration = Calibration({"flair": template}, ["flair"])
    checkpoint = save_checkpoint(tmp_path / "cal.pt", {
        **checkpoint_metadata(plain.model, "any", PreprocessConfig(min_window=32).to_dict(), calibration=calibration.to_dict()),
        "state_dict": plain.model.state_dict()})
    onnx_synth = Synthesizer.from_checkpoint(export_onnx(checkpoint, tmp_path / "cal.onnx"), device="cpu")
    assert onnx_synth.calibration is not None and onnx_synth.calibration.enabled == ["flair"]
    case = write_case(tmp_path / "data", modalities=("t1", "t1ce", "t2"), shape=(40, 48, 12))
    from mrisynth.cases import find_case

    torch_result = Synthesizer.from_checkpoint(checkpoint, device="cpu").predict(find_case(case))
    onnx_result = onnx_synth.predict(find_case(case))
    assert onnx_result.calibrated and torch_result.calibrated
    np.testing.assert_allclose(onnx_result.volume, torch_result.volume, atol=1e-4)


def test_an_exported_context_model_keeps_its_context(tmp_path):
    """A 2.5D checkpoint's export records its context slices, so ONNX Runtime gets the same wide input."""
    torch.manual_seed(0)
    net = build_model("lite_vae_unet", in_channels=in_channels_for("any", 1), base_channels=4)
    checkpoint = save_checkpoint(tmp_path / "ctx.pt", {
        **checkpoint_metadata(net, "any", PreprocessConfig(min_window=32).to_dict(), context_slices=1),
        "state_dict": net.state_dict()})
    onnx_synth = Synthesizer.from_checkpoint(export_onnx(checkpoint, tmp_path / "ctx.onnx"), device="cpu")
    assert onnx_synth.context == 1
    case = write_case(tmp_path / "data", modalities=("t1", "t1ce", "t2"), shape=(40, 48, 12))
    from mrisynth.cases import find_case

    torch_result = Synthesizer.from_checkpoint(checkpoint, device="cpu").predict(find_case(case))
    np.testing.assert_allclose(onnx_synth.predict(find_case(case)).volume, torch_result.volume, atol=1e-4)
