"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"; method.md section 8).

The network `u(z_t, r, t)` models the *average* velocity over `[r, t]` on the linear path
`z_t = (1 - t) x + t eps` (t = 0 data, t = 1 noise; instantaneous velocity `v = eps - x`).
Differentiating `(t - r) u(z_t, r, t) = int_r^t v(z_s, s) ds` in `t` gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),
    d/dt u = J_u (v, 0, 1)     (one JVP along the tangent (dz/dt, dr/dt, dt/dt) = (v, 0, 1)),

whose right side, with the conditional velocity `v = eps - x` and stop-gradient, is the
regression target `u_tgt`. Per example, with `Delta = u - u_tgt` and `||.||` over all C*H*W
elements (the authors' code sums),

    pixel (the paper):  L = w ||Delta||^2,    w = stopgrad 1 / (||Delta||^2 + c)^p,

so `dL/du = 2 w Delta`. Draws: `t` and `r` logit-normal (`sigmoid(p_mean + p_std n)`) and sorted
so `t >= r`; then `r = t` for a fraction `1 - ratio` of the examples (those are plain flow
matching: `u_tgt = v`).

MFD (`aligned`, this project; method.md section 8): the residual is measured on the image each
velocity implies, `x_hat = z_t - t u` and `x_tgt = z_t - t u_tgt`, through a distance `d` (the
frozen MFD feature network). With `g = grad_x d(x_hat, x_tgt)` (target held fixed) and
`g_unit = g / ||g||`, the gradient passed to `u` is

    dL/du = -2 w ||Delta|| g_unit,

the size of the pixel gradient (`|2 w Delta|`) in the direction the features choose (pulled back
through `x_hat = z_t - t u`, whose Jacobian `-t I` only flips the sign once normalised). With
`d` the squared pixel distance it is exactly the pixel gradient.

The JVP runs without gradients in fp32 (also under the trainer's bf16 autocast, as the
continuous objective's), the student call `u` with gradients; both share one dropout mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ayt.nets.dropout import shared_dropout
from ayt.objectives.continuous import _unwrap, quiet_jvp
from ayt.rng import StepRandom


def logit_normal(normal: Tensor, p_mean: float, p_std: float) -> Tensor:
    """`sigmoid(p_mean + p_std * n)` for standard-normal draws n [B]: times in (0, 1)."""
    return torch.sigmoid(p_mean + p_std * normal)


def meanflow_times(n_a: Tensor, n_b: Tensor, n_mix: Tensor, ratio: float, p_mean: float,
                   p_std: float) -> tuple[Tensor, Tensor]:
    """`(r, t)` [B] from three standard-normal draws [B] (pure): two logit-normal times sorted so
    `t >= r`, then `r = t` except where `Phi(n_mix) < ratio` (a fraction `ratio` keeps r != t)."""
    a, b = logit_normal(n_a, p_mean, p_std), logit_normal(n_b, p_mean, p_std)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    return torch.where(torch.special.ndtr(n_mix) < ratio, r, t), t


def average_velocity_derivative(net: nn.Module, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                                labels: Tensor | None = None) -> Tensor:
    """`du/dt = J_u(z, r, t) (v, 0, 1)` [B, C, H, W]: one JVP, no gradients, fp32 (pure)."""
    model = _unwrap(net)

    def fn(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return model(z_, r_, t_, labels)

    # fp32 even under the trainer's bf16 autocast: forward-mode AD fails with mixed dtypes
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        _, dudt = quiet_jvp(fn, (z, r.to(z.dtype), t.to(z.dtype)),
                            (v.to(z.dtype), torch.zeros_like(r, dtype=z.dtype), torch.ones_like(t, dtype=z.dtype)))
    return dudt


def meanflow_target(net: nn.Module, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                    labels: Tensor | None = None) -> Tensor:
    """`u_tgt = v - (t - r) du/dt` [B, C, H, W], detached (the MeanFlow identity; pure)."""
    dudt = average_velocity_derivative(net, z, r, t, v, labels)
    return (v - (t - r).view(-1, 1, 1, 1).to(v.dtype) * dudt.to(v.dtype)).detach()


def adaptive_weight(squared: Tensor, p: float, c: float) -> Tensor:
    """`w = 1 / (||Delta||^2 + c)^p` [B], detached (MeanFlow's adaptive loss weight)."""
    return 1.0 / (squared.detach() + c) ** p


@dataclass
class MeanFlowPair:
    """One MeanFlow draw: the path point, the times, the prediction with gradient and its target."""

    z: Tensor  # [B, C, H, W] z_t = (1 - t) x + t eps
    r: Tensor  # [B] 0 <= r <= t
    t: Tensor  # [B]
    u: Tensor  # [B, C, H, W] u(z_t, r, t), with gradient
    target: Tensor  # [B, C, H, W] u_tgt, no gradient

    def images(self) -> tuple[Tensor, Tensor]:
        """`(x_hat, x_tgt) = (z_t - t u, z_t - t u_tgt)`: the images the two velocities imply."""
        t = self.t.view(-1, 1, 1, 1).to(self.u.dtype)
        return self.z - t * self.u, self.z - t * self.target


class MeanFlowObjective(nn.Module):
    """MeanFlow loss; returns per-example values [B] (method.md section 8).

    Args:
        aligned: None for the paper's pixel loss, or an `Aligned(distance)` whose unit gradient
            on `x_hat = z_t - t u` sets the direction of the update (MFD).
        p_mean, p_std: the logit-normal distribution of `t` and `r`.
        ratio: the fraction of draws with `r != t`.
        norm_p, norm_eps: the adaptive weight `1 / (||Delta||^2 + norm_eps)^norm_p`.
        mfd_tmax: with `aligned`, draws with `t > mfd_tmax` take the pixel gradient instead of the
            feature direction (method.md 8.3); 1 keeps the feature direction at every `t`.
    """

    def __init__(self, aligned: nn.Module | None = None, p_mean: float = -0.4, p_std: float = 1.0,
                 ratio: float = 0.25, norm_p: float = 1.0, norm_eps: float = 0.01, mfd_tmax: float = 1.0):
        super().__init__()
        self.aligned = aligned
        self.p_mean, self.p_std, self.ratio = p_mean, p_std, ratio
        self.norm_p, self.norm_eps, self.mfd_tmax = norm_p, norm_eps, mfd_tmax

    def sample(self, x0: Tensor, rng: StepRandom) -> tuple[Tensor, Tensor, Tensor]:
        """The draws of one step: `(r [B], t [B], eps [B, C, H, W])`."""
        n = rng.randn((x0.shape[0], 3), x0.device)
        r, t = meanflow_times(n[:, 0], n[:, 1], n[:, 2], self.ratio, self.p_mean, self.p_std)
        return r, t, rng.randn_like(x0)

    def draw(self, net: nn.Module, x0: Tensor, labels: Tensor | None = None, step: int = 0,
             rng: StepRandom | None = None) -> MeanFlowPair:
        """Sample `(r, t, eps)`, then the target (one JVP) and the prediction with one dropout mask."""
        rng = rng or StepRandom()
        r, t, eps = self.sample(x0, rng)
        view = t.view(-1, 1, 1, 1).to(x0.dtype)
        z, v = (1 - view) * x0 + view * eps, eps - x0
        with shared_dropout(net, rng.seed(), rng.rank):
            target = meanflow_target(net, z, r, t, v, labels)
            u = net(z, r, t, labels)
        return MeanFlowPair(z, r, t, u, target.to(u.dtype))

    def loss(self, pair: MeanFlowPair, step: int = 0) -> Tensor:
        """Per-example `w ||u - u_tgt||^2` [B]; with `aligned`, the same value carrying the MFD gradient."""
        precise = torch.promote_types(pair.u.dtype, torch.float32)  # float32 under bf16 autocast
        delta = (pair.u - pair.target).flatten(1).to(precise)
        squared = delta.square().sum(1)
        w = adaptive_weight(squared, self.norm_p, self.norm_eps)
        if self.aligned is None:
            return w * squared
        x_hat, x_tgt = pair.images()
        _, g_unit = self.aligned.unit_gradient(x_hat, x_tgt)
        size = 2 * w * squared.detach().sqrt()  # |dL/du| of the pixel loss
        grad_u = -size.view(-1, 1, 1, 1) * g_unit.to(precise)
        if self.mfd_tmax < 1:  # far from the data the pixel gradient 2 w Delta (method.md 8.3)
            pixel = (pair.t > self.mfd_tmax).view(-1, 1, 1, 1)
            grad_u = torch.where(pixel, 2 * w.view(-1, 1, 1, 1) * delta.view_as(grad_u), grad_u)
        surrogate = (pair.u.to(precise) * grad_u.detach()).flatten(1).sum(1)  # gradient: grad_u
        return surrogate - surrogate.detach() + (w * squared).detach()

    def forward(self, net: nn.Module, x0: Tensor, labels: Tensor | None = None, step: int = 0,
                rng: StepRandom | None = None) -> Tensor:
        return self.loss(self.draw(net, x0, labels, step, rng), step)
