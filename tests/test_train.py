"""Tests of training: config, patient split, beta warm-up, checkpoints, resume, NaN stop, CLI, DDP.

Every run uses a tiny VAE-UNet (base 4 channels, 8-d latent on a 2x2 grid) on 32x32 crops of
48x48x32 synthetic cases, 8 slices per epoch, one torch thread: well under a second per epoch.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torchmetrics.functional.image import structural_similarity_index_measure

import mrisynth.train as train_mod
from conftest import write_case
from mrisynth.cases import Case
from mrisynth.checkpoint import build_model_from_checkpoint, load_checkpoint
from mrisynth.cli import main
from mrisynth.errors import DataError, UsageError
from mrisynth.train import (
    EpochSampler,
    TrainingDiverged,
    beta_at,
    default_config,
    lr_at,
    load_config_file,
    merge_config,
    resolve_config,
    split_patients,
    train,
)

TINY = {
    "model_options": {"base_channels": 4, "latent_dim": 8, "latent_grid": 2},
    "crop": 32,
    "preprocess": {"min_window": 32},
    "slices_per_epoch": 8,
    "batch_size": 4,
    "epochs": 2,
    "deterministic": True,
    "device": "cpu",
}
CASE_IDS = ["Case_000", "Case_001", "Case_002"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three complete synthetic cases and one without T1CE (which training must skip)."""
    root = tmp_path_factory.mktemp("train-data")
    for i, case_id in enumerate(CASE_IDS):
        write_case(root, case_id=case_id, seed=i)
    write_case(root, case_id="Case_bad", modalities=("t1", "t2", "flair"))
    return root


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**changes) -> dict:
    return merge_config(TINY, changes)


def load_pt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- config -------------------------------------------------------------------------------------


def test_default_config_is_the_seed_recipe() -> None:
    config = resolve_config({})
    assert set(config) == set(default_config())
    expected = {"model": "vae_unet", "target": "flair", "beta": 1e-4, "beta_warmup": 0.5, "lr": 1e-4,
                "batch_size": 4, "epochs": 10, "crop": 160, "seed": 0, "slices_per_epoch": None,
                "max_minutes": None, "num_workers": 0, "deterministic": False, "histogram_weight": 0.0,
                "mse_weight": 0.0, "ssim_weight": 0.0, "lr_schedule": "constant", "calibrate": False,
                "ema_decay": 0.0, "context_slices": 0}
    assert {k: config[k] for k in expected} == expected
    assert config["preprocess"] == {"low_percentile": 1.0, "high_percentile": 99.0, "min_window": 160, "multiple": 16,
                                    "median_level": 0.0}


def test_config_file_then_flags_override_defaults(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("lr: 3e-4\nepochs: 7\ntarget: t2f\npreprocess:\n  min_window: 192\n")
    config = resolve_config(merge_config(load_config_file(path), {"epochs": 3}))
    assert config["lr"] == pytest.approx(3e-4) and isinstance(config["lr"], float)  # PyYAML reads 3e-4 as text
    assert config["epochs"] == 3
    assert config["target"] == "flair"
    assert config["preprocess"]["min_window"] == 192 and config["preprocess"]["low_percentile"] == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epoch": 3}, "unknown training setting(s) epoch"),
        ({"lr": "fast"}, "lr: expected a number"),
        ({"target": "bogus"}, "unknown modality 'bogus'"),
        ({"crop": 40}, "crop: expected a positive multiple of 16"),
        ({"epochs": 0}, "epochs: expected at least 1"),
        ({"ema_decay": 1}, "ema_decay: expected 0 (off) or more, below 1"),
        ({"context_slices": -1}, "context_slices: expected between 0 and 4"),
        ({"context_slices": 1.5}, "context_slices: expected an integer"),
        ({"batch_size": 2.5}, "batch_size: expected an integer"),
        ({"preprocess": {"window": 3}}, "unknown preprocess setting(s) window"),
        ({"crop": 176}, "larger than preprocess.min_window"),
    ],
)
def test_bad_settings_are_usage_errors(overrides: dict, message: str) -> None:
    with pytest.raises(UsageError) as info:
        resolve_config(overrides)
    assert message in str(info.value)


