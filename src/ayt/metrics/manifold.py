"""Exact metrics on the shapes dataset, whose manifold is known (method.md sections 3 and 6).

A shapes image is `render(p)` for parameters `p` in the box `[PARAM_LOW, PARAM_HIGH]`
(`ayt.data.shapes`). For a generated image `x` we fit `p_hat = argmin_p |x - render(p)|^2`
over the box (`fit_shapes`), then measure

- `manifold_rms`: mean over images of `sqrt(mean_pixels (x - render(p_hat))^2)` in [-1, 1]
  pixel units: how far samples are from the manifold (precision of shape; 0 on the data);
- `param_fd`: Frechet distance between the Gaussians of fitted and reference parameters, in
  normalised units `(p - PARAM_LOW) / (PARAM_HIGH - PARAM_LOW)` (each coordinate in [0, 1]);
- `param_swd`: sliced Wasserstein-2 distance between the same point sets (no Gaussian
  assumption): `sqrt(mean_theta W_2^2(<fitted, theta>, <reference, theta>))` over random unit
  directions `theta`;
- `coverage` (Naeem et al. 2020): the fraction of reference points `r` with at least one
  fitted point within `r`'s k-NN radius (the distance from `r` to its k-th nearest other
  reference point), in normalised units; 1 when generated samples reach every region of the
  data. Compare sets of the same size (the radii shrink as the reference grows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ayt.data.shapes import NUM_PARAMS, PARAM_HIGH, PARAM_LOW, project, render, sample_params
from ayt.errors import check
from ayt.metrics.frechet import frechet_distance

#: Fitting defaults: all starts for `STEPS_ALL` Adam steps, then the best start per image for
#: `STEPS_BEST` more (learning rate in normalised units, cosine-decayed to 1% per phase).
STARTS, STEPS_ALL, STEPS_BEST, LR = 8, 40, 80, 0.03
#: Pixels rendered at once while fitting (bounds the autograd memory to a few hundred MB).
FIT_PIXELS = 2**21
#: Larger images are fitted at this resolution (average-pooled) in the all-starts phase.
COARSE = 16


@dataclass
class FitResult:
    """Best fit of the renderer to each image.

    Attributes:
        params: `[B, P]` canonical parameters inside the box.
        rms: `[B]` root-mean-square pixel error `sqrt(mean (x - render(params))^2)`.
        rendered: `[B, 3, H, W]` the fitted renderings.
    """

    params: torch.Tensor
    rms: torch.Tensor
    rendered: torch.Tensor


def normalise(params: torch.Tensor) -> torch.Tensor:
    """Box coordinates `[..., P]` -> normalised units `(p - PARAM_LOW) / (PARAM_HIGH - PARAM_LOW)`."""
    low, high = PARAM_LOW.to(params), PARAM_HIGH.to(params)
    return (params - low) / (high - low)


def denormalise(u: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalise`."""
    low, high = PARAM_LOW.to(u), PARAM_HIGH.to(u)
    return low + u * (high - low)


def moment_init(images: torch.Tensor) -> torch.Tensor:
    """Closed-form parameter guess `[B, P]` from image moments (exact for a sharp uniform ellipse).

    With the black background, `m = mean_c (x_c + 1) / 2` is the shape's coverage times its mean
    colour. Its weighted centroid is the centre; its weighted covariance has eigenvalues
    `a^2 / 4, b^2 / 4` (semi-axes `a >= b`) with the long axis along the first eigenvector; the
    colour is each channel's mass divided by the ellipse area `pi a b`.
    """
    h, w = images.shape[-2:]
    ink = ((images + 1) / 2).clamp(min=0)  # [B, 3, H, W] coverage * colour
    m = ink.mean(1)  # [B, H, W]
    mass = m.sum((1, 2)).clamp(min=1e-6)
    coords = (torch.arange(h, device=images.device, dtype=images.dtype) + 0.5) * (2 / h) - 1
    v, u = coords[:, None].expand(h, w), coords[None, :].expand(h, w)  # rows (y), columns (x)
    x0 = (m * u).sum((1, 2)) / mass
    y0 = (m * v).sum((1, 2)) / mass
    du, dv = u - x0[:, None, None], v - y0[:, None, None]
    cuu, cvv, cuv = ((m * a * c).sum((1, 2)) / mass for a, c in ((du, du), (dv, dv), (du, dv)))
    cov = torch.stack([torch.stack([cuu, cuv], -1), torch.stack([cuv, cvv], -1)], -2)  # [B, 2, 2]
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    semi_long, semi_short = 2 * evals[:, 1].clamp(min=1e-6).sqrt(), 2 * evals[:, 0].clamp(min=1e-6).sqrt()
    angle = torch.atan2(evecs[:, 1, 1], evecs[:, 0, 1])
    pixel_area = (2 / h) * (2 / w)
    colour = ink.sum((2, 3)) * pixel_area / (math.pi * semi_long * semi_short)[:, None]
    size, aspect = (semi_long * semi_short).sqrt(), semi_long / semi_short
    return project(torch.stack([x0, y0, size, aspect, angle, *colour.unbind(1)], 1))


