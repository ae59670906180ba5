"""The unit-gradient ("aligned") form of a distance (method.md section 4, last bullets).

The reference code does not backpropagate `d(f, target)` itself. It takes `g = d d(f, y) / d f`
with the target `y` held constant, rescales it to unit norm per example,
`g_unit = g / ||g||`, and trains with the surrogate `0.5 * ||f - stopgrad(f - g_unit)||^2`,
whose gradient with respect to `f` is exactly `g_unit`. Weighted by the ECT weight `w(t, r)`
in the loss, the update of the output is `w * g_unit`: the distance sets the direction, the
weight its size.

`Aligned(distance)(x, y)` returns per-example values [B] equal to `distance(x, y)` (for logging)
while its gradient with respect to x is `g_unit`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ayt.errors import AytError


class Aligned(nn.Module):
    """Value `distance(x, y)` [B], gradient `g / ||g||` per example with respect to x [B, ...].

    `g` is computed on a detached copy of x, so the graph through the model that produced x is
    not built twice; `eps` guards the division where `g = 0` (then the gradient is 0).
    """

    def __init__(self, distance: nn.Module, eps: float = 1e-12) -> None:
        super().__init__()
        self.distance, self.eps = distance, float(eps)

    def unit_gradient(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(distance value [B], g_unit shaped like x), both detached; y is treated as constant."""
        x_leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.distance(x_leaf, y.detach())
            (g,) = torch.autograd.grad(value.sum(), x_leaf)
        norm = g.float().flatten(1).norm(dim=1).clamp_min(self.eps)
        g_unit = (g.float() / norm.view(-1, *([1] * (g.ndim - 1)))).to(x.dtype)
        return value.detach(), g_unit

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-example [B]: the distance value, carrying the gradient g_unit to x."""
        if x.shape != y.shape:
            raise AytError(f"distance inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self.distance(x, y.detach()).detach()
        value, g_unit = self.unit_gradient(x, y)
        surrogate = 0.5 * (x - (x.detach() - g_unit)).flatten(1).square().sum(1)  # gradient: g_unit
        return surrogate - surrogate.detach() + value.to(surrogate.dtype)
