"""benchmarks/quality.py: a finished training run is reused only when it learned with the settings asked for."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality  # noqa: E402
from mrisynth.checkpoint import checkpoint_metadata, save_checkpoint  # noqa: E402
from mrisynth.dataset import in_channels_for  # noqa: E402
from mrisynth.models import build_model  # noqa: E402
from mrisynth.train import resolve_config  # noqa: E402

ASKED = {"model": "lite_vae_unet", "target": "any", "max_minutes": 1.0, "epochs": 2, "val_slices": 8, "device": "cpu"}


def finished_run(folder: Path, saved_config: dict) -> dict:
    """What quality.py's training marker records, with a real checkpoint holding ``saved_config``."""
    net = build_model("lite_vae_unet", in_channels_for("any"), base_channels=4)
    path = save_checkpoint(folder / "best.pt", {
        **checkpoint_metadata(net, "any", saved_config["preprocess"], config=saved_config), "state_dict": net.state_dict()})
    return {"run_dir": str(folder), "checkpoint": str(path), "config": dict(ASKED), "train_cases": ["a"], "val_cases": ["b"]}


def test_a_run_trained_with_the_asked_settings_is_reused(tmp_path: Path) -> None:
    saved = resolve_config(ASKED)
    quality.check_reusable(finished_run(tmp_path, saved), dict(ASKED), ["b", "a"])  # no exit
    older = {k: v for k, v in saved.items() if k != "context_slices"}  # saved before the setting existed: its default
    quality.check_reusable(finished_run(tmp_path, older), dict(ASKED), ["a", "b"])
    quality.check_reusable(finished_run(tmp_path, {**saved, "num_workers": 2}), dict(ASKED), ["a", "b"])


@pytest.mark.parametrize("key, value", [("ema_decay", 0.0), ("ssim_weight", 1.0), ("context_slices", 1), ("mse_weight", 0.0)])
def test_a_run_that_learned_with_another_setting_is_not_reused(tmp_path: Path, key: str, value) -> None:
    saved = resolve_config(ASKED)
    assert saved[key] != value  # the recipe asks for something else
    with pytest.raises(SystemExit, match="trained with other settings"):
        quality.check_reusable(finished_run(tmp_path, {**saved, key: value}), dict(ASKED), ["a", "b"])


def test_a_training_seed_reaches_the_run_and_a_run_of_another_seed_is_not_reused(tmp_path: Path) -> None:
    default = quality.training_config("vae_unet", "t1", quality.parse_args([]))
    assert "seed" not in default and resolve_config(default)["seed"] == 0  # markers written before the option still match
    asked = quality.training_config("lite_vae_unet", "any", quality.parse_args(["--train-seed", "1", "--minutes", "1",
                                                                                "--epochs", "2", "--val-slices", "8"]))
    assert asked == {**ASKED, "seed": 1} and resolve_config(asked)["seed"] == 1
    seed0 = resolve_config(ASKED)
    with pytest.raises(SystemExit, match="trained with other settings"):
        quality.check_reusable(finished_run(tmp_path, seed0), asked, ["a", "b"])
    run = finished_run(tmp_path, {**seed0, "seed": 1})
    quality.check_reusable({**run, "config": asked}, asked, ["a", "b"])  # the same seed: reused
