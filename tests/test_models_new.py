"""Tests of ``lite_vae_unet``: interface parity with ``vae_unet``, sampling, FiLM, size budget."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from mrisynth.dataset import assemble_input
from mrisynth.models import available_models, build_model, kl_divergence

NAME = "lite_vae_unet"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=[3, 8], ids=["in3", "in8"])
def model(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    return build_model(NAME, in_channels=request.param).eval()


def _input(in_channels: int, height: int = 32, width: int = 32, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Network input as training builds it: "any" mode for 8 channels, fixed FLAIR target for 3."""
    gen = torch.Generator().manual_seed(seed)
    stack = torch.rand(batch, 4, height, width, generator=gen)
    missing = torch.arange(batch) % 4
    target = "any" if in_channels == 8 else "flair"
    if target == "flair":
        missing = torch.full((batch,), 3)
    return assemble_input(stack, missing, target)[0]


def _latent_size(height: int, width: int) -> int:
    return 8 * (height // 16) * (width // 16) + 4 * (height // 4) * (width // 4)


# --- registry and config ------------------------------------------------------------------------


def test_is_registered() -> None:
    assert NAME in available_models()


def test_config_records_all_options() -> None:
    model = build_model(NAME, in_channels=8)
    assert model.config == {
        "name": NAME, "in_channels": 8, "out_channels": 1,
        "base_channels": 16, "latent_channels": 8, "local_latent_channels": 4, "predict_scale": False,
    }
    assert json.loads(json.dumps(model.config)) == model.config


@pytest.mark.parametrize(
    "kwargs",
    [{"in_channels": 8}, {"in_channels": 3, "out_channels": 2, "base_channels": 8, "latent_channels": 4}],
)
def test_config_rebuilds_same_architecture(kwargs: dict) -> None:
    model = build_model(NAME, **kwargs).eval()
    rebuilt = build_model(**json.loads(json.dumps(model.config))).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: same names and shapes
    assert rebuilt.config == model.config
    x = _input(kwargs["in_channels"])
    with torch.no_grad():
        assert torch.equal(rebuilt(x)[0], model(x)[0])


@pytest.mark.parametrize("in_channels", [3, 8])
def test_parameters_fit_the_safetensors_budget(in_channels: int) -> None:
    model = build_model(NAME, in_channels=in_channels)
    count = sum(p.numel() for p in model.parameters())
    print(f"{NAME} in_channels={in_channels}: {count:,} parameters")
    assert count < 5_000_000
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}  # as checkpoint.py exports
    assert len(safetensors_bytes(tensors)) < 20 * 1024**2


