"""Tests of ``mrisynth.predict`` and ``mrisynth predict``: tiny untrained models, small synthetic cases."""
from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BRATS_AFFINE, write_case
from mrisynth.cases import Case, find_case
from mrisynth.checkpoint import checkpoint_metadata, export_safetensors, save_checkpoint
from mrisynth.cli import main
from mrisynth.dataset import assemble_input, in_channels_for
from mrisynth.errors import DataError, UsageError
from mrisynth.io import read_images
from mrisynth.models import build_model
from mrisynth.predict import AUGMENTATIONS, Synthesizer, augment, output_path, predict_folder, unaugment
from mrisynth.preprocess import PreprocessConfig, brain_mask, prepare

SHAPE = (48, 56, 20)  # not 160, not square: the window is 48x64 with min_window=32
THREE = ("t1", "t1ce", "t2")


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """--threads sets torch's process-wide thread count: give other test files theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_checkpoint(path: Path, target: str) -> Path:
    """A tiny untrained model saved as a real checkpoint (BatchNorm given non-trivial statistics)."""
    torch.manual_seed(0)
    model = build_model("vae_unet", in_channels=in_channels_for(target), base_channels=4, latent_dim=8, latent_grid=2)
    for module in model.modules():  # eval-mode BN with default stats is the identity: make it matter
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():  # an untrained latent barely reaches the output: make posterior samples differ
        model.fc_logvar.bias.fill_(2.0)
        model.fc_decode.weight.mul_(20.0)
    config = PreprocessConfig(min_window=32)
    checkpoint = {**checkpoint_metadata(model, target, config.to_dict()), "state_dict": model.state_dict()}
    return save_checkpoint(path, checkpoint)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    return {t: make_checkpoint(folder / f"{t}.pt", t) for t in ("flair", "any")}


@pytest.fixture(scope="module")
def flair_model(checkpoints) -> Synthesizer:
    return Synthesizer.from_checkpoint(checkpoints["flair"], device="cpu")


@pytest.fixture(scope="module")
def any_model(checkpoints) -> Synthesizer:
    return Synthesizer.from_checkpoint(checkpoints["any"], device="cpu")


def three_inputs(case_factory, **kw) -> Path:
    return case_factory(shape=SHAPE, modalities=THREE, **kw)


# --- which modality ------------------------------------------------------------------------


def test_auto_detects_the_one_missing_modality(case_factory, any_model) -> None:
    case = find_case(case_factory(shape=SHAPE, modalities=("t1", "t2", "flair")))
    result = any_model.predict(case)
    assert result.modality == "t1ce"


def test_auto_refuses_zero_or_two_missing(case_factory, any_model) -> None:
    full = find_case(case_factory(case_id="Full", shape=SHAPE))
    with pytest.raises(DataError, match=r"Full.*found t1, t1ce, t2, flair \(0 missing"):
        any_model.predict(full)
    two = find_case(case_factory(case_id="Two", shape=SHAPE, modalities=("t1", "t2")))
    with pytest.raises(DataError) as info:
        any_model.predict(two)
    message = str(info.value)
    assert "\n" not in message and str(two.folder) in message and "found t1, t2 (2 missing" in message


def test_explicit_missing_ignores_the_present_file(tmp_path, any_model) -> None:
    full = find_case(write_case(tmp_path / "a", shape=SHAPE))
    without = find_case(write_case(tmp_path / "b", shape=SHAPE, modalities=THREE))
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32) * 7, np.eye(4)), str(full.modalities["flair"]))
    got = any_model.predict(full, missing="t2f")  # alias of flair; the (different) flair file is ignored
    expected = any_model.predict(without)
    assert got.modality == "flair"
    np.testing.assert_array_equal(got.volume, expected.volume)


def test_fixed_target_model_refuses_other_modalities(case_factory, flair_model) -> None:
    case = find_case(case_factory(shape=SHAPE))
    with pytest.raises(UsageError, match="trained to synthesize flair only"):
        flair_model.predict(case, missing="t1")
    lacking_t1 = find_case(case_factory(case_id="NoT1", shape=SHAPE, modalities=("t1ce", "t2", "flair")))
    with pytest.raises(DataError, match="trained to synthesize flair only"):
        flair_model.predict(lacking_t1)
    assert flair_model.predict(case, missing="flair").modality == "flair"


# --- the output volume ---------------------------------------------------------------------


def test_output_grid_header_dtype_and_zero_background(case_factory, flair_model, tmp_path) -> None:
    folder = three_inputs(case_factory)
    out = tmp_path / "out"
    report = predict_folder(folder, out, synthesizer=flair_model, progress=False)
    assert report.exit_code == 0 and [p.name for p in report.written] == ["Case_001_flair.nii.gz"]
    written = nib.load(str(report.written[0]))
    source = nib.load(str(folder / "Case_001_t1.nii.gz"))
    assert written.shape == SHAPE
    assert written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(written.affine, source.affine)
    for form in ("get_qform", "get_sform"):
        m_out, code_out = getattr(written.header, form)(coded=True)
        m_in, code_in = getattr(source.header, form)(coded=True)
        assert int(code_out) == int(code_in)
        np.testing.assert_allclose(m_out, m_in)
    data = np.asarray(written.dataobj)
    inputs = [np.asarray(nib.load(str(folder / f"Case_001_{m}.nii.gz")).dataobj) for m in THREE]
    mask = brain_mask(inputs)
    assert np.all(data[~mask] == 0)
    assert data.min() >= 0 and data.max() <= 1 and np.all(data[mask] > 0)


def test_output_name_keeps_the_brats2023_scheme(case_factory, flair_model, tmp_path) -> None:
    folder = case_factory(case_id="BraTS-GLI-00001-000", scheme="brats2023", shape=SHAPE, modalities=THREE)
    report = predict_folder(folder, tmp_path / "out", synthesizer=flair_model, progress=False)
    assert [p.name for p in report.written] == ["BraTS-GLI-00001-000-t2f.nii.gz"]


def test_ras_input_overlays_the_lps_result(tmp_path, flair_model) -> None:
    lps = find_case(write_case(tmp_path / "lps", shape=SHAPE, modalities=THREE))
    # the same images stored RAS: x and y voxel order reversed, affine adjusted so world points agree
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [SHAPE[0] - 1, SHAPE[1] - 1]
    ras_affine = BRATS_AFFINE @ flip
    ras_dir = tmp_path / "ras" / "Case_001"
    ras_dir.mkdir(parents=True)
    for m, path in lps.modalities.items():
        data = np.asarray(nib.load(str(path)).dataobj)[::-1, ::-1, :]
        img = nib.Nifti1Image(np.ascontiguousarray(data), ras_affine)
        img.set_qform(ras_affine, code=1)
        img.set_sform(ras_affine, code=1)
        nib.save(img, str(ras_dir / path.name))
    ras = find_case(ras_dir)
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    a = flair_model.predict(lps).volume
    b = flair_model.predict(ras).volume
    np.testing.assert_allclose(b[::-1, ::-1, :], a, atol=1e-6)


def test_batch_size_does_not_change_the_result(case_factory, any_model) -> None:
    case = find_case(three_inputs(case_factory))
    one = any_model.predict(case, batch_size=1).volume
    many = any_model.predict(case, batch_size=64).volume
    np.testing.assert_allclose(one, many, rtol=0, atol=1e-6)


def test_samples_give_a_std_map_inside_the_brain(case_factory, any_model, tmp_path) -> None:
    folder = three_inputs(case_factory)
    report = predict_folder(folder, tmp_path / "out", samples=2, synthesizer=any_model, progress=False)
    names = sorted(p.name for p in report.written)
    assert names == ["Case_001_flair.nii.gz", "Case_001_flair_std.nii.gz"]
    std = np.asarray(nib.load(str(tmp_path / "out" / "Case_001_flair_std.nii.gz")).dataobj)
    mean = np.asarray(nib.load(str(tmp_path / "out" / "Case_001_flair.nii.gz")).dataobj)
    brain = mean > 0
    assert std.dtype == np.float32
    assert np.all(std[~brain] == 0)
    assert np.mean(std[brain] > 0) > 0.99


def test_predictive_std_adds_the_predicted_laplace_variance_to_the_spread_of_the_samples() -> None:
    from mrisynth.predict import predictive_std

    means = torch.tensor([0.2, 0.4, 0.6]).reshape(3, 1, 1, 1, 1).expand(3, 1, 1, 2, 2)  # [K, B, C, H, W]
    spread = predictive_std(means)
    assert torch.allclose(spread, torch.full((1, 2, 2), 0.2))  # unbiased std of 0.2, 0.4, 0.6
    log_b = torch.full_like(means, math.log(0.1))
    with_scale = predictive_std(torch.cat([means, log_b], dim=2))
    assert torch.allclose(with_scale, torch.full((1, 2, 2), math.sqrt(0.04 + 2 * 0.01)))


class _PixelwiseModel(torch.nn.Module):
    """Output = a per-pixel function of the input: mirroring or moving the slice cannot change it."""

    def forward(self, x: torch.Tensor, sample: bool = False):
        return torch.sigmoid(x[:, :1] * 3.0 - 1.0), None, None


class _PositionModel(_PixelwiseModel):
    """Output depends on where a pixel sits in the slice (a left-to-right ramp)."""

    def forward(self, x: torch.Tensor, sample: bool = False):
        ramp = torch.linspace(0.0, 0.5, x.shape[-2]).view(1, 1, -1, 1)
        return torch.sigmoid(x[:, :1] * 3.0 - 1.0 + ramp), None, None


@pytest.mark.parametrize("k", range(len(AUGMENTATIONS)))
def test_every_test_time_augmentation_is_undone_exactly(k) -> None:
    flip, shift = AUGMENTATIONS[k]
    x = torch.rand(2, 3, 16, 24)
    back = unaugment(augment(x, flip, shift), flip, shift)
    assert torch.equal(back, x)
    assert k == 0 or not torch.equal(augment(x, flip, shift), x)  # only the first draw sees the slice as is


def test_the_flip_mirrors_left_right() -> None:
    """Slices are [..., H, W] with H along LPS x (left-right): the flip must reverse that axis,
    not front-back (a brain mirrored front-back is nothing the network has seen)."""
    volume = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None], (40, 48, 8)).copy()  # value = x index
    mask = np.ones(volume.shape, dtype=bool)
    layout = prepare({"t1": volume}, BRATS_AFFINE, PreprocessConfig(min_window=32), mask).layout
    slices = torch.from_numpy(layout.to_slices(volume))  # [Z, H, W]
    flipped = augment(slices, True, (0, 0))
    assert not torch.equal(slices[:, :, 0], slices[:, :, 0].flip(-1))  # the ramp runs along H
    assert torch.equal(flipped[:, :, 0], slices[:, :, 0].flip(-1))  # ... and the flip reverses it


def test_augmented_draws_agree_for_a_pixelwise_model_and_differ_where_position_matters(case_factory, any_model) -> None:
    case = find_case(three_inputs(case_factory))
    config, device = any_model.config, any_model.device
    pixelwise = Synthesizer(_PixelwiseModel(), "any", config, device)
    single = pixelwise.predict(case).volume
    sampled = pixelwise.predict(case, samples=8)
    np.testing.assert_allclose(sampled.volume, single, atol=1e-6)  # every augmentation undone exactly
    assert np.abs(sampled.std).max() < 1e-6
    positional = Synthesizer(_PositionModel(), "any", config, device).predict(case, samples=8)
    assert np.median(positional.std[positional.volume > 0]) > 1e-3


# --- folder mode ---------------------------------------------------------------------------


def test_existing_output_is_kept_unless_overwrite(case_factory, flair_model, tmp_path, capsys) -> None:
    folder = three_inputs(case_factory)
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "Case_001_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.full(SHAPE, 5, np.float32), BRATS_AFFINE), str(existing))
    report = predict_folder(folder, out, synthesizer=flair_model, progress=False)
    assert report.skipped == ["Case_001"] and report.written == []
    assert "exists" in capsys.readouterr().err
    assert np.asarray(nib.load(str(existing)).dataobj).max() == 5
    report = predict_folder(folder, out, synthesizer=flair_model, overwrite=True, progress=False)
    assert report.written == [existing]
    assert np.asarray(nib.load(str(existing)).dataobj).max() <= 1


def test_bad_case_is_reported_and_the_others_go_on(case_factory, flair_model, tmp_path, capsys) -> None:
    case_factory(case_id="Good", shape=SHAPE, modalities=THREE)
    bad = case_factory(case_id="Bad", shape=SHAPE, modalities=THREE)
    (bad / "Bad_t2.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    report = predict_folder(case_factory.root, out, synthesizer=flair_model, progress=False)
    assert report.exit_code == 1
    assert [c for c, _ in report.failed] == ["Bad"]
    assert sorted(p.name for p in out.iterdir()) == ["Good_flair.nii.gz"]
    err = capsys.readouterr().err
    assert "failed: Bad:" in err and "Bad_t2.nii.gz" in err


def test_single_failing_case_raises_and_writes_nothing(case_factory, flair_model, tmp_path) -> None:
    bad = case_factory(case_id="Bad", shape=SHAPE, modalities=THREE)
    (bad / "Bad_t1.nii.gz").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="0-byte"):
        predict_folder(bad, out, synthesizer=flair_model, progress=False)
    assert not out.exists() or not any(out.iterdir())


def test_case_id_cannot_escape_the_output_folder(tmp_path) -> None:
    for case_id in ("../evil", "a/b", ".hidden"):
        case = Case(id=case_id, scheme="brats2020", folder=tmp_path)
        with pytest.raises(DataError):
            output_path(tmp_path / "out", case, "flair")


def test_safetensors_checkpoint_predicts_the_same(tmp_path, checkpoints, flair_model, case_factory) -> None:
    checkpoint = torch.load(checkpoints["flair"], weights_only=True)
    exported = export_safetensors(checkpoint, tmp_path / "flair.safetensors")
    other = Synthesizer.from_checkpoint(exported, device="cpu")
    case = find_case(three_inputs(case_factory))
    np.testing.assert_array_equal(other.predict(case).volume, flair_model.predict(case).volume)


# --- CLI -----------------------------------------------------------------------------------


def test_cli_exit_codes(case_factory, checkpoints, tmp_path) -> None:
    folder = three_inputs(case_factory)
    out = tmp_path / "out"
    base = ["predict", "--model", str(checkpoints["flair"]), "--input", str(folder), "--output", str(out), "--threads", "1"]
    assert main(base + ["--device", "cpu"]) == 0
    assert (out / "Case_001_flair.nii.gz").is_file()
    assert main(base) == 0  # exists: skipped, not an error
    assert main(base + ["--samples", "0"]) == 2
    assert main(base + ["--samples", "-3"]) == 2
    assert main(base + ["--batch-size", "0"]) == 2
    assert main(base + ["--threads", "0"]) == 2
    assert main(base + ["--missing", "t3"]) == 2
    assert main(base + ["--missing", "t1", "--overwrite"]) == 2  # flair-only model
    two_missing = case_factory(case_id="Two", shape=SHAPE, modalities=("t1", "t2"))
    bad = ["predict", "--model", str(checkpoints["flair"]), "--input", str(two_missing), "--output", str(out)]
    assert main(bad) == 1
    assert main(["predict", "--model", str(tmp_path / "none.pt"), "--input", str(folder), "--output", str(out)]) == 1
    with pytest.raises(SystemExit) as info:
        main(base + ["--device", "tpu"])
    assert info.value.code == 2


def test_outputs_inside_the_input_root_are_not_cases(case_factory, flair_model) -> None:
    case_factory(case_id="A", shape=SHAPE, modalities=THREE)
    case_factory(case_id="B", shape=SHAPE, modalities=THREE)
    out = case_factory.root / "synth"
    first = predict_folder(case_factory.root, out, synthesizer=flair_model, progress=False)
    again = predict_folder(case_factory.root, out, synthesizer=flair_model, progress=False)
    assert len(first.written) == 2 and again.exit_code == 0 and again.skipped == ["A", "B"]


@pytest.mark.parametrize("setting,value", [("multiple", 0), ("multiple", 24), ("min_window", 8), ("low_percentile", 99.5)])
def test_a_checkpoint_with_unworkable_preprocessing_is_refused_in_one_line(tmp_path, setting, value) -> None:
    path = make_checkpoint(tmp_path / "bad.pt", "any")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["preprocess"][setting] = value
    torch.save(checkpoint, path)
    with pytest.raises(DataError, match=f"preprocessing setting {setting}: expected"):
        Synthesizer.from_checkpoint(path, device="cpu")


# --- 2.5D input (context slices) --------------------------------------------------------------


def make_context_checkpoint(path: Path, context: int, in_channels: int | None = None) -> Path:
    torch.manual_seed(0)
    channels = in_channels or in_channels_for("any", context)
    model = build_model("lite_vae_unet", in_channels=channels, base_channels=4)
    config = PreprocessConfig(min_window=32)
    checkpoint = {**checkpoint_metadata(model, "any", config.to_dict(), context_slices=context), "state_dict": model.state_dict()}
    return save_checkpoint(path, checkpoint)


def test_a_context_model_sees_each_slice_with_its_neighbours(case_factory, tmp_path) -> None:
    """Every synthesized slice is the network's output for that brain slice and the ones on either
    side (the edge slice repeated), built exactly as training builds them."""
    synth = Synthesizer.from_checkpoint(make_context_checkpoint(tmp_path / "c.pt", 1), device="cpu")
    case = find_case(three_inputs(case_factory))
    volumes, geometry = read_images({m: case.modalities[m] for m in THREE})
    prepared = prepare(volumes, geometry.affine, synth.config, synth._mask(volumes, geometry, None))
    mean, _ = synth._infer(prepared, "flair", samples=1, batch_size=3)
    brain = prepared.brain_slices
    for position in (0, len(brain) // 2, len(brain) - 1):
        around = brain[np.clip(np.arange(position - 1, position + 2), 0, len(brain) - 1)]
        stack = torch.from_numpy(prepared.slices[:, around][None].copy())  # [1, 4, 3, H, W]
        x, _ = assemble_input(stack, torch.tensor([3]), "any")
        with torch.inference_mode():
            expected = synth.model(x)[0][0, 0].numpy()
        np.testing.assert_allclose(mean[position], expected, atol=1e-5)
    # and it is not the single-slice answer: the neighbours matter
    flat = torch.from_numpy(prepared.slices[:, brain[1:2]][None].repeat(3, axis=2).copy())
    x, _ = assemble_input(flat, torch.tensor([3]), "any")
    with torch.inference_mode():
        assert not np.allclose(mean[1], synth.model(x)[0][0, 0].numpy(), atol=1e-5)


@pytest.mark.parametrize("context, in_channels, message", [
    (1, 8, "with context_slices 1 needs 16 input channels, the checkpoint.s model has 8"),
    (-1, 8, "context_slices to be 0 or a positive integer, found -1"),
])
def test_a_checkpoint_whose_context_does_not_fit_its_model_is_refused(tmp_path, context, in_channels, message) -> None:
    path = make_context_checkpoint(tmp_path / "c.pt", context, in_channels)
    with pytest.raises(DataError, match=message):
        Synthesizer.from_checkpoint(path, device="cpu")
