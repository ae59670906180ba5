"""Procedural "shapes" dataset: one coloured ellipse on a fixed background, a known manifold.

method.md section 3 measures CM tangents against a synthetic dataset whose manifold is known.
Here the manifold is the image of the differentiable renderer `render(params)` over a box of
`P = 8` parameters, so its tangent space at an image is spanned by the columns of the
Jacobian `d render / d params` `[3*H*W, P]`.

Parameters (coordinates are normalised: the image spans [-1, 1] in both directions, `x`
grows to the right, `y` grows downwards as the row index does):

    x, y     centre of the ellipse
    size     geometric-mean radius sqrt(a * b) of the semi-axes a >= b
    aspect   a / b >= 1 (long over short semi-axis)
    angle    direction of the long axis, radians in [0, pi), clockwise on screen from +x
    red, green, blue  the shape's colour in [0, 1] (background: `BACKGROUND`, black)

With `aspect >= 1` and `angle in [0, pi)` an image determines its parameters uniquely (the
box keeps `aspect >= 1.2` so the angle stays well defined); `canonicalize` maps any parameter
vector that renders the same ellipse (aspect < 1, angle outside [0, pi), size < 0) back into
that form.
"""

from __future__ import annotations

import math

import torch

from ayt.data.base import ImageDataset, check_channels
from ayt.errors import check

PARAM_NAMES: tuple[str, ...] = ("x", "y", "size", "aspect", "angle", "red", "green", "blue")
NUM_PARAMS = len(PARAM_NAMES)
#: Box of the parameter distribution (float32, CPU); `sample_params` is uniform on it.
PARAM_LOW = torch.tensor([-0.35, -0.35, 0.25, 1.2, 0.0, 0.2, 0.2, 0.2])
PARAM_HIGH = torch.tensor([0.35, 0.35, 0.5, 2.0, math.pi, 1.0, 1.0, 1.0])
#: Background colour in [0, 1] RGB (rendered as -1 in the [-1, 1] images).
BACKGROUND = (0.0, 0.0, 0.0)
#: Edge softness: the sigmoid's temperature in pixels (10%-90% rise over ~1.3 pixels).
EDGE_TEMPERATURE_PX = 0.3
RESOLUTIONS = (8, 16, 32, 64)
_ASPECT, _ANGLE, _SIZE = 3, 4, 2


def sample_params(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw `n` parameter vectors, independent and uniform on the box `[PARAM_LOW, PARAM_HIGH)`.

    That is: x, y ~ U[-0.35, 0.35), size ~ U[0.25, 0.5), aspect ~ U[1.2, 2.0),
    angle ~ U[0, pi), each of red, green, blue ~ U[0.2, 1). Returns float32 `[n, P]` on CPU.
    """
    u = torch.rand(n, NUM_PARAMS, generator=generator)
    return PARAM_LOW + u * (PARAM_HIGH - PARAM_LOW)


def canonicalize(params: torch.Tensor) -> torch.Tensor:
    """Map `[B, P]` parameters to the unique form that renders the same image.

    Negative size -> |size|; aspect < 1 -> 1 / aspect with the angle turned by pi/2; angle
    wrapped into [0, pi). Differentiable (a piecewise-smooth map), returns a new tensor.
    """
    size = params[:, _SIZE].abs()
    aspect, angle = params[:, _ASPECT], params[:, _ANGLE]
    flip = aspect < 1
    aspect = torch.where(flip, 1 / aspect, aspect)
    angle = torch.remainder(torch.where(flip, angle + math.pi / 2, angle), math.pi)
    out = params.clone()
    out[:, _SIZE], out[:, _ASPECT], out[:, _ANGLE] = size, aspect, angle
    return out


def project(params: torch.Tensor) -> torch.Tensor:
    """`canonicalize`, then clamp every parameter into the box (for fitting). `[B, P]`."""
    low = PARAM_LOW.to(params.device, params.dtype)
    high = PARAM_HIGH.to(params.device, params.dtype)
    return torch.maximum(torch.minimum(canonicalize(params), high), low)


def render(params: torch.Tensor, resolution: int) -> torch.Tensor:
    """Render `[B, P]` parameters to images `[B, 3, H, W]` in [-1, 1], `H = W = resolution`.

    Coverage is `sigmoid(-d / tau)` with `d` a signed distance to the ellipse (negative
    inside) and `tau = EDGE_TEMPERATURE_PX` pixels, so edges are anti-aliased and the image is
    a smooth function of every parameter. Batched, differentiable, and computed on the device
    and in the dtype of `params`.
    """
    check(params.dim() == 2 and params.shape[1] == NUM_PARAMS,
          f"render: params must be [B, {NUM_PARAMS}], got {tuple(params.shape)}; "
          f"order them as {PARAM_NAMES}")
    alpha = _coverage(params, resolution)  # [B, H, W]
    background = torch.tensor(BACKGROUND, device=params.device, dtype=params.dtype)
    colour = params[:, 5:8, None, None]  # [B, 3, 1, 1]
    image = background[:, None, None] + alpha[:, None] * (colour - background[:, None, None])
    return image * 2 - 1


def _coverage(params: torch.Tensor, resolution: int) -> torch.Tensor:
    """Soft inside-indicator of each ellipse on the pixel-centre grid: `[B, H, W]` in (0, 1)."""
    x, y, size, aspect, angle = (params[:, i, None, None] for i in range(5))
    centres = (torch.arange(resolution, device=params.device, dtype=params.dtype) + 0.5)
    centres = centres * (2 / resolution) - 1  # pixel centres in (-1, 1)
    u = centres[None, None, :] - x  # [B, 1, W]
    v = centres[None, :, None] - y  # [B, H, 1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    p, q = cos * u + sin * v, cos * v - sin * u  # along / across the long axis, [B, H, W]
    a, b = size * aspect.sqrt(), size / aspect.sqrt()  # long / short semi-axes
    level = (p / a) ** 2 + (q / b) ** 2 - 1  # implicit function, zero on the boundary
    grad_norm = 2 * ((p / a**2) ** 2 + (q / b**2) ** 2 + 1e-8).sqrt()
    distance = level / grad_norm  # first-order signed distance, exact on the boundary
    tau = EDGE_TEMPERATURE_PX * 2 / resolution  # pixels -> normalised units
    return torch.sigmoid(-distance / tau)


class ShapesDataset(ImageDataset):
    """`num_samples` images of `render(sample_params(...))`, deterministic given `seed`.

    Attributes (besides `ImageDataset`'s): `params` float32 `[N, P]`, the ground truth
    parameters of each image. Unlabelled (labels are -1).
    """

    def __init__(self, num_samples: int = 10000, resolution: int = 32, seed: int = 0,
                 chunk: int = 1024) -> None:
        check(resolution in RESOLUTIONS,
              f"shapes: resolution {resolution} not supported; use one of {RESOLUTIONS}")
        check(num_samples > 0, f"shapes: num_samples must be positive, got {num_samples}")
        generator = torch.Generator().manual_seed(seed)
        self.params = sample_params(num_samples, generator)
        with torch.no_grad():
            images = torch.cat([render(p, resolution) for p in self.params.split(chunk)])
        super().__init__("shapes", images.clamp(-1, 1))


def build(resolution: int | None, num_samples: int | None, seed: int,
          channels: int | None) -> ShapesDataset:
    """Factory entry: defaults resolution 32 and 10,000 samples; `split` does not apply
    (a procedural dataset: use another `seed` for held-out images)."""
    check_channels(channels, 3, "shapes")
    return ShapesDataset(10000 if num_samples is None else num_samples,
                         32 if resolution is None else resolution, seed)
