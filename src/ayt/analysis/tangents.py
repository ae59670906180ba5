"""CM tangents: the direction in which training pushes the output `f(x_t, t)` (method.md sections 3-5).

Discrete (ECT) tangent of a distance `d` (method.md sections 2-3): the negative gradient of the
per-example loss with respect to the output,

    g_d = - d/df [ w(t, r) * d(f, stopgrad y) ],   f = f(x_t, t),  y = f(x_r, r) (x_0 where r = 0),

with `w = 1 / (t - r)`. For an aligned form `NAME:aligned` (method.md section 4) `d` is the
unit-gradient surrogate, so `g = -w * grad d / ||grad d||` has norm `w`.

Continuous tangent (method.md section 5, consistency *training*): the velocity of the output
along the probability-flow ODE, `df/dt = J_f(x_t, t) (v, 1)` with `v = (x_t - x_0) / t`
(a `torch.func.jvp`). The reference loss `(1/t) <f, stopgrad u(df/dt)>` with the per-example
normalisation `u(g) = g / (rms(g) + 0.1)` moves the output along `-(1/t) u(df/dt)`: that is the
continuous tangent reported here. Its feature-space version (`continuous:mfd`) differentiates
`phi(f(x_t, t))` instead; the loss `(1/t) <phi(f), stopgrad u(d phi(f)/dt)>` pushes the output
along `-(1/t) J_phi(f)^T u(d phi(f)/dt)`.

Every network call here runs in eval mode (no dropout) and without parameter gradients.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ayt.errors import AytError, check
from ayt.losses import build_distance, distance_names
from ayt.losses.aligned import Aligned
from ayt.objectives.continuous import FeatureMap, conditional_velocity, feature_map, output_tangent, rms_normalise
from ayt.objectives.ect import consistency_pair
from ayt.schedules import ect_r_from_t, lognormal_bucket_medians

ALIGNED = "aligned"
CONTINUOUS = "continuous"
#: Feature distances whose network can serve as `phi` for the continuous feature tangent.
CONTINUOUS_FEATURES = ("mfd",)


# ---------------------------------------------------------------- names
def parse_tangent_names(text: str) -> list[str]:
    """Split `"pseudo_huber,mfd:aligned,continuous"` into validated names.

    A name is a distance (`ayt.losses.distance_names()`), its unit-gradient form
    `NAME:aligned`, `continuous` (pixel JVP tangent) or `continuous:mfd` (feature JVP tangent).
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    check(bool(names), "--distances is empty; list tangents such as pseudo_huber,l2,continuous")
    for name in names:
        base, _, form = name.partition(":")
        valid = (form == "" and base in (*distance_names(), CONTINUOUS)) or \
            (form == ALIGNED and base in distance_names()) or \
            (base == CONTINUOUS and form in CONTINUOUS_FEATURES)
        check(valid, f"unknown tangent {name!r}; use a distance ({', '.join(distance_names())}), "
              f"its unit-gradient form NAME:aligned, {CONTINUOUS} or {CONTINUOUS}:mfd")
    check(len(set(names)) == len(names), f"--distances {text!r} lists a tangent twice; list each once")
    return names


def is_continuous(name: str) -> bool:
    """Whether `name` is a continuous (JVP) tangent rather than a distance's discrete one."""
    return name.partition(":")[0] == CONTINUOUS


def base_distance(name: str) -> str | None:
    """The distance a tangent needs built: `mfd` for `mfd:aligned` and `continuous:mfd`, else None for `continuous`."""
    base, _, form = name.partition(":")
    if base == CONTINUOUS:
        return form or None
    return base


def build_tangent_distance(name: str, **options) -> nn.Module:
    """The distance module of a discrete tangent name: `build_distance(base)`, wrapped in `Aligned` for `:aligned`."""
    base, _, form = name.partition(":")
    distance = build_distance(base, **options)
    return Aligned(distance) if form == ALIGNED else distance


