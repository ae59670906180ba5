"""Continuous-time consistency training and distillation (method.md section 5).

The consistency function `f(x_t, t)` must not change along a probability-flow ODE trajectory.
Its rate of change there is a Jacobian-vector product in the direction `(v, 1)`,

    g = d/dt phi(f(x_t, t)) = J_{phi o f}(x_t, t) (v, 1),

with `phi` the identity (pixel tangent) or the frozen MFD feature network (AYT), and `v` the ODE
velocity at `x_t`:

- consistency *training*: `v = (x_t - x_0) / t = eps` (the conditional velocity, no teacher);
- consistency *distillation*: `v = (x_t - D(x_t, t)) / t` with a frozen EDM denoiser `D`.

`g` is computed without gradients, normalised per example as `u(g) = g / (rms(g) + 0.1)`, and
the loss pushes `phi(f)` against it with weight `1/t`. The reference writes the loss as
`mean (1/t) <phi(f), stopgrad u(g)>`; here it is the mean over the `D` elements of
`phi(f)` of `(1/(2t)) (phi(f) - stopgrad(phi(f) - u(g)))^2`, whose gradient with respect to
`phi(f)` is `u(g) / (t D)` (the reference's direction, scaled by `1/D` as a mean over elements
is) and whose value is `mean(u(g)^2) / (2t)` instead of an arbitrary inner product. As
`mean(u^2) = (rms g / (rms g + 0.1))^2`, the value stays near `1/(2t)` until the tangent gets
small (rms below about 0.1), so the logged loss mostly reflects the drawn `t`. Averaging over the
elements matters in practice: with a sum, the raw gradients are `D` times larger, and the
first RAdam steps (which are not yet adaptive) wreck the initialisation.

Weighting (`weighting=`, config `objective.weighting`). `per_example` (default, method.md):
example i gets `1/t_i`. `batch_mean` reproduces the reference script (`train_ccd_ayt.py`) as
written: it multiplies `(1/t)` of shape [N, 1, 1, 1] by the [N, D] product, which broadcasts to
[N, 1, N, D], so after the mean every example gets the same weight `mean_j(1/t_j)` (over the
micro-batch of one process). With t lognormal (P_mean -1.1, P_std 2), `1/t` is heavy-tailed:
per-example weights leave an effective sample size `(sum w)^2 / sum w^2` of about a tenth of the
batch (`effective_sample_size`); the batch mean keeps every example but lets the smallest `t`
of the batch set the step size of all.

The JVP and the student call share one dropout mask (`shared_dropout`), as ECT's student and
target calls do.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ayt.errors import check
from ayt.nets.dropout import shared_dropout
from ayt.rng import StepRandom
from ayt.schedules import lognormal_t

RMS_FLOOR = 0.1  # the `+ 0.1` of the reference normalisation g / (rms(g) + 0.1)
WEIGHTINGS = ("per_example", "batch_mean")

FeatureMap = Callable[[Tensor], Tensor]  # images [B, C, H, W] -> flattened features [B, F]


def rms_normalise(g: Tensor) -> Tensor:
    """`g / (rms(g) + 0.1)` per example, g [B, ...] (method.md section 5)."""
    rms = g.flatten(1).square().mean(1).sqrt()
    return g / (rms + RMS_FLOOR).view(-1, *([1] * (g.dim() - 1)))


def loss_weights(t: Tensor, weighting: str = "per_example") -> Tensor:
    """Weights [B] of the continuous loss: `1/t` per example, or `mean(1/t)` for all (the reference as written)."""
    check(weighting in WEIGHTINGS, f"unknown weighting {weighting!r}; use one of {list(WEIGHTINGS)}")
    w = 1.0 / t
    return w if weighting == "per_example" else w.mean().expand_as(w)


def effective_sample_size(w: Tensor) -> float:
    """Kish's effective sample size `(sum w)^2 / sum w^2` of weights w [B] (B for equal weights)."""
    return float(w.sum() ** 2 / w.square().sum())


def feature_map(mfd: nn.Module) -> FeatureMap:
    """`phi(x)` [B, F] of an MFD distance: its selected feature outputs, flattened and concatenated."""
    check(hasattr(mfd, "net") and hasattr(mfd, "layers"), "continuous feature tangents need an MFD distance (ayt.losses.mfd.MFD)")

    def phi(x: Tensor) -> Tensor:
        maps = mfd.net.features(x)
        return torch.cat([maps[i].flatten(1) for i in mfd.layers], 1)

    return phi


def quiet_jvp(fn: Callable, primals: tuple, tangents: tuple, **kwargs):
    """`torch.func.jvp`, minus the FutureWarning that torch's own forward-AD decompositions
    raise once (they call the deprecated `torch.jit.script`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
        return torch.func.jvp(fn, primals, tangents, **kwargs)


def _unwrap(net: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile.

    Forward-mode AD runs outside DDP's hooks, and never through a compiled module: dynamo cannot
    resume inside `torch.func.jvp` and would then skip (run eagerly) every frame of the network,
    also for the compiled student call.
    """
    net = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
    return getattr(net, "_orig_mod", net)


