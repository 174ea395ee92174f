"""Model registry (timm-style) and the loss helpers shared by all architectures.

An architecture registers a factory under a name; ``build_model`` builds it and attaches
``model.config``, a dict of plain Python values from which ``build_model(**model.config)``
rebuilds the same architecture. Checkpoints store that dict next to the weights.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from mrisynth.errors import UsageError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model class or factory available to ``build_model`` as ``name``.

    The factory must accept ``in_channels`` and ``out_channels`` plus its own keyword options.
    """

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def build_model(name: str, in_channels: int, out_channels: int = 1, **cfg: Any) -> nn.Module:
    """Build the model registered as ``name`` and attach its full ``config`` dict.

    The config records the factory's defaults too, not only the options given, so that a
    checkpoint still rebuilds the same architecture if a default changes later.
    """
    if name not in _REGISTRY:
        raise UsageError(f"unknown model '{name}'. Available: {', '.join(available_models())}")
    factory = _REGISTRY[name]
    _check_options(name, factory, cfg)
    options = {**_factory_defaults(factory), **cfg}
    model = factory(in_channels=in_channels, out_channels=out_channels, **options)
    model.config = {
        "name": name,
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        **options,
    }
    return model


def _factory_defaults(factory: Callable[..., nn.Module]) -> dict[str, Any]:
    """Keyword options of ``factory`` with their defaults (channels excluded)."""
    params = inspect.signature(factory).parameters
    return {
        key: p.default
        for key, p in params.items()
        if key not in ("self", "in_channels", "out_channels") and p.default is not p.empty
    }


def _check_options(name: str, factory: Callable[..., nn.Module], cfg: dict[str, Any]) -> None:
    """Unknown options are a usage mistake (e.g. a typo in a YAML config), not a traceback."""
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = set(_factory_defaults(factory))
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UsageError(
            f"unknown option(s) {', '.join(unknown)} for model '{name}'. "
            f"Known: {', '.join(sorted(known))}"
        )


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) as the MEAN over all elements (batch and latent dims).

    ``-0.5 * mean(1 + logvar - mu^2 - exp(logvar))``. The mean (not the sum over latent
    dims) keeps one weight such as beta=1e-4 meaningful whether the latent is a vector
    (``[B, D]``) or a spatial map (``[B, C, h, w]``) of any size.
    """
    return -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())


# Architectures register themselves on import; keep these imports after the registry.
from mrisynth.models import vae_unet as _vae_unet  # noqa: E402,F401
from mrisynth.models import lite_vae_unet as _lite_vae_unet  # noqa: E402,F401

__all__ = ["available_models", "build_model", "kl_divergence", "register_model"]