# --- shapes and range ---------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(32, 32), (64, 48), (48, 64), (240, 240)])
def test_output_shapes(model: nn.Module, height: int, width: int) -> None:
    batch = 1 if height * width > 64 * 64 else 2
    maps = {}
    hooks = [
        getattr(model, name).register_forward_hook(lambda m, i, out, name=name: maps.__setitem__(name, out))
        for name in ("mu_global", "mu_local")
    ]
    try:
        with torch.no_grad():
            pred, mu, logvar = model(_input(model.config["in_channels"], height, width, batch))
    finally:
        for hook in hooks:
            hook.remove()
    assert pred.shape == (batch, 1, height, width)
    assert mu.shape == logvar.shape == (batch, _latent_size(height, width))
    global_map, local_map = model.split_latent(mu, height, width)
    assert global_map.shape == (batch, 8, height // 16, width // 16)
    assert local_map.shape == (batch, 4, height // 4, width // 4)
    assert torch.equal(global_map, maps["mu_global"])  # split_latent inverts the flattening
    assert torch.equal(local_map, maps["mu_local"])


@pytest.mark.parametrize("out_channels", [1, 2])
@pytest.mark.parametrize("in_channels", [3, 8])
def test_output_channels_and_range(in_channels: int, out_channels: int) -> None:
    model = build_model(NAME, in_channels, out_channels).eval()
    with torch.no_grad():
        pred, _, _ = model(torch.randn(2, in_channels, 32, 32) * 50)  # large input: saturates
    assert pred.shape == (2, out_channels, 32, 32)
    assert pred.min() >= 0 and pred.max() <= 1


@pytest.mark.parametrize("height, width", [(30, 32), (32, 40), (8, 8)])
def test_size_not_multiple_of_16_fails_clearly(height: int, width: int) -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        build_model(NAME, 3)(torch.rand(1, 3, height, width))


def test_output_does_not_depend_on_the_batch(model: nn.Module) -> None:
    """GroupNorm, not BatchNorm: a slice gives the same prediction alone or in a batch."""
    x = _input(model.config["in_channels"], batch=2)
    with torch.no_grad():
        together = model(x)[0]
        alone = torch.cat([model(x[i : i + 1])[0] for i in range(2)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


# --- sampling -----------------------------------------------------------------------------------


def test_eval_mode_is_deterministic(model: nn.Module) -> None:
    x = _input(model.config["in_channels"])
    with torch.no_grad():
        first, mu1, _ = model(x)
        second, mu2, _ = model(x)
    assert torch.equal(first, second)
    assert torch.equal(mu1, mu2)


@pytest.mark.parametrize(
    "training, sample, stochastic",
    [(True, None, True), (False, True, True), (False, None, False), (True, False, False)],
    ids=["train", "eval-sample", "eval", "train-no-sample"],
)
def test_sampling_switch(model: nn.Module, training: bool, sample: bool | None, stochastic: bool) -> None:
    model.train(training)
    x = _input(model.config["in_channels"])
    with torch.no_grad():
        first, mu1, _ = model(x, sample=sample)
        second, mu2, _ = model(x, sample=sample)
    model.eval()
    assert torch.equal(mu1, mu2)  # only z is random, never the posterior itself
    assert torch.equal(first, second) != stochastic


def test_posterior_draws_spread_at_fine_scale(model: nn.Module) -> None:
    """K draws in eval mode differ voxel by voxel, not by one global offset: the local latent."""
    x = _input(model.config["in_channels"], 64, 48)
    with torch.no_grad():
        draws = torch.stack([model(x, sample=True)[0] for _ in range(8)])
    std = draws.std(dim=0)
    assert std.mean() > 1e-3
    assert std.flatten(1).std(dim=1).min() > 0  # varies across voxels


def test_gradients_reach_both_latents_logvar() -> None:
    model = build_model(NAME, 8).train()
    pred, mu, logvar = model(_input(8))
    (pred.mean() + kl_divergence(mu, logvar)).backward()
    for head in (model.logvar_global, model.logvar_local):  # sampling is differentiable
        assert head.weight.grad.abs().sum() > 0


# --- conditioning on the missing modality ------------------------------------------------------


def test_onehot_is_read_from_the_last_four_channels() -> None:
    model = build_model(NAME, 8)
    x = _input(8, batch=4)  # missing modality i for sample i
    assert torch.equal(model.missing_onehot(x), torch.eye(4))
    assert build_model(NAME, 3).missing_onehot(_input(3)) is None


def test_changing_only_the_onehot_changes_the_output() -> None:
    model = build_model(NAME, 8).eval()
    x = _input(8, batch=1)
    other = x.clone()
    other[:, 4:] = torch.roll(x[:, 4:], 1, dims=1)  # same images, another missing modality
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], model(other)[0])


def test_film_alone_carries_the_conditioning() -> None:
    """With the one-hot input channels cut from the convolutions, the output still depends on
    the one-hot: only FiLM can carry it."""
    torch.manual_seed(0)
    model = build_model(NAME, 8).eval()
    with torch.no_grad():
        for conv in (model.stem, model.down1.conv):
            conv.weight[:, 4:] = 0
    x = _input(8, batch=1)
    other = x.clone()
    other[:, 4:] = torch.roll(x[:, 4:], 1, dims=1)
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], model(other)[0])
        model.film.weight.zero_()  # and nothing else: FiLM switched off, no difference
        torch.testing.assert_close(model(x)[0], model(other)[0], rtol=0, atol=0)


def test_fixed_target_model_has_no_film() -> None:
    assert build_model(NAME, 3).film is None
    assert isinstance(build_model(NAME, 8).film, nn.Linear)


# --- predicted Laplace scale (heteroscedastic output) --------------------------------------------


def test_scale_head_adds_one_bounded_log_scale_channel() -> None:
    from mrisynth.models.lite_vae_unet import LOG_SCALE_MAX, LOG_SCALE_MIN

    torch.manual_seed(0)
    model = build_model(NAME, in_channels=8, predict_scale=True).eval()
    assert model.config["predict_scale"] is True
    with torch.no_grad():
        pred, _, _ = model(torch.randn(2, 8, 32, 32) * 50, sample=True)  # large input: saturates both channels
        plain, _, _ = model(torch.randn(2, 8, 32, 32))
    assert plain.shape == (2, 1, 32, 32)  # a plain prediction does not run the scale branch
    assert pred.shape == (2, 2, 32, 32)
    assert 0 <= pred[:, 0].min() and pred[:, 0].max() <= 1
    assert LOG_SCALE_MIN <= pred[:, 1].min() and pred[:, 1].max() <= LOG_SCALE_MAX
    assert pred[:, 1].min() < 0 or pred[:, 1].max() > 1  # not squashed into [0, 1] like the synthesis


def test_a_model_without_scale_loads_into_the_default_architecture() -> None:
    """Checkpoints made before ``predict_scale`` existed (the shipped weights) still load."""
    old = build_model(NAME, in_channels=8).state_dict()
    rebuilt = build_model(**{k: v for k, v in build_model(NAME, in_channels=8).config.items() if k != "predict_scale"})
    rebuilt.load_state_dict(old)
    assert rebuilt(torch.rand(1, 8, 32, 32))[0].shape == (1, 1, 32, 32)


def test_the_scale_branch_sends_no_gradient_into_the_synthesis() -> None:
    torch.manual_seed(0)
    model = build_model(NAME, in_channels=8, predict_scale=True)
    pred, _, _ = model(_input(8))  # training mode: sampled, so the scale branch runs
    pred[:, 1].sum().backward()  # a loss on the log scale only
    synthesis = [p for name, p in model.named_parameters() if not name.startswith("scale_head")]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in synthesis)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.scale_head.parameters())