def test_missing_or_malformed_config_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="config file not found"):
        load_config_file(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="expected a mapping"):
        load_config_file(tmp_path / "list.yaml")


# --- split, schedule, sampler -------------------------------------------------------------------


def _cases(ids: list[str], scheme: str = "brats2020") -> list[Case]:
    return [Case(id=i, scheme=scheme, folder=Path("/x")) for i in ids]


def test_patient_split_is_deterministic_disjoint_and_complete() -> None:
    cases = _cases([f"P{i:02d}" for i in range(10)])
    split = split_patients(cases, seed=3, val_fraction=0.2)
    assert split == split_patients(list(reversed(cases)), seed=3, val_fraction=0.2)
    assert len(split["val"]) == 2 and split["seed"] == 3
    assert not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"]) == [c.id for c in cases]
    others = [split_patients(cases, seed=s, val_fraction=0.2)["val"] for s in range(4, 10)]
    assert any(v != split["val"] for v in others)
    assert len(split_patients(cases, seed=0, val_fraction=0.01)["val"]) == 1  # at least one
    assert len(split_patients(cases, seed=0, val_fraction=0.2, val_cases=4)["val"]) == 4


def test_timepoints_of_one_patient_stay_on_one_side() -> None:
    ids = [f"BraTS-GLI-{p:05d}-{t:03d}" for p in range(6) for t in range(2)]
    for seed in range(5):
        split = split_patients(_cases(ids, "brats2023"), seed=seed, val_fraction=0.3)
        val_patients = {i[:-4] for i in split["val"]}
        assert not val_patients & {i[:-4] for i in split["train"]}
        assert len(split["val"]) == 2 * len(val_patients)


def test_split_needs_two_patients() -> None:
    with pytest.raises(DataError, match="at least 2 patients"):
        split_patients(_cases(["A"]), seed=0, val_fraction=0.2)
    with pytest.raises(UsageError, match="leave none"):
        split_patients(_cases(["A", "B"]), seed=0, val_fraction=0.2, val_cases=2)


def test_beta_warms_up_linearly_over_the_first_half() -> None:
    beta = 1e-4
    assert beta_at(0, 100, beta, 0.5) == 0.0
    assert beta_at(25, 100, beta, 0.5) == pytest.approx(5e-5)
    assert beta_at(50, 100, beta, 0.5) == pytest.approx(beta)
    assert beta_at(99, 100, beta, 0.5) == pytest.approx(beta)
    assert beta_at(0, 100, beta, 0.0) == beta


def test_cosine_schedule_falls_from_lr_to_zero_and_constant_stays() -> None:
    assert lr_at(0, 100, 1e-3, "cosine") == pytest.approx(1e-3)
    assert lr_at(50, 100, 1e-3, "cosine") == pytest.approx(5e-4)
    assert lr_at(100, 100, 1e-3, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_at(150, 100, 1e-3, "cosine") == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    assert lr_at(50, 100, 1e-3, "constant") == 1e-3


def test_training_uses_the_schedule_step_by_step(data_root: Path, tmp_path: Path) -> None:
    train(tiny(lr_schedule="cosine", lr=1e-3), data_root, tmp_path / "cos")
    state = load_pt(tmp_path / "cos" / "last.pt")["train_state"]
    last_step = state["global_step"] - 1
    expected = lr_at(last_step, last_step + 1, 1e-3, "cosine")  # the run's total is its last step + 1
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected)
    assert expected < 1e-3
    with pytest.raises(UsageError, match="lr_schedule"):
        resolve_config({"lr_schedule": "linear"})