# ---------------------------------------------------------------- the analysis batch
@dataclass
class AnalysisBatch:
    """N images, each at K noise levels: B = N * K examples, image-major (`index = i * K + k`).

    Attributes:
        x0: [B, C, H, W] clean images (each source image repeated K times).
        eps: [B, C, H, W] noise; one draw per source image, shared by its K levels.
        t: [B] noise level of each example (the level of its bucket).
        r: [B] ECT target level, `0 <= r < t`.
        bucket: [B] int64 index of the level (0..K-1).
        levels: [K] the noise levels, increasing.
        labels: [B] int64 class labels, or None for unconditional models.
    """

    x0: Tensor
    eps: Tensor
    t: Tensor
    r: Tensor
    bucket: Tensor
    levels: Tensor
    labels: Tensor | None = None

    @property
    def x_t(self) -> Tensor:
        """`x_0 + t * eps`, [B, C, H, W]."""
        return self.x0 + self.t.view(-1, 1, 1, 1) * self.eps

    @property
    def weight(self) -> Tensor:
        """ECT weight `w(t, r) = 1 / (t - r)`, [B]."""
        return 1.0 / (self.t - self.r)

    @property
    def num_images(self) -> int:
        return self.x0.shape[0] // len(self.levels)

    def grid(self, x: Tensor) -> Tensor:
        """Reshape a per-example tensor [B, ...] to [N, K, ...] (image, level)."""
        return x.reshape(self.num_images, len(self.levels), *x.shape[1:])


