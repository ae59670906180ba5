"""Off-manifold perturbations and their regression targets (method.md section 4).

The feature network `phi` is trained to regress the parameters `w` of random perturbations of
clean images. Each perturbation is applied to each image independently with probability `p`;
its target slots are 0 when it is not applied, and the image is then left bit-for-bit unchanged
(every step is blended in with a `torch.where` mask, never an "identity" warp or filter).

Order of application (our choice; method.md does not fix it):
  1. geometric: isotropic scale, rotation, anisotropic scale and translation are composed into
     ONE affine map and resampled once (`affine_grid` + bilinear `grid_sample`,
     reflection padding at the border, so no black corners give the warp away);
  2. colour: brightness, contrast, hue, saturation (in that order);
  3. degradation: Gaussian blur, mixup with the *clean* partner image, additive Gaussian noise.
Values are not clamped: brightness, contrast and noise may leave [-1, 1] a little, and clamping
would change the noise RMS that is the target.

Definitions (method.md section 4; `w ~ N(0, 1)` where the method leaves the law unstated):
  iso_scale    factor 2^(0.2 w)                                    -> w
  rotation     angle w ~ U(-pi, pi), counter-clockwise as displayed -> (cos w - 1, sin w)
  aniso_scale  factor 2^(0.2 w) along the axis at angle u ~ U(-pi, pi) and its inverse across
               it (area preserving, as in StyleGAN2-ADA)            -> (w cos u, w sin u)
  translation  0.125 * size * (w0, w1) pixels (right, down)         -> (w0, w1)
  brightness   x + 0.2 w                                            -> w
  contrast     m + 2^(0.5 w) (x - m), m the per-image mean over C, H, W -> w
  hue          rotation by w ~ U(-pi, pi) about the gray axis (1, 1, 1)/sqrt(3) -> (cos w - 1, sin w)
  saturation   chroma (x minus its channel mean) scaled by 2^w      -> w
  blur         Gaussian, sigma ~ U(0, 3) pixels                     -> sigma
  mixup        (1 - l) x + l x_partner, l = 0.5 * Beta(1, 3)        -> l
  noise        x + w n, n ~ N(0, 1) per pixel, w ~ U(0, 0.5)        -> w
"Luma" here is the channel mean (the gray axis), which hue rotation preserves exactly.
Gray images (C != 3): hue and saturation are undefined, so they are never applied and their
target slots stay 0; brightness and contrast apply as usual. Mixup needs a partner: the
partners form one random cycle over the batch (no image is its own partner); a batch of one
never gets mixup.
Caveat of method.md's target: `(w cos u, w sin u)` is not a function of the warp (u and u + pi
give the same warp, and so do (w, u) and (-w, u + pi/2)), so the best regressor predicts 0 on
average for these two slots. `aniso_target="double_angle"` regresses `(w cos 2u, w sin 2u)`
instead, which takes one value per warp; the default `"paper"` keeps method.md's form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ayt.errors import AytError, check

if TYPE_CHECKING:
    from ayt.config import FeaturesConfig

# perturbation name -> (group, names of its target slots), in target order.
PERTURBATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "iso_scale": ("geometric", ("iso_scale",)),
    "rotation": ("geometric", ("rotation_cos_m1", "rotation_sin")),
    "aniso_scale": ("geometric", ("aniso_wcos", "aniso_wsin")),
    "translation": ("geometric", ("shift_x", "shift_y")),
    "brightness": ("colour", ("brightness",)),
    "contrast": ("colour", ("contrast",)),
    "hue": ("colour", ("hue_cos_m1", "hue_sin")),
    "saturation": ("colour", ("saturation",)),
    "blur": ("degradation", ("blur_sigma",)),
    "mixup": ("degradation", ("mixup_weight",)),
    "noise": ("degradation", ("noise_rms",)),
}
GROUPS: tuple[str, ...] = ("geometric", "colour", "degradation")
SUBSETS: dict[str, tuple[str, ...]] = {
    "geo": ("geometric",),
    "geo_colour": ("geometric", "colour"),
    "geo_degrade": ("geometric", "degradation"),
    "degrade": ("degradation",),
    "all": GROUPS,
}
BLUR_SIGMA_MAX = 3.0
_BLUR_RADIUS = math.ceil(4 * BLUR_SIGMA_MAX)  # 4 sigma: the truncated kernel keeps 99.9% of the variance


def subset_perturbations(subset: str) -> tuple[str, ...]:
    """The perturbation names of a named subset, in target order; AytError on unknown names."""
    if subset not in SUBSETS:
        raise AytError(f"unknown perturbation subset {subset!r}; use one of {', '.join(SUBSETS)}")
    return tuple(name for name, (group, _) in PERTURBATIONS.items() if group in SUBSETS[subset])


TARGET_NAMES: dict[str, tuple[str, ...]] = {
    s: tuple(t for name in subset_perturbations(s) for t in PERTURBATIONS[name][1]) for s in SUBSETS
}


def perturbation_slices(subset: str) -> dict[str, slice]:
    """Target slots of each perturbation of `subset`, e.g. {"rotation": slice(1, 3), ...}."""
    out, start = {}, 0
    for name in subset_perturbations(subset):
        width = len(PERTURBATIONS[name][1])
        out[name], start = slice(start, start + width), start + width
    return out


def target_groups(subset: str) -> dict[str, slice]:
    """Target slots of each group present in `subset` ("geometric", "colour", "degradation")."""
    slices = perturbation_slices(subset)
    out = {}
    for group in SUBSETS[subset]:
        mine = [s for name, s in slices.items() if PERTURBATIONS[name][0] == group]
        out[group] = slice(mine[0].start, mine[-1].stop)
    return out


# ---------------------------------------------------------------------------------------------
# Pure functions with explicit parameters. x: [B, C, H, W]; per-image parameters: [B].


def _per_image(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-image value [B] to [B, 1, 1, 1] on x's device and dtype."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1)


def _rot2d(angle: Tensor) -> Tensor:
    """Counter-clockwise (as displayed, y axis pointing down) rotation matrices [B, 2, 2]."""
    c, s = angle.cos(), angle.sin()
    return torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)


def affine_matrix(scale: Tensor, angle: Tensor, aniso_scale: Tensor, aniso_angle: Tensor) -> Tensor:
    """Linear part `M = scale R(angle) R(u) diag(a, 1/a) R(u)^T` [B, 2, 2], in pixel-shaped coordinates."""
    a = aniso_scale
    diag = torch.diag_embed(torch.stack([a, 1.0 / a], -1))
    frame = _rot2d(aniso_angle)
    aniso = frame @ diag @ frame.transpose(-1, -2)
    return scale[:, None, None] * _rot2d(angle) @ aniso


def affine_warp(
    x: Tensor, scale: Tensor, angle: Tensor, aniso_scale: Tensor, aniso_angle: Tensor, shift: Tensor
) -> Tensor:
    """Warp x [B, C, H, W] by one affine map about the image centre (method.md section 4, geometric).

    scale, aniso_scale: factors [B]; angle, aniso_angle: radians [B] (counter-clockwise as
    displayed); shift [B, 2]: (right, down) in fractions of (W, H). A content point `q` moves
    to `M q + shift`. One bilinear `grid_sample`, reflection padding, align_corners=False (so a
    90-degree turn of a square image maps pixel centres onto pixel centres).
    """
    b, _, h, w = x.shape
    dt = torch.promote_types(x.dtype, torch.float32)  # the 2x2 inverse needs at least fp32
    m = affine_matrix(*(v.to(device=x.device, dtype=dt) for v in (scale, angle, aniso_scale, aniso_angle)))
    k = torch.tensor([w, h], device=x.device, dtype=dt)
    m_norm = m * k[None, None, :] / k[None, :, None]  # K^-1 M K, K = diag(W, H): per-axis [-1, 1] coords
    inv = torch.linalg.inv(m_norm)
    t = 2.0 * shift.to(device=x.device, dtype=dt)
    theta = torch.cat([inv, -(inv @ t[:, :, None])], dim=2).to(x.dtype)  # output coords -> input coords
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def adjust_brightness(x: Tensor, delta: Tensor) -> Tensor:
    """`x + delta` per image (delta [B]); the perturbation uses delta = 0.2 w."""
    return x + _per_image(delta, x)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """`m + factor (x - m)`, m the per-image mean over C, H, W (factor [B]; perturbation: 2^(0.5 w))."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return m + _per_image(factor, x) * (x - m)