def test_epoch_sampler_draws_k_per_epoch_sharded_and_resumable() -> None:
    sampler = EpochSampler(20, per_epoch=7, seed=1)
    first = list(sampler)
    assert len(first) == 7 == len(sampler) and len(set(first)) == 7
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0, skip=3)
    assert list(sampler) == first[3:] and len(sampler) == 4
    shards = [list(EpochSampler(20, per_epoch=7, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4  # padded to 8
    assert set(shards[0] + shards[1]) == set(first)
    assert len(list(EpochSampler(5, per_epoch=12))) == 12  # more than one pass


# --- a training run -----------------------------------------------------------------------------


def test_training_writes_a_complete_run_folder(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    best = train(tiny(), data_root, run)
    out = capsys.readouterr().out
    assert "skipping Case_bad: missing t1ce" in out
    assert out.count("epoch ") >= 2 and "val L1" in out and "PSNR" in out and "SSIM" in out

    assert best == run / "best.pt"
    for name in ("config.yaml", "splits.json", "metrics.csv", "last.pt", "last.prev.pt", "best.pt", "best.safetensors", "best.json"):
        assert (run / name).is_file(), name
    assert yaml.safe_load((run / "config.yaml").read_text()) == resolve_config(tiny())
    split = json.loads((run / "splits.json").read_text())
    assert split["seed"] == 0 and sorted(split["train"] + split["val"]) == CASE_IDS
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["epoch"]) for r in rows] == [1.0, 2.0]
    assert list(rows[0]) == ["epoch", "step", "train_l1", "train_kl", "beta", "val_l1", "val_psnr", "val_ssim", "seconds", "slices_per_s"]
    assert 0 < float(rows[1]["val_ssim"]) <= 1 and float(rows[1]["val_psnr"]) > 0

    checkpoint = load_pt(run / "last.pt")  # tensors and plain types only
    assert checkpoint["format"] == "mrisynth-checkpoint" and checkpoint["target"] == "flair"
    assert checkpoint["model"] == {"name": "vae_unet", "in_channels": 3, "out_channels": 1, **TINY["model_options"]}
    assert checkpoint["preprocess"]["min_window"] == 32
    assert checkpoint["data"]["train_cases"] == split["train"] and len(checkpoint["data"]["sha256"]) == 64
    assert set(checkpoint["versions"]) == {"mrisynth", "torch", "python"}
    assert set(checkpoint["metrics"]) >= {"val_l1", "val_psnr", "val_ssim"}
    state = checkpoint["train_state"]
    assert (state["epoch"], state["global_step"], state["batch_in_epoch"]) == (2, 4, 0)
    rng = state["rng"][0]
    assert isinstance(rng["torch"], torch.Tensor) and isinstance(rng["numpy"]["state"]["key"], list)
    assert load_pt(run / "last.prev.pt")["train_state"]["epoch"] == 1

    model = build_model_from_checkpoint(load_checkpoint(run / "best.pt"))
    pred, _, _ = model(torch.rand(1, 3, 32, 32))
    assert pred.shape == (1, 1, 32, 32)
    exported = load_checkpoint(run / "best.safetensors")
    assert_same_weights(exported["state_dict"], load_pt(run / "best.pt")["state_dict"])
    assert exported["config"]["crop"] == 32


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_is_bit_identical_to_an_uninterrupted_run(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ema_decay: float
) -> None:
    config = tiny(epochs=4, ema_decay=ema_decay)
    train(config, data_root, tmp_path / "whole")
    whole = load_pt(tmp_path / "whole" / "last.pt")

    # killed right after the epoch-2 checkpoint, then resumed
    real_save, saves = train_mod.save_run_checkpoints, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_run_checkpoints", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config, data_root, tmp_path / "killed")
    monkeypatch.setattr(train_mod, "save_run_checkpoints", real_save)
    train({"epochs": 4}, data_root, tmp_path / "killed", resume=True)
    assert_same_weights(load_pt(tmp_path / "killed" / "last.pt")["state_dict"], whole["state_dict"])

    # out of time after the first step, mid-epoch, then resumed without a budget
    train(tiny(epochs=4, max_minutes=0, ema_decay=ema_decay), data_root, tmp_path / "budget")
    stopped = load_pt(tmp_path / "budget" / "last.pt")["train_state"]
    assert (stopped["epoch"], stopped["batch_in_epoch"], stopped["global_step"]) == (0, 1, 1)
    train({"max_minutes": None}, data_root, tmp_path / "budget", resume=True)
    resumed = load_pt(tmp_path / "budget" / "last.pt")
    assert resumed["train_state"]["global_step"] == whole["train_state"]["global_step"] == 8
    assert_same_weights(resumed["state_dict"], whole["state_dict"])
    if ema_decay:  # the trained weights behind the average resume exactly too
        assert_same_weights(resumed["train_state"]["net"], whole["train_state"]["net"])


def test_weight_average_decay_and_update() -> None:
    assert train_mod.ema_decay_at(0, 0.999) == pytest.approx(0.1)  # early steps: mostly the current weights
    assert train_mod.ema_decay_at(10**6, 0.999) == 0.999
    average, net = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    average.register_buffer("count", torch.tensor(1))
    net.register_buffer("count", torch.tensor(7))
    before = average.weight.detach().clone()
    train_mod.update_average(average, net, 0.75)
    assert torch.allclose(average.weight, 0.75 * before + 0.25 * net.weight)
    assert average.count.item() == 7  # integer buffers are copied, not averaged


def test_weight_average_is_validated_and_saved_without_changing_training(data_root: Path, tmp_path: Path) -> None:
    train(tiny(), data_root, tmp_path / "plain")
    train(tiny(ema_decay=0.9), data_root, tmp_path / "ema")
    plain, ema = load_pt(tmp_path / "plain" / "last.pt"), load_pt(tmp_path / "ema" / "last.pt")
    assert plain["train_state"]["net"] is None
    assert_same_weights(ema["train_state"]["net"], plain["state_dict"])  # the average never feeds back
    assert any(not torch.equal(ema["state_dict"][k], plain["state_dict"][k]) for k in plain["state_dict"])
    assert ema["metrics"]["val_l1"] != plain["metrics"]["val_l1"]  # validation scored the average


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_loss, calls = train_mod.loss_terms, []

    def nan_at_third_step(*args):
        calls.append(1)
        l1, kl = real_loss(*args)
        return (l1 * float("nan"), kl) if len(calls) == 3 else (l1, kl)

    monkeypatch.setattr(train_mod, "loss_terms", nan_at_third_step)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        train(tiny(epochs=3), data_root, run)
    message = str(info.value)
    assert "not finite at epoch 2, step 3" in message and "\n" not in message
    last = load_checkpoint(run / "last.pt")
    assert last["train_state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 2  # header + epoch 1


def test_truncated_last_falls_back_to_the_previous_one(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    train(tiny(), data_root, run)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    train({"epochs": 3, "lr": 1.0}, data_root, run, resume=True)
    out = capsys.readouterr().out
    fallback = [line for line in out.splitlines() if "last.prev.pt" in line]
    assert len(fallback) == 1 and "truncated" in fallback[0]
    assert "ignoring lr=1.0" in out
    last = load_pt(run / "last.pt")
    assert last["train_state"]["epoch"] == 3 and last["config"]["lr"] == 1e-4
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + 2 + 2  # epochs 1, 2, then 2, 3 again


def test_a_run_folder_is_never_overwritten_and_resume_needs_one(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nothing to resume"):
        train(tiny(), data_root, tmp_path / "empty", resume=True)
    train(tiny(epochs=1), data_root, tmp_path / "run")
    with pytest.raises(UsageError, match="add --resume"):
        train(tiny(epochs=1), data_root, tmp_path / "run")


# --- command line -------------------------------------------------------------------------------


def test_cli_train_exit_codes(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["train", "--data", str(data_root), "--out", str(run), "--config", str(config), "--epochs", "1", "--lr", "2e-4"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 2e-4
    assert (run / "best.pt").is_file()

    capsys.readouterr()
    assert main(["train", "--data", str(data_root), "--out", str(tmp_path / "r2"), "--target", "bogus"]) == 2
    assert "mrisynth train: error: target: unknown modality 'bogus'" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "r3"), "--config", str(config)]) == 2
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "r4")])
    assert info.value.code == 2
    if not torch.cuda.is_available():
        assert main(["train", "--data", str(data_root), "--out", str(tmp_path / "r5"), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_cpu_processes(data_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(epochs=1)))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mrisynth.cli", "train", "--data", str(data_root), "--out", str(run), "--config", str(config),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 1/1") == 1  # only rank 0 prints
    checkpoint = load_pt(run / "best.pt")
    assert checkpoint["format"] == "mrisynth-checkpoint" and checkpoint["model"]["name"] == "vae_unet"
    assert checkpoint["train_state"]["world_size"] == 2 and len(checkpoint["train_state"]["rng"]) == 2
    assert checkpoint["train_state"]["global_step"] == 1  # 8 slices = 2 ranks x 1 batch of 4
    assert checkpoint["data"]["train_cases"] == json.loads((run / "splits.json").read_text())["train"]
    assert np.isfinite(checkpoint["metrics"]["val_l1"])
    build_model_from_checkpoint(load_checkpoint(run / "best.pt"))


def test_a_model_recipe_sits_between_the_defaults_and_the_user_settings():
    from mrisynth.train import model_recipe, resolve_config

    recipe = model_recipe("lite_vae_unet")
    assert recipe and model_recipe("vae_unet") == {}
    config = resolve_config({"model": "lite_vae_unet"})
    assert (config["target"], config["lr"], config["batch_size"]) == ("any", recipe["lr"], recipe["batch_size"])
    assert config["preprocess"]["median_level"] == recipe["preprocess"]["median_level"] > 0
    assert config["mse_weight"] == recipe["mse_weight"] > 0 and resolve_config({})["mse_weight"] == 0
    assert config["ema_decay"] == recipe["ema_decay"] > 0 and resolve_config({})["ema_decay"] == 0
    assert resolve_config({"model": "vae_unet"})["preprocess"]["median_level"] == 0  # the seed keeps its scaling
    assert resolve_config({"model": "lite_vae_unet", "lr": 1e-3, "target": "flair"})["lr"] == 1e-3
    seed = resolve_config({})
    assert (seed["model"], seed["target"], seed["lr"], seed["batch_size"]) == ("vae_unet", "flair", 1e-4, 4)


def test_a_run_folder_in_use_by_another_process_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    import subprocess

    from mrisynth.errors import UsageError
    from mrisynth.train import run_folder_lock

    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / ".train.lock").write_text(str(other.pid))
        with pytest.raises(UsageError, match="another mrisynth train"):
            with run_folder_lock(run, is_main=True):
                pass
    finally:
        other.kill()
        other.wait()
    with run_folder_lock(run, is_main=True):  # the owner is gone: its lock is stale
        assert (run / ".train.lock").read_text() == str(os.getpid())
    assert not (run / ".train.lock").exists()