def conditional_velocity(x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """`v = (x_t - x_0) / t` [B, C, H, W]: the ODE velocity of consistency training."""
    return (x_t - x0) / t.view(-1, 1, 1, 1)


def output_tangent(net: nn.Module, x_t: Tensor, t: Tensor, v: Tensor, labels: Tensor | None = None,
                   phi: FeatureMap | None = None) -> tuple[Tensor, Tensor]:
    """`(f(x_t, t), d phi(f(x_t, t)) / dt)` along `(v, 1)`: one JVP, no gradients, fp32 (pure).

    Returns [B, C, H, W] and [B, C, H, W] (pixels, `phi=None`) or [B, F] (features).
    """
    model = _unwrap(net)

    def fn(x: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        f = model(x, level, labels)
        return (f if phi is None else phi(f)), f

    # fp32 even under the trainer's bf16 autocast: forward-mode AD fails with mixed dtypes
    with torch.no_grad(), torch.autocast(x_t.device.type, enabled=False):
        _, g, f = quiet_jvp(fn, (x_t, t), (v.to(x_t.dtype), torch.ones_like(t)), has_aux=True)
    return f.detach(), g


@dataclass
class TangentPair:
    """One continuous-time draw: the level, the (feature) output with gradient, its target tangent."""

    t: Tensor  # [B] noise level
    output: Tensor  # [B, C, H, W] f(x_t, t), or [B, F] phi(f), with gradient
    tangent: Tensor  # same shape: u(d output / dt), no gradient


class ContinuousObjective(nn.Module):
    """Continuous-time CT / CD loss; returns per-example values [B].

    Args:
        mfd: an MFD distance module whose feature network is `phi`, or None for pixel tangents.
        teacher: a frozen EDM denoiser `D(x, t, labels)` (distillation) or None (training).
        p_mean, p_std: lognormal `t` distribution (ECT's by default).
        weighting: `per_example` (1/t_i) or `batch_mean` (mean 1/t for all; the reference as written).
    """

    def __init__(self, mfd: nn.Module | None = None, teacher: nn.Module | None = None,
                 p_mean: float = -1.1, p_std: float = 2.0, weighting: str = "per_example"):
        super().__init__()
        check(weighting in WEIGHTINGS, f"unknown weighting {weighting!r}; use one of {list(WEIGHTINGS)}")
        self.mfd, self.teacher, self.weighting = mfd, teacher, weighting
        self.phi: FeatureMap | None = None if mfd is None else feature_map(mfd)
        self.p_mean, self.p_std = p_mean, p_std
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> ContinuousObjective:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: never dropout
        return self

    def velocity(self, x_t: Tensor, x0: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        """The ODE velocity `v` [B, C, H, W] at `x_t`: the teacher's, or `(x_t - x_0) / t`."""
        if self.teacher is None:
            return conditional_velocity(x_t, x0, t)
        with torch.no_grad():
            return conditional_velocity(x_t, self.teacher(x_t, t, labels).to(x_t.dtype), t)

    def tangent(self, net: nn.Module, x_t: Tensor, t: Tensor, v: Tensor, labels: Tensor | None) -> Tensor:
        """`u(d phi(f(x_t, t)) / dt)` along `(v, 1)`, no gradients; [B, C, H, W] or [B, F]."""
        return rms_normalise(output_tangent(net, x_t, t, v, labels, self.phi)[1])

    def sample(self, x0: Tensor, rng: StepRandom) -> tuple[Tensor, Tensor]:
        """The draws of one step: `(t [B] lognormal, eps [B, C, H, W])`."""
        t = lognormal_t(rng.randn((x0.shape[0],), x0.device), self.p_mean, self.p_std)
        return t, rng.randn_like(x0)

    def draw(self, net: nn.Module, x0: Tensor, labels: Tensor | None = None, step: int = 0,
             rng: StepRandom | None = None) -> TangentPair:
        """Sample `(t, eps)`, then the tangent and the student output with one shared dropout mask."""
        rng = rng or StepRandom()
        t, eps = self.sample(x0, rng)
        x_t = x0 + t.view(-1, 1, 1, 1) * eps
        v = self.velocity(x_t, x0, t, labels)
        with shared_dropout(net, rng.seed(), rng.rank):
            u = self.tangent(net, x_t, t, v, labels)
            f = net(x_t, t, labels)
        y = (f if self.phi is None else self.phi(f)).to(u.dtype)  # features may be bf16 under autocast
        return TangentPair(t, y, u)

    def loss(self, pair: TangentPair, step: int = 0) -> Tensor:
        """Per-example `(1/(2t)) mean (phi(f) - stopgrad(phi(f) - u))^2` [B] for a drawn pair."""
        target = (pair.output - pair.tangent).detach()
        return 0.5 * (pair.output - target).flatten(1).square().mean(1) * loss_weights(pair.t, self.weighting)

    def forward(self, net: nn.Module, x0: Tensor, labels: Tensor | None = None, step: int = 0,
                rng: StepRandom | None = None) -> Tensor:
        return self.loss(self.draw(net, x0, labels, step, rng), step)