def bucket_levels(num: int, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """[num] noise levels, increasing: the medians of `num` equal-probability buckets of the
    training distribution `t = exp(N(p_mean, p_std^2))` (method.md section 2)."""
    check(num >= 1, f"--buckets {num}: need at least 1 noise-level bucket")
    return torch.tensor(lognormal_bucket_medians(num, p_mean, p_std))


def analysis_batch(
    images: Tensor,
    levels: Tensor,
    generator: torch.Generator,
    stage: int = 0,
    q: float = 2.0,
    k: float = 8.0,
    b: float = 1.0,
    labels: Tensor | None = None,
) -> AnalysisBatch:
    """A fixed batch: every image of `images` [N, C, H, W] at every level of `levels` [K].

    `eps` is drawn from `generator` (on the generator's device, then moved to the images'), so
    the same seed gives the same batch on any device; `r = ect_r_from_t(t, stage, q, k, b)`
    (method.md section 2).
    """
    n, num_levels = images.shape[0], len(levels)
    eps = torch.randn(images.shape, generator=generator, device=generator.device).to(images)
    t = levels.to(images).repeat(n)
    return AnalysisBatch(
        x0=images.repeat_interleave(num_levels, 0),
        eps=eps.repeat_interleave(num_levels, 0),
        t=t,
        r=ect_r_from_t(t, stage, q, k, b),
        bucket=torch.arange(num_levels, device=images.device).repeat(n),
        levels=levels.to(images),
        labels=None if labels is None else labels.repeat_interleave(num_levels, 0),
    )


# ---------------------------------------------------------------- discrete tangents
@contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """Run `net` in eval mode (dropout off) inside the block; restore its mode afterwards."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


@dataclass
class TangentSet:
    """Outputs of one model on an `AnalysisBatch` and the tangents applied to them.

    Attributes:
        output: [B, C, H, W] `f(x_t, t)`.
        target: [B, C, H, W] `f(x_r, r)`, or `x_0` where `r = 0`.
        tangents: name -> [B, C, H, W] the direction training moves `output` (see module doc).
        losses: name -> [B] the per-example loss `w * d(f, y)` of discrete tangents.
    """

    output: Tensor
    target: Tensor
    tangents: dict[str, Tensor]
    losses: dict[str, Tensor]


def consistency_outputs(net: nn.Module, batch: AnalysisBatch) -> tuple[Tensor, Tensor]:
    """`(f(x_t, t), target)`, both [B, C, H, W], eval mode, no gradients (method.md section 2)."""
    with torch.no_grad(), eval_mode(net):
        return consistency_pair(net, batch.x0, batch.eps, batch.t, batch.r, batch.labels)


def discrete_tangent(distance: nn.Module, output: Tensor, target: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """`(g, loss)`: `g = -d/df [w * d(f, y)]` [B, C, H, W] at `f = output`, `loss = w * d(f, y)` [B].

    `output`, `target` [B, C, H, W], `weight` [B]. The target is held constant (stop-gradient).
    """
    f = output.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = weight * distance(f, target.detach())
        (grad,) = torch.autograd.grad(loss.sum(), f)
    return -grad, loss.detach()


def discrete_tangents(net: nn.Module, batch: AnalysisBatch, distances: Mapping[str, nn.Module]) -> TangentSet:
    """The discrete tangent of every distance in `distances` (name -> module) on one batch."""
    output, target = consistency_outputs(net, batch)
    tangents, losses = {}, {}
    for name, distance in distances.items():
        tangents[name], losses[name] = discrete_tangent(distance, output, target, batch.weight)
    return TangentSet(output, target, tangents, losses)


# ---------------------------------------------------------------- continuous tangents
@dataclass
class ContinuousTangent:
    """Attributes: `output` [B, C, H, W] `f(x_t, t)`; `velocity` [B, ...] `d/dt` of `f` (or of
    `phi(f)`, flattened [B, F]) along the ODE; `tangent` [B, C, H, W] the pixel-space update
    `-(1/t) u(velocity)` (pulled back through `J_phi^T` for features)."""

    output: Tensor
    velocity: Tensor
    tangent: Tensor


def output_velocity(net: nn.Module, batch: AnalysisBatch, phi: FeatureMap | None = None) -> tuple[Tensor, Tensor]:
    """`(f(x_t, t), d g(f(x_t, t))/dt)` with `g = phi` or the identity: a JVP in direction `(v, 1)`.

    Returns [B, C, H, W] and [B, C, H, W] (pixels) or [B, F] (features). No parameter gradients.
    """
    x_t = batch.x_t
    with eval_mode(net):
        return output_tangent(net, x_t, batch.t, conditional_velocity(x_t, batch.x0, batch.t), batch.labels, phi)


def continuous_tangent(net: nn.Module, batch: AnalysisBatch, phi: FeatureMap | None = None) -> ContinuousTangent:
    """The continuous-time tangent in pixels (`phi=None`) or in the features `phi` (method.md section 5)."""
    output, velocity = output_velocity(net, batch, phi)
    scale = (1.0 / batch.t).view(-1, *([1] * (velocity.dim() - 1)))
    update = -scale * rms_normalise(velocity)  # in pixels, or in features when phi is given
    if phi is None:
        return ContinuousTangent(output, velocity, update)
    with torch.enable_grad():
        _, pull_back = torch.func.vjp(phi, output)
        (tangent,) = pull_back(update)
    return ContinuousTangent(output, velocity, tangent.detach())


# ---------------------------------------------------------------- everything at once
def all_tangents(net: nn.Module, batch: AnalysisBatch, modules: Mapping[str, nn.Module | None]) -> TangentSet:
    """Tangents for every name of `modules` (name -> distance, or for `continuous[:mfd]` the
    MFD module / None) on one batch, in the order given. [B, C, H, W] each."""
    discrete = {n: m for n, m in modules.items() if not is_continuous(n)}
    result = discrete_tangents(net, batch, discrete)
    for name, module in modules.items():
        if is_continuous(name):
            phi = None if module is None else feature_map(module)
            result.tangents[name] = continuous_tangent(net, batch, phi).tangent
    result.tangents = {n: result.tangents[n] for n in modules}
    return result


def check_consistency_state(state: dict, path: str) -> None:
    """Raise AytError unless a checkpoint's JSON state is a consistency model (kind "ect")."""
    kind = state.get("kind")
    if kind == "edm":
        raise AytError(f"{path} is a diffusion (EDM) checkpoint; tangents are defined for consistency models: "
                       "pass a checkpoint of an ECT run (objective.kind=ect)")
    check(kind in ("ect", "continuous"), f"{path} holds a {kind!r} run, not a consistency model; pass a checkpoint of an ECT run")