# --- predicted Laplace scale ---------------------------------------------------------------------


def test_laplace_nll_is_lowest_at_the_true_error_size_and_leaves_the_mean_alone() -> None:
    from mrisynth.train import laplace_nll

    target = torch.zeros(1, 1, 4, 4)
    mean = torch.full((1, 1, 4, 4), 0.2, requires_grad=True)
    nll = {b: float(laplace_nll(mean, torch.full_like(target, math.log(b)), target)) for b in (0.05, 0.2, 0.8)}
    assert nll[0.2] < nll[0.05] and nll[0.2] < nll[0.8]  # minimised where b equals |error|
    log_scale = torch.zeros_like(target, requires_grad=True)
    laplace_nll(mean, log_scale, target).backward()
    assert mean.grad is None and log_scale.grad is not None and log_scale.grad.abs().sum() > 0


def test_a_scale_model_trains_and_its_checkpoint_keeps_the_scale_head(data_root: Path, tmp_path: Path) -> None:
    config = {**tiny(model="lite_vae_unet", target="any"), "model_options": {"base_channels": 4, "predict_scale": True}}
    best = train(config, data_root, tmp_path / "run")
    checkpoint = load_checkpoint(best)
    assert checkpoint["model"]["predict_scale"] is True
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert all(math.isfinite(float(r["val_l1"])) for r in rows)
    model = build_model_from_checkpoint(checkpoint)
    pred, _, _ = model.eval()(torch.rand(1, 8, 32, 32), sample=True)
    assert pred.shape == (1, 2, 32, 32)


