"""Tests of the model registry, ``kl_divergence`` and the seed's ``vae_unet`` architecture."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import mrisynth.models as models
from mrisynth.errors import UsageError
from mrisynth.models import available_models, build_model, kl_divergence, register_model
from mrisynth.models.blocks import count_parameters

# small hyper-parameters for tests that do not need the seed's full size
SMALL = {"base_channels": 8, "latent_dim": 16, "latent_grid": 4}


@pytest.fixture(scope="module", params=[3, 8], ids=["in3", "in8"])
def full_model(request: pytest.FixtureRequest) -> nn.Module:
    """The seed-sized model, built once per channel count (building it takes a moment)."""
    torch.manual_seed(0)
    return build_model("vae_unet", in_channels=request.param)


def _input(model: nn.Module, height: int = 32, width: int = 32, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, model.config["in_channels"], height, width)


# --- registry ---------------------------------------------------------------------------


def test_vae_unet_is_registered() -> None:
    assert "vae_unet" in available_models()
    assert available_models() == sorted(available_models())


@pytest.mark.parametrize("name", ["x", "VAE_UNET", "unet", ""])
def test_unknown_name_raises_usage_error_listing_models(name: str) -> None:
    with pytest.raises(UsageError) as info:
        build_model(name, in_channels=3)
    message = str(info.value)
    assert f"unknown model '{name}'" in message
    assert "Available: " in message and "vae_unet" in message


def test_unknown_option_raises_usage_error() -> None:
    with pytest.raises(UsageError, match="latent_dimm"):
        build_model("vae_unet", in_channels=3, latent_dimm=64)


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="twice"):
        register_model("vae_unet")(nn.Identity)


def test_register_and_build_custom_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    @register_model("tiny")
    def tiny(in_channels: int, out_channels: int = 1, kernel: int = 3) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)

    model = build_model("tiny", in_channels=2)
    assert "tiny" in available_models()
    assert model.config == {"name": "tiny", "in_channels": 2, "out_channels": 1, "kernel": 3}
    assert model.kernel_size == (3, 3)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (
            {"in_channels": 3},
            {"in_channels": 3, "out_channels": 1, "base_channels": 32, "latent_dim": 128,
             "latent_grid": 10},
        ),
        (
            {"in_channels": 8, "out_channels": 2, **SMALL},
            {"in_channels": 8, "out_channels": 2, **SMALL},
        ),
    ],
    ids=["defaults", "custom"],
)
def test_config_records_all_options(kwargs: dict, expected: dict) -> None:
    model = build_model("vae_unet", **kwargs)
    assert model.config == {"name": "vae_unet", **expected}
    assert json.loads(json.dumps(model.config)) == model.config  # plain Python types


@pytest.mark.parametrize(
    "kwargs", [{"in_channels": 3}, {"in_channels": 8, "out_channels": 2, **SMALL}]
)
def test_config_rebuilds_same_architecture(kwargs: dict) -> None:
    model = build_model("vae_unet", **kwargs).eval()
    rebuilt = build_model(**json.loads(json.dumps(model.config))).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: same names and shapes
    assert rebuilt.config == model.config
    x = torch.rand(1, kwargs["in_channels"], 32, 32)
    assert torch.equal(rebuilt(x)[0], model(x)[0])


# --- vae_unet -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_channels, expected",
    [(3, 13_184_689), (8, 13_186_129)],
)
def test_parameter_count_matches_seed(in_channels: int, expected: int) -> None:
    count = count_parameters(build_model("vae_unet", in_channels=in_channels))
    print(f"vae_unet in_channels={in_channels}: {count:,} parameters")
    assert 13_000_000 <= count <= 13_400_000
    assert count == expected  # documented in the vae_unet module docstring


@pytest.mark.parametrize("height, width", [(32, 32), (64, 48), (48, 64), (192, 176)])
def test_output_shapes(full_model: nn.Module, height: int, width: int) -> None:
    full_model.eval()
    with torch.no_grad():
        pred, mu, logvar = full_model(_input(full_model, height, width))
    assert pred.shape == (2, 1, height, width)
    assert mu.shape == logvar.shape == (2, 128)


@pytest.mark.parametrize("out_channels", [1, 2])
@pytest.mark.parametrize("in_channels", [3, 8])
def test_output_channels_and_range(in_channels: int, out_channels: int) -> None:
    model = build_model("vae_unet", in_channels, out_channels, **SMALL).eval()
    with torch.no_grad():
        pred, mu, _ = model(torch.randn(2, in_channels, 32, 32) * 50)  # large input: saturates
    assert pred.shape == (2, out_channels, 32, 32)
    assert mu.shape == (2, SMALL["latent_dim"])
    assert pred.min() >= 0 and pred.max() <= 1


@pytest.mark.parametrize("height, width", [(30, 32), (32, 40), (8, 8)])
def test_size_not_multiple_of_16_fails_clearly(height: int, width: int) -> None:
    model = build_model("vae_unet", 3, **SMALL)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.rand(1, 3, height, width))


def test_eval_mode_is_deterministic(full_model: nn.Module) -> None:
    full_model.eval()
    x = _input(full_model)
    with torch.no_grad():
        first, mu1, _ = full_model(x)
        second, mu2, _ = full_model(x)
    assert torch.equal(first, second)
    assert torch.equal(mu1, mu2)


@pytest.mark.parametrize(
    "training, sample, stochastic",
    [
        (True, None, True),
        (False, True, True),
        (False, None, False),
        (True, False, False),  # train-mode BatchNorm alone is deterministic
    ],
    ids=["train", "eval-sample", "eval", "train-no-sample"],
)
def test_sampling_switch(full_model: nn.Module, training: bool, sample, stochastic: bool) -> None:
    full_model.train(training)
    x = _input(full_model)
    with torch.no_grad():
        first, mu1, _ = full_model(x, sample=sample)
        second, mu2, _ = full_model(x, sample=sample)
    full_model.eval()
    assert torch.equal(mu1, mu2)  # only z is random, never the posterior itself
    assert torch.equal(first, second) != stochastic


def test_gradients_reach_logvar_when_sampling() -> None:
    model = build_model("vae_unet", 3, **SMALL).train()
    pred, mu, logvar = model(torch.rand(2, 3, 32, 32))
    (pred.mean() + kl_divergence(mu, logvar)).backward()
    assert model.fc_logvar.weight.grad is not None
    assert model.fc_logvar.weight.grad.abs().sum() > 0


# --- kl_divergence -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 128), (4, 8, 10, 10), (1, 1)])
def test_kl_is_zero_for_standard_normal(shape: tuple[int, ...]) -> None:
    kl = kl_divergence(torch.zeros(shape), torch.zeros(shape))
    assert kl.dim() == 0
    assert kl.item() == 0.0


@pytest.mark.parametrize(
    "mu, logvar, expected",
    [
        (1.0, 0.0, 0.5),  # -0.5 * (1 + 0 - 1 - 1)
        (-2.0, 0.0, 2.0),
        (0.0, 1.0, -0.5 * (2.0 - torch.e)),
        (0.0, -1.0, -0.5 * (-torch.exp(torch.tensor(-1.0)).item())),
    ],
)
def test_kl_is_positive_and_elementwise_mean(mu: float, logvar: float, expected: float) -> None:
    for shape in [(2, 128), (3, 4, 5, 5)]:  # mean form: same value for any latent shape
        kl = kl_divergence(torch.full(shape, mu), torch.full(shape, logvar))
        assert kl.item() > 0
        assert kl.item() == pytest.approx(expected, rel=1e-5)
