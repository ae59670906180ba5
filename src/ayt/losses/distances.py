"""Per-example distances `d(x, y) -> [B]` for consistency losses (method.md section 2).

Every distance is an `nn.Module` mapping two image batches `[B, C, H, W]` to per-example values
of shape `[B]`; only the training loop reduces with `.mean()`. Pixel distances are sums over all
elements (norms), as in ECT/iCT. Feature distances (LPIPS, MFD) register themselves in the same
registry from their own modules.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ayt.errors import AytError, check

DistanceFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, DistanceFactory] = {}
# Feature distances live in their own modules; importing them registers them.
_LAZY_MODULES = {"lpips": "ayt.losses.lpips", "mfd": "ayt.losses.mfd"}


def register_distance(name: str) -> Callable[[DistanceFactory], DistanceFactory]:
    """Class decorator: make a distance constructible by name through `build_distance`."""

    def decorator(factory: DistanceFactory) -> DistanceFactory:
        _REGISTRY[name] = factory
        return factory

    return decorator


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise AytError(f"distance inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")


def _flat_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _check_pair(x, y)
    return (x - y).flatten(1)


@register_distance("l2")
class L2(nn.Module):
    """`||x - y||_2` per example (ECT's pseudo-Huber with c = 0)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # sqrt has an infinite derivative at 0; the tiny floor keeps gradients finite there.
        return _flat_diff(x, y).square().sum(1).clamp_min(1e-20).sqrt()


@register_distance("squared_l2")
class SquaredL2(nn.Module):
    """`||x - y||_2^2` per example."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _flat_diff(x, y).square().sum(1)


@register_distance("l1")
class L1(nn.Module):
    """`||x - y||_1` per example."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _flat_diff(x, y).abs().sum(1)


@register_distance("pseudo_huber")
class PseudoHuber(nn.Module):
    """`sqrt(||x - y||^2 + c^2) - c` per example (iCT, Song & Dhariwal 2023).

    `c=None` uses iCT's `c = 0.00054 * sqrt(dim)` with `dim = C*H*W` of the inputs.
    """

    def __init__(self, c: float | None = None):
        super().__init__()
        check(c is None or c >= 0, f"pseudo-Huber c must be >= 0, got {c}")
        self.c = c

    def constant(self, x: torch.Tensor) -> float:
        """The `c` used for inputs shaped like `x` [B, ...]."""
        return self.c if self.c is not None else 0.00054 * math.sqrt(x[0].numel())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.constant(x)
        sq = _flat_diff(x, y).square().sum(1)
        if c == 0:
            return sq.clamp_min(1e-20).sqrt()
        return (sq + c * c).sqrt() - c


def distance_names() -> list[str]:
    """All distance names `build_distance` accepts."""
    return sorted(set(_REGISTRY) | set(_LAZY_MODULES))


def build_distance(name: str, **kwargs) -> nn.Module:
    """Construct a distance by name; raises `AytError` on unknown names or options."""
    if name not in _REGISTRY and name in _LAZY_MODULES:
        import importlib

        importlib.import_module(_LAZY_MODULES[name])
    if name not in _REGISTRY:
        raise AytError(f"unknown distance '{name}'; choose one of: {', '.join(distance_names())}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as err:
        raise AytError(f"bad options for distance '{name}': {err}") from None