def test_a_context_model_trains_on_neighbouring_slices_and_predicts_with_them(data_root: Path, tmp_path: Path) -> None:
    """2.5D end to end: the checkpoint records the context, its network takes the wider input, and
    prediction (which reads the context from the checkpoint) synthesizes a full case with it."""
    from mrisynth.cases import discover_cases
    from mrisynth.predict import Synthesizer

    config = {**tiny(model="lite_vae_unet", target="any", context_slices=1), "model_options": {"base_channels": 4}}
    best = train(config, data_root, tmp_path / "run")
    checkpoint = load_checkpoint(best)
    assert checkpoint["context_slices"] == 1 and checkpoint["model"]["in_channels"] == 16
    synthesizer = Synthesizer.from_checkpoint(best, device="cpu")
    assert synthesizer.context == 1
    case = discover_cases(data_root)[0]
    result = synthesizer.predict(case, missing="flair")
    assert result.volume.shape == nib.load(case.modalities["t1"]).shape and np.isfinite(result.volume).all()


def test_histogram_l1_compares_intensity_distributions_not_positions() -> None:
    from mrisynth.train import histogram_l1

    target = torch.tensor([[[[0.0, 0.2], [0.6, 1.0]]]])
    shuffled = target.flatten()[[3, 0, 2, 1]].reshape(target.shape)
    assert float(histogram_l1(shuffled, target)) == 0.0  # same values elsewhere: no histogram penalty
    compressed = 0.5 + 0.5 * (target - 0.5)  # right order, tails pulled towards the middle
    assert float(histogram_l1(compressed, target)) == pytest.approx(float(F.l1_loss(compressed, target)))
    assert float(histogram_l1(compressed, target)) > 0.1


