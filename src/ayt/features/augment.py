"""Off-manifold perturbations and their regression targets (method.md section 4).

The feature network `phi` is trained to regress the parameters `w` of random perturbations of
clean images. Each perturbation is applied to each image independently with probability `p`;
its target slots are 0 when it is not applied, and the image is then left bit-for-bit unchanged
(every step is blended in with a `torch.where` mask, never an "identity" warp or filter).

Two recipes (`recipe=`; the feature network's config key `features.recipe`):
  reference  (default) what the AYT reference code does (`augmentations.py`, an extension of the
             EDM / StyleGAN2-ADA augmentation pipe, with config `geo_clr_deg.yaml`);
  legacy     what `ayt` did before issue 12; kept to reproduce the earlier benchmark tables.
They differ in six places (see `RECIPES`):
  aniso frame   reference: the axis angle u is 0 with probability 0.5, else U(-pi, pi);
                legacy: always U(-pi, pi). With u uniform, (w cos u, w sin u) is not learnable (see the caveat below); with
                u = 0 half of the time the `w cos u` slot is.
  warp          reference: scale, then rotation, then anisotropic scale (in the output frame),
                then translation, resampled as the EDM pipe does: reflect padding, 2x upsampling
                with the sym6 wavelet filter, bilinear `grid_sample` at 2x, sym6 downsampling.
                legacy: anisotropic scale before the rotation; one bilinear `grid_sample` at 1x
                (reflection padding), which also blurs by a sub-pixel-dependent amount.
  contrast      reference: `c x` (about 0, so it also scales the brightness shift applied just
                before it); legacy: `m + c (x - m)`, m the per-image mean.
  blur          reference: an 11-tap kernel (radius 5), renormalised, so the effective sigma
                saturates near 2.5 for sigma -> 3; legacy: radius 12 (an untruncated Gaussian).
  mixup partner reference: the already perturbed (warped, coloured, blurred) batch in reversed
                order; the middle image of an odd batch would be its own partner and never gets
                mixup (the reference labels it anyway); legacy: the clean image, one random cycle.
  noise         reference: `w n / rms(n)`, per-image RMS exactly w; legacy: `w n`, n ~ N(0, 1).
Known remaining difference: the reference also labels hue and saturation on gray images, where
they change nothing; here they are never applied to gray images (targets stay 0). And the
reference sends every image of a batch through the 2x resampling when any image is warped (an
identity warp then returns the image up to rounding); here unwarped images stay bit-identical.

Order of application: geometric (one affine map, resampled once), colour (brightness,
contrast, hue, saturation), degradation (blur, mixup, additive noise).
Values are not clamped: brightness, contrast and noise may leave [-1, 1] a little, and clamping
would change the noise RMS that is the target.

Definitions (method.md section 4; `w ~ N(0, 1)` where the method leaves the law unstated):
  iso_scale    factor 2^(0.2 w)                                    -> w
  rotation     angle w ~ U(-pi, pi), counter-clockwise as displayed -> (cos w - 1, sin w)
  aniso_scale  factor 2^(0.2 w) along the axis at angle u and its inverse across it (area
               preserving, as in StyleGAN2-ADA)                    -> (w cos u, w sin u)
  translation  0.125 * size * (w0, w1) pixels (right, down)         -> (w0, w1)
  brightness   x + 0.2 w                                            -> w
  contrast     2^(0.5 w) x (reference) or about the mean (legacy)   -> w
  hue          rotation by w ~ U(-pi, pi) about the gray axis (1, 1, 1)/sqrt(3) -> (cos w - 1, sin w)
  saturation   chroma (x minus its channel mean) scaled by 2^w      -> w
  blur         Gaussian, sigma ~ U(0, 3) pixels                     -> sigma
  mixup        (1 - l) x + l x_partner, l = 0.5 * Beta(1, 3)        -> l
  noise        additive noise of per-image RMS w ~ U(0, 0.5)        -> w
"Luma" here is the channel mean (the gray axis), which hue rotation preserves exactly.
Gray images (C != 3): hue and saturation are never applied; brightness and contrast are.
A batch of one never gets mixup.
Caveat of method.md's target: `(w cos u, w sin u)` is not a function of the warp (u and u + pi
give the same warp, and so do (w, u) and (-w, u + pi/2)), so the best regressor predicts 0 on
average for the `w sin u` slot, and for `w cos u` too when u is uniform (legacy recipe).
`aniso_target="double_angle"` regresses `(w cos 2u, w sin 2u)` instead, which takes one value
per warp; the default `"paper"` keeps method.md's form.
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


@dataclass(frozen=True)
class Recipe:
    """How the perturbations are made; the fields are the differences listed in the module docstring."""

    aniso_axis_p: float  # probability that the anisotropic-scale axis angle is drawn (else 0)
    warp: str  # "edm_2x" (sym6 2x resampling, rotation before aniso) | "bilinear_1x" (aniso before rotation)
    contrast_about_mean: bool  # contrast scales x - mean (legacy) or x itself (reference)
    blur_radius: int  # half-width of the blur kernel (the kernel has 2 radius + 1 taps)
    mixup_reversed: bool  # partner: the perturbed batch reversed (reference) or a clean random cycle
    noise_unit_rms: bool  # noise rescaled to per-image RMS exactly 1 before the weight w


RECIPES: dict[str, Recipe] = {
    "reference": Recipe(aniso_axis_p=0.5, warp="edm_2x", contrast_about_mean=False,
                        blur_radius=5, mixup_reversed=True, noise_unit_rms=True),
    "legacy": Recipe(aniso_axis_p=1.0, warp="bilinear_1x", contrast_about_mean=True,
                     blur_radius=math.ceil(4 * BLUR_SIGMA_MAX), mixup_reversed=False, noise_unit_rms=False),
}


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


def affine_matrix(
    scale: Tensor, angle: Tensor, aniso_scale: Tensor, aniso_angle: Tensor, aniso_last: bool = False
) -> Tensor:
    """Linear part [B, 2, 2] in pixel coordinates (x right, y down) of the geometric perturbation.

    `A = R(u) diag(a, 1/a) R(u)^T` with R counter-clockwise as displayed; aniso_last=False gives
    `M = scale R(angle) A` (legacy), aniso_last=True `M = scale A R(angle)`: the stretch acts in
    the output frame, after the rotation, as in the reference pipe.
    """
    a = aniso_scale
    diag = torch.diag_embed(torch.stack([a, 1.0 / a], -1))
    frame = _rot2d(aniso_angle)
    aniso = frame @ diag @ frame.transpose(-1, -2)
    rot = _rot2d(angle)
    first, second = (aniso, rot) if aniso_last else (rot, aniso)
    return scale[:, None, None] * first @ second


def affine_warp(
    x: Tensor, scale: Tensor, angle: Tensor, aniso_scale: Tensor, aniso_angle: Tensor, shift: Tensor,
    aniso_last: bool = False, resample: str = "bilinear_1x",
) -> Tensor:
    """Warp x [B, C, H, W] by one affine map about the image centre (method.md section 4, geometric).

    scale, aniso_scale: factors [B]; angle, aniso_angle: radians [B] (counter-clockwise as
    displayed); shift [B, 2]: (right, down) in fractions of (W, H). A content point `q` moves
    to `M q + shift` (`M` from `affine_matrix`). resample: "bilinear_1x", one bilinear
    `grid_sample` with reflection padding, align_corners=False (a 90-degree turn of a square
    image maps pixel centres onto pixel centres); "edm_2x", see `resample_sym6_2x`.
    """
    check(resample in ("bilinear_1x", "edm_2x"), f"unknown resampling {resample!r}; use bilinear_1x or edm_2x")
    b, _, h, w = x.shape
    dt = torch.promote_types(x.dtype, torch.float32)  # the 2x2 inverse needs at least fp32
    m = affine_matrix(*(v.to(device=x.device, dtype=dt) for v in (scale, angle, aniso_scale, aniso_angle)), aniso_last)
    size = torch.tensor([w, h], device=x.device, dtype=dt)
    shift = shift.to(device=x.device, dtype=dt)
    if resample == "edm_2x":
        inv = torch.linalg.inv(m)
        return resample_sym6_2x(x, inv, -(inv @ (shift * size)[:, :, None])[:, :, 0])
    inv = torch.linalg.inv(m * size[None, None, :] / size[None, :, None])  # K^-1 M K, K = diag(W, H): [-1, 1] coords
    theta = torch.cat([inv, -(inv @ (2.0 * shift)[:, :, None])], dim=2).to(x.dtype)  # output -> input coords
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _normalised_theta(inv: Tensor, offset: Tensor, size_in: Tensor, size_out: Tensor) -> Tensor:
    """`affine_grid` theta [B, 2, 3] of the map `p_in = inv p_out + offset` in centred pixel coordinates.

    size_in, size_out: (W, H) of the sampled and the produced image; with align_corners=False a
    centred pixel coordinate q is the normalised coordinate 2 q / size.
    """
    lin = inv * (2.0 / size_in)[None, :, None] * (size_out / 2.0)[None, None, :]
    return torch.cat([lin, (offset * 2.0 / size_in)[:, :, None]], dim=2)


# The sym6 wavelet's low-pass decomposition filter (12 taps, orthonormal: sum 2^0.5, norm 1).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
_SYM6_PAD = len(SYM6) // 4  # output margin kept for the downsampling filter's support


def sym6_upsampling_matrix(n: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """U [n, 2n] with `U[i, m] = h[m + 5 - 2 i]` (h = SYM6): `x @ U` inserts zeros and filters with h.

    Its transpose is the matching downsampling (filter with h, keep every other sample): U U^T = I
    away from the ends, because h is orthogonal to its even shifts.
    """
    h = torch.tensor(SYM6, device=device, dtype=dtype or torch.float32)
    k = torch.arange(2 * n, device=device)[None, :] + (len(SYM6) - 2) // 2 - 2 * torch.arange(n, device=device)[:, None]
    return torch.where((k >= 0) & (k < len(SYM6)), h[k.clamp(0, len(SYM6) - 1)], 0.0)


def upsample_2x(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C, 2H, 2W]: zero insertion, then the sym6 filter along each axis (DC gain 1)."""
    up_w = sym6_upsampling_matrix(x.shape[3], x.device, x.dtype)
    up_h = sym6_upsampling_matrix(x.shape[2], x.device, x.dtype)
    return up_h.T @ (x @ up_w)


