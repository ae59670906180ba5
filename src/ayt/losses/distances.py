"""Per-example distances `d(x, y) -> [B]` for consistency losses (method.md section 2).

Every distance is an `nn.Module` mapping two image batches `[B, C, H, W]` to per-example values
of shape `[B]`; only the training loop reduces with `.mean()`. Pixel distances are sums over all
elements (norms), as in ECT/iCT. `DISTANCES` maps every name to its constructor; the feature
distances (LPIPS, MFD) are imported from their own modules only when built.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ayt.errors import AytError, check

DistanceFactory = Callable[..., nn.Module]


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise AytError(f"distance inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")


def _flat_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _check_pair(x, y)
    return (x - y).flatten(1)


class L2(nn.Module):
    """`||x - y||_2` per example (ECT's pseudo-Huber with c = 0)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # sqrt has an infinite derivative at 0; the tiny floor keeps gradients finite there.
        return _flat_diff(x, y).square().sum(1).clamp_min(1e-20).sqrt()


class SquaredL2(nn.Module):
    """`||x - y||_2^2` per example."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _flat_diff(x, y).square().sum(1)


class L1(nn.Module):
    """`||x - y||_1` per example."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _flat_diff(x, y).abs().sum(1)


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


def _lpips(**kwargs) -> nn.Module:
    from ayt.losses.lpips import LPIPS  # torchvision: imported only when LPIPS is used

    return LPIPS(**kwargs)


def _mfd(**kwargs) -> nn.Module:
    from ayt.losses.mfd import MFD

    return MFD(**kwargs)


DISTANCES: dict[str, DistanceFactory] = {
    "l1": L1, "l2": L2, "squared_l2": SquaredL2, "pseudo_huber": PseudoHuber, "lpips": _lpips, "mfd": _mfd,
}


def distance_names() -> list[str]:
    """All distance names `build_distance` accepts."""
    return sorted(DISTANCES)


def build_distance(name: str, **kwargs) -> nn.Module:
    """Construct a distance by name; raises `AytError` on unknown names or options."""
    if name not in DISTANCES:
        raise AytError(f"unknown distance '{name}'; choose one of: {', '.join(distance_names())}")
    try:
        return DISTANCES[name](**kwargs)
    except TypeError as err:
        raise AytError(f"bad options for distance '{name}': {err}") from None