def test_ssim_loss_is_zero_for_a_match_and_penalises_lost_edges_more_than_l1_does() -> None:
    from mrisynth.train import ssim_loss

    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    target = (((rows // 8 + cols // 8) % 2) * 0.8).float().expand(2, 1, 32, 32)  # 8-pixel checkerboard
    assert float(ssim_loss(target, target)) == pytest.approx(0.0, abs=1e-6)
    blurred = F.avg_pool2d(target, 3, stride=1, padding=1, count_include_pad=False)  # edges softened
    brighter = target + 0.1  # same structure, a constant offset
    assert float(F.l1_loss(blurred, target)) < float(F.l1_loss(brighter, target))  # L1 prefers the blur ...
    assert float(ssim_loss(blurred, target)) > float(ssim_loss(brighter, target))  # ... SSIM the structure
    reference = 1 - structural_similarity_index_measure(blurred, target, data_range=1.0)  # torchmetrics pads the border
    assert float(ssim_loss(blurred, target)) == pytest.approx(float(reference), abs=0.02)
    pred = blurred.clone().requires_grad_(True)
    ssim_loss(pred, target).backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0


@pytest.mark.parametrize("setting, owner, term", [("histogram_weight", train_mod, "histogram_l1"),
                                                   ("mse_weight", train_mod.F, "mse_loss"),
                                                   ("ssim_weight", train_mod, "ssim_loss")])
def test_a_loss_weight_adds_its_term_only_when_set(setting, owner, term, data_root: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []
    real = getattr(owner, term)
    monkeypatch.setattr(owner, term, lambda p, t: calls.append(1) or real(p, t))
    train(tiny(**{setting: 0.5}), data_root, tmp_path / "on")
    assert calls
    calls.clear()
    train(tiny(), data_root, tmp_path / "off")
    assert not calls
    with pytest.raises(UsageError, match=setting):
        train(tiny(**{setting: -1}), data_root, tmp_path / "bad")


def test_resuming_a_run_saved_before_a_setting_existed_keeps_that_settings_default() -> None:
    """An old lite_vae_unet run lacks preprocess.median_level: resuming it must not pick it up from
    today's recipe (that would change its preprocessing)."""
    from mrisynth.train import resolve_config, resume_config

    saved = resolve_config({"model": "lite_vae_unet"})
    del saved["preprocess"]["median_level"], saved["histogram_weight"]
    resumed = resume_config(saved, {"epochs": 3}, log=lambda _: None)
    assert resumed["preprocess"]["median_level"] == 0
    assert resumed["histogram_weight"] == 0 and resumed["epochs"] == 3
    assert resolve_config({"model": "lite_vae_unet"})["preprocess"]["median_level"] == 0.25  # a new run gets the recipe