def downsample_2x(x: Tensor) -> Tensor:
    """[B, C, 2H, 2W] -> [B, C, H, W]: the sym6 filter along each axis, keeping every other sample."""
    down_w = sym6_upsampling_matrix(x.shape[3] // 2, x.device, x.dtype).T
    down_h = sym6_upsampling_matrix(x.shape[2] // 2, x.device, x.dtype)
    return down_h @ (x @ down_w)


def resample_sym6_2x(x: Tensor, inv: Tensor, offset: Tensor) -> Tensor:
    """Resample x [B, C, H, W] at `p_in = inv p_out + offset` as the EDM / StyleGAN2-ADA augment pipe does.

    inv [B, 2, 2], offset [B, 2]: centred pixel coordinates (x right, y down). Steps: reflect-pad
    the batch as far as any output corner reaches (plus the filter support, at most size - 1),
    upsample 2x with sym6, sample bilinearly at 2x (zeros outside), downsample with sym6 and crop.
    The identity map returns x up to rounding (sym6 is orthonormal), and integer shifts are exact.
    """
    b, c, h, w = x.shape
    dt = inv.dtype
    half = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=x.device, dtype=dt)
    corners = half * torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], device=x.device, dtype=dt)
    reach = corners @ inv.transpose(1, 2) + offset[:, None, :]  # [B, 4, 2]: where the corners sample
    limit = torch.tensor([w - 1, h - 1], device=x.device, dtype=dt)
    low = ((-reach).amax((0, 1)) - half + 2 * _SYM6_PAD).clamp(min=0).minimum(limit).ceil()
    high = (reach.amax((0, 1)) - half + 2 * _SYM6_PAD).clamp(min=0).minimum(limit).ceil()
    (left, top), (right, bottom) = low.int().tolist(), high.int().tolist()
    x = F.pad(x, [left, right, top, bottom], mode="reflect")
    offset = offset + torch.tensor([(left - right) / 2, (top - bottom) / 2], device=x.device, dtype=dt)

    # Centred coordinates at 2x: the 1x position q is q2 = 2 q - 1/2 (the delay of the sym6 pair).
    up = upsample_2x(x)
    inv2, offset2 = inv, 2 * offset + 0.5 * (inv.sum(-1) - 1.0)
    out_w, out_h = 2 * (w + 2 * _SYM6_PAD), 2 * (h + 2 * _SYM6_PAD)
    size_in = torch.tensor([up.shape[3], up.shape[2]], device=x.device, dtype=dt)
    theta = _normalised_theta(inv2, offset2, size_in, torch.tensor([out_w, out_h], device=x.device, dtype=dt))
    grid = F.affine_grid(theta.to(x.dtype), [b, c, out_h, out_w], align_corners=False)
    y = F.grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    p = _SYM6_PAD
    return downsample_2x(y)[:, :, p:-p, p:-p]


