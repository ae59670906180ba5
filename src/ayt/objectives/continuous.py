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

sCM's stabilisers (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time
Consistency Models", Algorithm 1; method.md section 5), each off by default:

- tangent warm-up (`warmup_steps`): the tangent is the JVP along `(v, r)` instead of `(v, 1)`,
  i.e. `J_x phi(f) v + r d phi(f)/dt` at fixed `x`, with `r = min(1, step / warmup_steps)`, a
  pure function of the training step (`tangent_warmup`);
- adaptive weighting (`adaptive_weight`): a learned log-variance `u(t)` (`LogVarianceHead`,
  EDM2's Fourier-features-then-linear head on `c_noise = ln(t)/4`) turns each example's loss
  `L_i` (weight and tangent normalisation included) into `L_i / exp(u(t_i)) + u(t_i)`;
- finite-difference JVP (`jvp="fd"`): central differences with the relative step `h = fd_eps * t`
  (`fd_tangent`), for networks or kernels without forward-mode AD.
"""

from __future__ import annotations

import math
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
JVPS = ("exact", "fd")
FD_EPS = 3e-3  # relative step of the finite-difference JVP, h = FD_EPS * t (see fd_tangent)
LOGVAR_CHANNELS = 128  # Fourier features of the adaptive-weighting head (EDM2's logvar_channels)

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


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """sCM's tangent warm-up factor `r = min(1, step / warmup_steps)` (1 when `warmup_steps = 0`)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def output_tangent(net: nn.Module, x_t: Tensor, t: Tensor, v: Tensor, labels: Tensor | None = None,
                   phi: FeatureMap | None = None, r: float = 1.0) -> tuple[Tensor, Tensor]:
    """`(f(x_t, t), d phi(f(x_t, t)) / dt)` along `(v, r)`: one JVP, no gradients, fp32 (pure).

    `r < 1` is the tangent warm-up: `J_x phi(f) v + r d phi(f)/dt` (`tangent_warmup`).
    Returns [B, C, H, W] and [B, C, H, W] (pixels, `phi=None`) or [B, F] (features).
    """
    model = _unwrap(net)

    def fn(x: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        f = model(x, level, labels)
        return (f if phi is None else phi(f)), f

    # fp32 even under the trainer's bf16 autocast: forward-mode AD fails with mixed dtypes
    with torch.no_grad(), torch.autocast(x_t.device.type, enabled=False):
        _, g, f = quiet_jvp(fn, (x_t, t), (v.to(x_t.dtype), torch.full_like(t, r)), has_aux=True)
    return f.detach(), g


def fd_tangent(net: nn.Module, x_t: Tensor, t: Tensor, v: Tensor, labels: Tensor | None = None,
               phi: FeatureMap | None = None, r: float = 1.0, eps: float = FD_EPS) -> Tensor:
    """`d phi(f(x_t, t)) / dt` along `(v, r)` by central differences, no gradients, fp32 (pure):

        g = (phi(f(x_t + h v, t + h r)) - phi(f(x_t - h v, t - h r))) / (2 h),   h = eps * t per example.

    Two forward passes instead of a JVP, for networks or kernels without forward-mode AD. The
    step is relative to `t` because the network sees `c_noise = ln(t) / 4`: `h = eps t` moves
    `c_noise` by about `eps / 4` at every noise level. The relative error is `O(eps^2)`
    (truncation; only `O(eps)` where a step crosses a kink of a ReLU / max-pool feature network)
    plus `O(roundoff / eps)` (the difference of two rounded outputs). Measured against the exact
    JVP on a tiny U-Net, largest per-example relative error (method.md section 5): fp32 pixels
    1e-3 at the default `eps = 3e-3` (3e-4 at 1e-2, 3e-3 at 1e-3, 2e-2 at 1e-4), fp32 MFD features
    4e-3 (6e-2 at 1e-2, from kinks); fp64 with `eps = 1e-4`: 1e-8. `eps < 1` keeps `t - h > 0`.
    Same shapes as `output_tangent`'s tangent.
    """
    model = _unwrap(net)
    t = t.to(torch.promote_types(t.dtype, x_t.dtype))  # levels t +- h as precise as the images (Precond does the same)
    h = eps * t
    step_x = h.view(-1, *([1] * (x_t.dim() - 1))) * v.to(x_t.dtype)

    def fn(x: Tensor, level: Tensor) -> Tensor:
        f = model(x, level, labels)
        return f if phi is None else phi(f)

    with torch.no_grad(), torch.autocast(x_t.device.type, enabled=False):
        diff = fn(x_t + step_x, t + h * r) - fn(x_t - step_x, t - h * r)
    return diff / (2 * h).view(-1, *([1] * (diff.dim() - 1))).to(diff.dtype)


class LogVarianceHead(nn.Module):
    """The learned log-variance `u(t)` [B] of adaptive weighting (sCM's Algorithm 1, after EDM2).

    EDM2's head: Fourier features of `c_noise = ln(t) / 4`, `sqrt(2) cos(2 pi (c_noise w_k + p_k))`
    with fixed `w_k ~ N(0, 1)`, `p_k ~ U(0, 1)` (EDM2's `MPFourier`), then a linear layer to one
    value. Here the linear layer is a plain `nn.Linear` initialised to zero, so `u = 0` and the
    weighted loss equals the unweighted one at the first step. Trained with the network, never
    used for sampling.
    """

    def __init__(self, channels: int = LOGVAR_CHANNELS, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)  # fixed features; the global RNG (net init) is untouched
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.utils.skip_init(nn.Linear, channels, 1)  # no draw from the global RNG either
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def features(self, t: Tensor) -> Tensor:
        """`sqrt(2) cos(c_noise w + p)` [B, channels] of noise levels t [B]."""
        c_noise = t.float().log() / 4
        return (c_noise[:, None] * self.freqs + self.phases).cos() * math.sqrt(2)

    def forward(self, t: Tensor) -> Tensor:
        with torch.autocast(t.device.type, enabled=False):  # fp32 under bf16 autocast
            return self.linear(self.features(t)).squeeze(1)


def adaptive_weighted(loss: Tensor, u: Tensor) -> Tensor:
    """`loss / exp(u) + u` [B]: EDM2's uncertainty weighting, sCM's `e^w / D ||.||^2 - w` with `w = -u`."""
    return loss * torch.exp(-u.to(loss.dtype)) + u.to(loss.dtype)


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
        warmup_steps: sCM's tangent warm-up over this many steps (0 = off; `tangent_warmup`).
        adaptive_weight: learn a log-variance `u(t)` and return `L / exp(u) + u` (`LogVarianceHead`).
        jvp: `exact` (`torch.func.jvp`) or `fd` (central differences, relative step `fd_eps`).
    """

    def __init__(self, mfd: nn.Module | None = None, teacher: nn.Module | None = None,
                 p_mean: float = -1.1, p_std: float = 2.0, weighting: str = "per_example",
                 warmup_steps: int = 0, adaptive_weight: bool = False, jvp: str = "exact", fd_eps: float = FD_EPS):
        super().__init__()
        check(weighting in WEIGHTINGS, f"unknown weighting {weighting!r}; use one of {list(WEIGHTINGS)}")
        check(jvp in JVPS, f"unknown jvp {jvp!r}; use one of {list(JVPS)}")
        check(0 < fd_eps < 1, f"fd_eps={fd_eps} must lie in (0, 1): the step is fd_eps * t and t - fd_eps * t must stay > 0")
        self.mfd, self.teacher, self.weighting = mfd, teacher, weighting
        self.phi: FeatureMap | None = None if mfd is None else feature_map(mfd)
        self.p_mean, self.p_std = p_mean, p_std
        self.warmup_steps, self.jvp, self.fd_eps = warmup_steps, jvp, fd_eps
        self.logvar = LogVarianceHead() if adaptive_weight else None
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def trained_modules(self) -> dict[str, nn.Module]:
        """Modules trained with the network (the engine's `Task.trained_modules`): the log-variance head."""
        return {} if self.logvar is None else {"logvar": self.logvar}

    def log_scalars(self, step: int) -> dict[str, float]:
        """Logged with the loss: the tangent warm-up factor `r` of step `step` (when warming up)."""
        return {"tangent_warmup": tangent_warmup(step, self.warmup_steps)} if self.warmup_steps else {}

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

    def tangent(self, net: nn.Module, x_t: Tensor, t: Tensor, v: Tensor, labels: Tensor | None,
                step: int = 0) -> Tensor:
        """`u(d phi(f(x_t, t)) / dt)` along `(v, r(step))`, no gradients; [B, C, H, W] or [B, F]."""
        r = tangent_warmup(step, self.warmup_steps)
        if self.jvp == "fd":
            return rms_normalise(fd_tangent(net, x_t, t, v, labels, self.phi, r, self.fd_eps))
        return rms_normalise(output_tangent(net, x_t, t, v, labels, self.phi, r)[1])

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
            u = self.tangent(net, x_t, t, v, labels, step)
            f = net(x_t, t, labels)
        y = (f if self.phi is None else self.phi(f)).to(u.dtype)  # features may be bf16 under autocast
        return TangentPair(t, y, u)

    def loss(self, pair: TangentPair, step: int = 0) -> Tensor:
        """Per-example `L = (1/(2t)) mean (phi(f) - stopgrad(phi(f) - u))^2` [B] for a drawn pair;
        `L / exp(u(t)) + u(t)` with adaptive weighting."""
        target = (pair.output - pair.tangent).detach()
        loss = 0.5 * (pair.output - target).flatten(1).square().mean(1) * loss_weights(pair.t, self.weighting)
        return loss if self.logvar is None else adaptive_weighted(loss, self.logvar(pair.t))

    def forward(self, net: nn.Module, x0: Tensor, labels: Tensor | None = None, step: int = 0,
                rng: StepRandom | None = None) -> Tensor:
        return self.loss(self.draw(net, x0, labels, step, rng), step)