def _check_rgb(x: Tensor, what: str) -> None:
    check(x.shape[1] == 3, f"{what} needs 3 colour channels, got {x.shape[1]}; skip it for gray images")


def hue_rotate(x: Tensor, angle: Tensor) -> Tensor:
    """Rotate RGB colours by angle [B] about the gray axis v = (1,1,1)/sqrt(3) (Rodrigues).

    With chroma c = x - mean_c(x) (orthogonal to v): x' = mean + cos(a) c + sin(a) v x c.
    Preserves the channel mean exactly in exact arithmetic; angle 0 returns x up to rounding.
    """
    _check_rgb(x, "hue rotation")
    m = x.mean(dim=1, keepdim=True)
    c = x - m
    cross = torch.stack([c[:, 2] - c[:, 1], c[:, 0] - c[:, 2], c[:, 1] - c[:, 0]], 1) / math.sqrt(3.0)
    return m + _per_image(angle.cos(), x) * c + _per_image(angle.sin(), x) * cross


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Scale the chroma `x - mean_c(x)` by factor [B] (perturbation: 2^w); 0 gives gray."""
    _check_rgb(x, "saturation")
    m = x.mean(dim=1, keepdim=True)
    return m + _per_image(factor, x) * (x - m)


def gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """Normalised 1-D Gaussian kernels [B, 2 radius + 1], one per sigma [B]; sigma 0 gives a delta."""
    k = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    g = torch.exp(-0.5 * (k[None, :] / sigma.clamp_min(1e-6)[:, None]) ** 2)
    return g / g.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int | None = None) -> Tensor:
    """Blur each image of x [B, C, H, W] with its own Gaussian sigma [B] (pixels); separable, grouped conv.

    radius defaults to ceil(4 max sigma) (reads sigma.max(), a device sync); it is capped at
    min(H, W) - 1 because the border is reflected. Kernels are renormalised after truncation.
    """
    b, c, h, w = x.shape
    if radius is None:
        radius = math.ceil(4.0 * float(sigma.max()))
    radius = max(0, min(radius, h - 1, w - 1))
    kern = gaussian_kernels(sigma.to(device=x.device, dtype=x.dtype), radius).repeat_interleave(c, 0)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kern[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kern[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def mixup(x: Tensor, partner: Tensor, weight: Tensor) -> Tensor:
    """`(1 - weight) x + weight partner` per image (weight [B]; perturbation: 0.5 Beta(1, 3))."""
    lam = _per_image(weight, x)
    return (1.0 - lam) * x + lam * partner


def add_noise(x: Tensor, rms: Tensor, noise: Tensor) -> Tensor:
    """`x + rms * noise` with per-image rms [B] and unit Gaussian noise [B, C, H, W]."""
    return x + _per_image(rms, x) * noise


# ---------------------------------------------------------------------------------------------
# Random parameters and the pipeline.


@dataclass
class PerturbationParams:
    """Per-image random draws of one batch.

    applied: name -> Bool [B] for every name in PERTURBATIONS (False outside the subset).
    w: name -> raw draw, [B], or [B, 2] for aniso_scale (w, u) and translation (w0, w1);
       blur holds sigma, mixup the weight, noise the RMS.
    partner: Long [B], the mixup partner of each image.
    """

    applied: dict[str, Tensor]
    w: dict[str, Tensor]
    partner: Tensor


def _cycle_partner(batch: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """A random permutation with no fixed point for batch >= 2: one random cycle, Long [B]."""
    order = torch.randperm(batch, device=device, generator=generator)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return partner


def _draw_w(batch: int, device: torch.device, generator: torch.Generator | None) -> dict[str, Tensor]:
    """Raw parameter draws of all perturbations (method.md section 4 laws; N(0,1) where unstated)."""

    def unif(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(batch, device=device, generator=generator)

    def normal(*shape: int) -> Tensor:
        return torch.randn(batch, *shape, device=device, generator=generator)

    return {
        "iso_scale": normal(),
        "rotation": unif(-math.pi, math.pi),
        "aniso_scale": torch.stack([normal(), unif(-math.pi, math.pi)], 1),
        "translation": normal(2),
        "brightness": normal(),
        "contrast": normal(),
        "hue": unif(-math.pi, math.pi),
        "saturation": normal(),
        "blur": unif(0.0, BLUR_SIGMA_MAX),
        "mixup": 0.5 * (1.0 - (1.0 - unif(0.0, 1.0)) ** (1.0 / 3.0)),  # inverse CDF of Beta(1, 3)
        "noise": unif(0.0, 0.5),
    }


ANISO_TARGETS = ("paper", "double_angle")


def _target(name: str, w: Tensor, aniso_target: str = "paper") -> Tensor:
    """Regression target [B, k] of one perturbation from its raw draw (method.md section 4)."""
    if name in ("rotation", "hue"):
        return torch.stack([w.cos() - 1.0, w.sin()], 1)
    if name == "aniso_scale":
        u = w[:, 1] * (2.0 if aniso_target == "double_angle" else 1.0)
        return torch.stack([w[:, 0] * u.cos(), w[:, 0] * u.sin()], 1)
    return w if w.ndim == 2 else w[:, None]


class Perturber:
    """Random perturbations plus their regression targets (method.md section 4).

    `perturber(x, generator, step) -> (x_perturbed [B, C, H, W], targets [B, target_dim])` for
    x in [-1, 1], any resolution >= 8, any device. See the module docstring for the definitions.
    """

    def __init__(self, subset: str = "all", p: float = 0.15, ramp_steps: int = 0,
                 aniso_target: str = "paper") -> None:
        self.names = subset_perturbations(subset)
        check(0.0 <= p <= 1.0, f"perturbation probability p must be in [0, 1], got {p}")
        check(ramp_steps >= 0, f"ramp_steps must be >= 0, got {ramp_steps}")
        check(aniso_target in ANISO_TARGETS, f"unknown aniso_target {aniso_target!r}; use one of {list(ANISO_TARGETS)}")
        self.subset, self.p, self.ramp_steps = subset, float(p), int(ramp_steps)
        self.aniso_target = aniso_target
        self.groups = SUBSETS[subset]

    @classmethod
    def from_config(cls, cfg: FeaturesConfig) -> Perturber:
        """Build from the `features` section of a config (subset, p, ramp_steps, aniso_target)."""
        return cls(cfg.subset, cfg.p, cfg.ramp_steps, cfg.aniso_target)

    @property
    def target_dim(self) -> int:
        """Length of the target vector: 7 geo, 12 geo_colour, 10 geo_degrade, 3 degrade, 15 all."""
        return len(TARGET_NAMES[self.subset])

    def probability(self, step: int | None = None) -> float:
        """p ramped linearly from 0 at step 0 to p at ramp_steps (p itself when step is None)."""
        if step is None or self.ramp_steps == 0:
            return self.p
        return self.p * min(max(step, 0) / self.ramp_steps, 1.0)

    def sample_params(
        self,
        batch: int,
        channels: int,
        *,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> PerturbationParams:
        """Draw masks and parameters for a batch; drawn on the generator's device, returned on `device`."""
        check(batch >= 1 and channels >= 1, f"need batch, channels >= 1, got {batch}, {channels}")
        dev = generator.device if generator is not None else torch.device(device)
        coins = torch.rand(batch, len(PERTURBATIONS), device=dev, generator=generator) < self.probability(step)
        w = _draw_w(batch, dev, generator)
        partner = _cycle_partner(batch, dev, generator)
        usable = set(self.names) - ({"hue", "saturation"} if channels != 3 else set())
        usable -= {"mixup"} if batch < 2 else set()
        applied = {n: coins[:, i] & (n in usable) for i, n in enumerate(PERTURBATIONS)}
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return PerturbationParams(move(applied), move(w), partner.to(device))

    def targets(self, params: PerturbationParams) -> Tensor:
        """Target vectors [B, target_dim]: each perturbation's target, 0 where it was not applied."""
        parts = [torch.where(params.applied[n][:, None], _target(n, params.w[n], self.aniso_target), 0.0) for n in self.names]
        return torch.cat(parts, dim=1)

    def apply(self, x: Tensor, params: PerturbationParams, generator: torch.Generator | None = None) -> Tensor:
        """Apply the drawn perturbations to x [B, C, H, W]: geometric, colour, then degradation."""
        clean = x
        x = self._geometric(x, params)
        x = self._colour(x, params)
        return self._degrade(x, clean, params, generator)

    def __call__(
        self, x: Tensor, generator: torch.Generator | None = None, step: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Perturb x [B, C, H, W] in [-1, 1]; returns (x_perturbed [B, C, H, W], targets [B, target_dim])."""
        check_images(x)
        params = self.sample_params(x.shape[0], x.shape[1], device=x.device, generator=generator, step=step)
        return self.apply(x, params, generator), self.targets(params).to(x.dtype)

    # -- the three stages; each step is blended in with a per-image mask -----------------------
    # A group outside the subset is skipped (its masks are all False anyway).

    def _geometric(self, x: Tensor, prm: PerturbationParams) -> Tensor:
        if "geometric" not in self.groups:
            return x
        on, w = prm.applied, prm.w
        zero = torch.zeros_like(w["rotation"])
        iso = torch.where(on["iso_scale"], w["iso_scale"], zero)
        angle = torch.where(on["rotation"], w["rotation"], zero)
        aniso = torch.where(on["aniso_scale"], w["aniso_scale"][:, 0], zero)
        shift = torch.where(on["translation"][:, None], 0.125 * w["translation"], 0.0)
        u = w["aniso_scale"][:, 1]
        warped = affine_warp(x, 2.0 ** (0.2 * iso), angle, 2.0 ** (0.2 * aniso), u, shift)
        any_geo = on["iso_scale"] | on["rotation"] | on["aniso_scale"] | on["translation"]
        return _blend(any_geo, warped, x)

    def _colour(self, x: Tensor, prm: PerturbationParams) -> Tensor:
        on, w = prm.applied, prm.w
        if "colour" not in self.groups:
            return x
        x = _blend(on["brightness"], adjust_brightness(x, 0.2 * w["brightness"]), x)
        x = _blend(on["contrast"], adjust_contrast(x, 2.0 ** (0.5 * w["contrast"])), x)
        if x.shape[1] == 3:
            x = _blend(on["hue"], hue_rotate(x, w["hue"]), x)
            x = _blend(on["saturation"], adjust_saturation(x, 2.0 ** w["saturation"]), x)
        return x

    def _degrade(
        self, x: Tensor, clean: Tensor, prm: PerturbationParams, generator: torch.Generator | None
    ) -> Tensor:
        if "degradation" not in self.groups:
            return x
        on, w = prm.applied, prm.w
        x = _blend(on["blur"], gaussian_blur(x, w["blur"], radius=_BLUR_RADIUS), x)
        x = _blend(on["mixup"], mixup(x, clean[prm.partner], w["mixup"]), x)
        dev = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, device=dev, generator=generator).to(device=x.device, dtype=x.dtype)
        return _blend(on["noise"], add_noise(x, w["noise"], noise), x)


def _blend(on: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Per-image select: `new` where on [B] is True, `old` (bit-identical) elsewhere."""
    return torch.where(on[:, None, None, None], new, old)


def check_images(x: Tensor) -> None:
    """Raise AytError unless x is a float image batch [B, C, H, W] with H, W >= 8."""
    check(x.ndim == 4, f"expected images [B, C, H, W], got shape {tuple(x.shape)}; add a batch dimension")
    check(x.is_floating_point(), f"expected float images in [-1, 1], got {x.dtype}; convert with x.float()")
    check(min(x.shape[2:]) >= 8, f"images must be at least 8x8, got {tuple(x.shape[2:])}; use larger images")