def adjust_brightness(x: Tensor, delta: Tensor) -> Tensor:
    """`x + delta` per image (delta [B]); the perturbation uses delta = 0.2 w."""
    return x + _per_image(delta, x)


def adjust_contrast(x: Tensor, factor: Tensor, about_mean: bool = False) -> Tensor:
    """`factor x` (reference), or `m + factor (x - m)` with m the per-image mean over C, H, W (legacy).

    factor [B]; the perturbation uses 2^(0.5 w).
    """
    m = x.mean(dim=(1, 2, 3), keepdim=True) if about_mean else torch.zeros_like(x[:, :1, :1, :1])
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


def unit_rms(noise: Tensor) -> Tensor:
    """Rescale each image of noise [B, C, H, W] to RMS exactly 1 (the reference's noise shell)."""
    return noise / noise.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()


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


def _reversed_partner(batch: int, device: torch.device) -> Tensor:
    """The batch in reversed order, Long [B] (the middle image of an odd batch is its own partner)."""
    return torch.arange(batch - 1, -1, -1, device=device)


def _draw_w(batch: int, device: torch.device, generator: torch.Generator | None,
            aniso_axis_p: float = 1.0) -> dict[str, Tensor]:
    """Raw parameter draws of all perturbations (method.md section 4 laws; N(0,1) where unstated).

    The anisotropic-scale axis angle is U(-pi, pi) with probability aniso_axis_p and 0 otherwise
    (the coin is drawn only when aniso_axis_p < 1, so the legacy recipe's stream is unchanged).
    """

    def unif(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(batch, device=device, generator=generator)

    def normal(*shape: int) -> Tensor:
        return torch.randn(batch, *shape, device=device, generator=generator)

    w = {
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
    if aniso_axis_p < 1.0:
        tilted = unif(0.0, 1.0) < aniso_axis_p
        w["aniso_scale"][:, 1] = torch.where(tilted, w["aniso_scale"][:, 1], 0.0)
    return w


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
                 aniso_target: str = "paper", recipe: str = "reference") -> None:
        self.names = subset_perturbations(subset)
        check(0.0 <= p <= 1.0, f"perturbation probability p must be in [0, 1], got {p}")
        check(ramp_steps >= 0, f"ramp_steps must be >= 0, got {ramp_steps}")
        check(aniso_target in ANISO_TARGETS, f"unknown aniso_target {aniso_target!r}; use one of {list(ANISO_TARGETS)}")
        check(recipe in RECIPES, f"unknown perturbation recipe {recipe!r}; use one of {list(RECIPES)}")
        self.subset, self.p, self.ramp_steps = subset, float(p), int(ramp_steps)
        self.aniso_target, self.recipe = aniso_target, RECIPES[recipe]
        self.groups = SUBSETS[subset]

    @classmethod
    def from_config(cls, cfg: FeaturesConfig) -> Perturber:
        """Build from the `features` section of a config (subset, p, ramp_steps, aniso_target, recipe)."""
        return cls(cfg.subset, cfg.p, cfg.ramp_steps, cfg.aniso_target, cfg.recipe)

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
        w = _draw_w(batch, dev, generator, self.recipe.aniso_axis_p)
        if self.recipe.mixup_reversed:
            partner = _reversed_partner(batch, dev)
        else:
            partner = _cycle_partner(batch, dev, generator)
        usable = set(self.names) - ({"hue", "saturation"} if channels != 3 else set())
        applied = {n: coins[:, i] & (n in usable) for i, n in enumerate(PERTURBATIONS)}
        applied["mixup"] &= partner != torch.arange(batch, device=dev)  # never mixed with itself
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
        edm = self.recipe.warp == "edm_2x"
        warped = affine_warp(x, 2.0 ** (0.2 * iso), angle, 2.0 ** (0.2 * aniso), u, shift,
                             aniso_last=edm, resample=self.recipe.warp)
        any_geo = on["iso_scale"] | on["rotation"] | on["aniso_scale"] | on["translation"]
        return _blend(any_geo, warped, x)

    def _colour(self, x: Tensor, prm: PerturbationParams) -> Tensor:
        on, w = prm.applied, prm.w
        if "colour" not in self.groups:
            return x
        x = _blend(on["brightness"], adjust_brightness(x, 0.2 * w["brightness"]), x)
        contrast = adjust_contrast(x, 2.0 ** (0.5 * w["contrast"]), self.recipe.contrast_about_mean)
        x = _blend(on["contrast"], contrast, x)
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
        x = _blend(on["blur"], gaussian_blur(x, w["blur"], radius=self.recipe.blur_radius), x)
        partner = x[prm.partner] if self.recipe.mixup_reversed else clean[prm.partner]
        x = _blend(on["mixup"], mixup(x, partner, w["mixup"]), x)
        dev = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, device=dev, generator=generator)
        noise = (unit_rms(noise) if self.recipe.noise_unit_rms else noise).to(device=x.device, dtype=x.dtype)
        return _blend(on["noise"], add_noise(x, w["noise"], noise), x)


def _blend(on: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Per-image select: `new` where on [B] is True, `old` (bit-identical) elsewhere."""
    return torch.where(on[:, None, None, None], new, old)


def check_images(x: Tensor) -> None:
    """Raise AytError unless x is a float image batch [B, C, H, W] with H, W >= 8."""
    check(x.ndim == 4, f"expected images [B, C, H, W], got shape {tuple(x.shape)}; add a batch dimension")
    check(x.is_floating_point(), f"expected float images in [-1, 1], got {x.dtype}; convert with x.float()")
    check(min(x.shape[2:]) >= 8, f"images must be at least 8x8, got {tuple(x.shape[2:])}; use larger images")
