"""The one preconditioning wrapper: `f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t))`.

method.md section 1. The same `Precond` is an EDM diffusion denoiser `D(x, t)` or a consistency
function `f(x, t)`; only the boundary mode differs:

- `boundary="edm"` (Karras et al. 2022; what the AYT/ECT reference code uses):
  `c_skip = sd^2 / (t^2 + sd^2)`, `c_out = t sd / sqrt(t^2 + sd^2)`, so `f(x, sigma_min) ~= x`.
- `boundary="exact"` (Song et al. 2023, consistency models):
  `c_skip = sd^2 / ((t - sigma_min)^2 + sd^2)`, `c_out = (t - sigma_min) sd / sqrt(t^2 + sd^2)`,
  so `f(x, sigma_min) = x` exactly.

Both use `c_in = 1 / sqrt(t^2 + sd^2)` and `c_noise = ln(t) / 4`; sd = sigma_data.
"""

from __future__ import annotations

import torch
from torch import nn

from ayt.errors import check

BOUNDARIES = ("edm", "exact")


class Precond(nn.Module):
    """Wrap a raw network `F` into `f(x [B, C, H, W], t [B], labels) -> [B, C, H, W]`.

    `F` is any module with attributes `img_resolution`, `in_channels`, `label_dim` and a forward
    `F(x_in [B, C, H, W], c_noise [B], labels) -> [B, C, H, W]` (`SongUNet`, `DhariwalUNet`).

    Scalings are computed in float32 (float64 for float64 inputs); the result is returned in `x`'s dtype.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, boundary: str = "edm") -> None:
        super().__init__()
        check(boundary in BOUNDARIES, f"unknown boundary {boundary!r}; use one of {list(BOUNDARIES)}")
        check(0 < sigma_min < sigma_max, f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}; "
              "the EDM defaults are 0.002 and 80")
        check(sigma_data > 0, f"sigma_data must be positive, got {sigma_data}; 0.5 suits data in [-1, 1]")
        self.net = net
        self.sigma_data, self.sigma_min = float(sigma_data), float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.boundary = boundary
        self.img_resolution, self.img_channels = net.img_resolution, net.in_channels
        self.label_dim = net.label_dim

    def scalings(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`t [B]` -> `(c_skip, c_out, c_in, c_noise)`, each `[B]` float32 or float64 (method.md section 1)."""
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        sd2 = self.sigma_data ** 2
        shift = self.sigma_min if self.boundary == "exact" else 0.0
        norm = (t ** 2 + sd2).sqrt()
        c_skip = sd2 / ((t - shift) ** 2 + sd2)
        c_out = (t - shift) * self.sigma_data / norm
        return c_skip, c_out, 1.0 / norm, t.log() / 4

    def forward(self, x: torch.Tensor, t: torch.Tensor | float,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """`f(x, t) = c_skip x + c_out F(c_in x, c_noise)`; `x [B, C, H, W]`, `t [B]` or scalar."""
        t = self._noise_levels(t, x)
        c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in self.scalings(t))
        f_x = self.net((c_in * x).to(x.dtype), c_noise.flatten(), labels)
        return (c_skip * x + c_out * f_x.to(c_out.dtype)).to(x.dtype)

    def _noise_levels(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """Noise levels `[B]` on `x`'s device (float32, or float64 for float64 `x`); scalars are broadcast; all must be > 0."""
        b = x.shape[0]
        dtype = torch.promote_types(x.dtype, torch.float32)  # as `scalings`: never below float32
        t = t.to(device=x.device, dtype=dtype) if torch.is_tensor(t) else \
            torch.tensor(float(t), device=x.device, dtype=dtype)
        check(t.dim() == 0 or tuple(t.shape) == (b,),
              f"t has shape {tuple(t.shape)}; expected ({b},) or a scalar")
        # Checked on CPU only: on an accelerator the check would wait for the device on every
        # forward, and under torch.compile it would split the graph. The objectives and samplers
        # never pass t <= 0 (they validate their schedules); a bad t elsewhere gives NaN there.
        if t.device.type == "cpu" and not torch.compiler.is_compiling():
            check(bool((t > 0).all()), "noise level t must be > 0; the r = 0 target is x_0 itself, not f(x, 0)")
        return t.expand(b)