def _per_image_mse(images: torch.Tensor, params: torch.Tensor, starts: int) -> torch.Tensor:
    """`[B * starts]` mean squared errors of renderings of `params` `[B * starts, P]`."""
    target = images.repeat_interleave(starts, 0)
    return (render(params, images.shape[-1]) - target).pow(2).mean((1, 2, 3))


def _adam_fit(images: torch.Tensor, u0: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Projected Adam on normalised parameters `u0` `[B * S, P]` (S starts per image, image-major)."""
    starts = u0.shape[0] // images.shape[0]
    u = u0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([u], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1), eta_min=lr * 0.01)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        _per_image_mse(images, denormalise(u), starts).sum().backward()  # images are independent
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            u.copy_(normalise(project(denormalise(u))))  # keep the box; wrap the angle into [0, pi)
    return u.detach()


def fit_shapes(images: torch.Tensor, starts: int = STARTS, steps: tuple[int, int] = (STEPS_ALL, STEPS_BEST),
               lr: float = LR, generator: torch.Generator | None = None) -> FitResult:
    """Fit the shapes renderer to each image: `argmin_p |x - render(p)|^2` over the box.

    Start 0 is the moment estimate (`moment_init`), starts 1.. are uniform in the box (drawn
    with `generator`, on the CPU). All starts of a chunk of images run as one batch of
    projected Adam for `steps[0]` steps (on images average-pooled to `COARSE` pixels when
    larger); the best start per image is refined at full resolution for `steps[1]` more.

    Args:
        images: `[B, 3, H, W]`, about [-1, 1] (need not be on the manifold; NaN pixels count
            as 0, infinities as +-1).
    Returns:
        `FitResult` with canonical parameters `[B, P]`, pixel RMS errors `[B]`, renderings.
    """
    check(images.dim() == 4 and images.shape[1] == 3 and images.shape[2] == images.shape[3],
          f"fit_shapes: images must be [B, 3, H, H], got {tuple(images.shape)}; the manifold metrics are for shapes data")
    check(starts >= 1 and len(images) >= 1, f"fit_shapes: need starts >= 1 and images, got {starts}, {len(images)}")
    size = images.shape[-1]
    coarse = COARSE if size > COARSE and size % COARSE == 0 else size
    chunk = max(1, FIT_PIXELS // max(starts * coarse**2, size**2))  # pixels of the larger phase
    x = images.detach().nan_to_num(0.0, 1.0, -1.0)  # a diverged sample scores badly instead of failing
    fits = [_fit_chunk(c, coarse, starts, steps, lr, generator) for c in x.split(chunk)]
    return FitResult(*(torch.cat(parts) for parts in zip(*fits)))


def _fit_chunk(x: torch.Tensor, coarse_size: int, starts: int, steps: tuple[int, int], lr: float,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fit_shapes` on one chunk `[B, 3, H, W]`: returns (params, rms, rendered)."""
    b = x.shape[0]
    coarse = F.avg_pool2d(x, x.shape[-1] // coarse_size)  # kernel 1 when coarse_size == H
    with torch.enable_grad():
        u0 = torch.rand(b, starts, NUM_PARAMS, generator=generator).to(x)
        u0[:, 0] = normalise(moment_init(x))
        u = _adam_fit(coarse, u0.reshape(b * starts, NUM_PARAMS), steps[0], lr)
        with torch.no_grad():
            best = _per_image_mse(coarse, denormalise(u), starts).view(b, starts).argmin(1)
        u = _adam_fit(x, u.view(b, starts, NUM_PARAMS)[torch.arange(b), best], steps[1], lr * 0.3)
    with torch.no_grad():
        params = project(denormalise(u))
        rendered = render(params, x.shape[-1])
        rms = (rendered - x).pow(2).mean((1, 2, 3)).sqrt()
    return params, rms, rendered


# ---------------------------------------------------------------- distribution metrics
def param_fd(fitted: torch.Tensor, reference: torch.Tensor) -> float:
    """Frechet distance between Gaussians of normalised parameters `[N, P]` and `[M, P]`."""
    a, r = normalise(fitted).double(), normalise(reference).double()
    return frechet_distance(a.mean(0), torch.cov(a.T), r.mean(0), torch.cov(r.T))


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 distance between point sets `[N, P]` and `[M, P]`.

    `sqrt(mean_theta W_2^2)` over `directions` random unit vectors; each 1-d W_2 compares the
    quantile functions of both projections at `max(N, M)` common levels (linear interpolation),
    so the sets may differ in size.
    """
    theta = torch.randn(a.shape[1], directions, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, pb = a.double().cpu() @ theta, b.double().cpu() @ theta  # [N, L], [M, L]
    levels = (torch.arange(max(len(a), len(b)), dtype=torch.float64) + 0.5) / max(len(a), len(b))
    qa, qb = torch.quantile(pa, levels, dim=0), torch.quantile(pb, levels, dim=0)
    return float((qa - qb).pow(2).mean().sqrt())


def coverage(reference: torch.Tensor, fake: torch.Tensor, k: int = 5) -> float:
    """Naeem et al. (2020) coverage of `reference` `[M, P]` by `fake` `[N, P]` (any units).

    `mean_j 1[min_i |fake_i - reference_j| < NND_k(reference_j)]`, with `NND_k` the distance to
    the k-th nearest other reference point.
    """
    check(1 <= k < len(reference), f"coverage: k={k} needs more than k reference points, got {len(reference)}")
    r, f = reference.double().cpu(), fake.double().cpu()
    radius = torch.cdist(r, r).kthvalue(k + 1, dim=1).values  # k + 1: the point itself is at 0
    nearest = torch.cdist(r, f).min(dim=1).values
    return float((nearest < radius).double().mean())


def manifold_metrics(images: torch.Tensor, reference_params: torch.Tensor, *, k: int = 5,
                     coverage_points: int | None = None, fit: FitResult | None = None,
                     generator: torch.Generator | None = None, **fit_options) -> dict[str, float]:
    """The shapes metrics of images `[B, 3, H, W]` against reference parameters `[N, P]`.

    Returns `manifold_rms`, `param_fd`, `param_swd` (lower is better) and `coverage` (higher is
    better; reference subset of `coverage_points` rows, default `B`, drawn with `generator`).
    `fit`: a precomputed `fit_shapes(images)`; otherwise it is computed with `fit_options`.
    """
    if fit is None:
        fit = fit_shapes(images, generator=generator, **fit_options)
    check(len(fit.params) >= 2, "manifold metrics need at least 2 images; evaluate more samples")
    reference = reference_params.detach().cpu().float()
    fitted = fit.params.detach().cpu().float()
    count = min(coverage_points or len(fitted), len(reference))
    subset = reference[torch.randperm(len(reference), generator=generator)[:count]]
    return {
        "manifold_rms": float(fit.rms.mean()),
        "param_fd": param_fd(fitted, reference),
        "param_swd": sliced_wasserstein(normalise(fitted), normalise(reference), generator=generator),
        "coverage": coverage(normalise(subset), normalise(fitted), min(k, count - 1)),
    }


def reference_params(n: int, seed: int = 0) -> torch.Tensor:
    """`[n, P]` parameters from the shapes distribution itself (uniform on the box)."""
    return sample_params(n, torch.Generator().manual_seed(seed))
