"""The MeanFlow network: the average velocity `u(z, r, t)` (method.md section 8).

MeanFlow (Geng et al. 2025) uses no EDM preconditioning (no c_skip, c_out, c_in): the raw
U-Net sees the point `z_t = (1 - t) x + t eps` of the linear path as it is (its scale stays
between the data's and 1, so no input scaling is needed) and predicts the velocity directly,

    u(z, r, t) = F(z, c_noise = t, c_noise2 = t - r),

with both times fed to the positional embedding unscaled (`t` in [0, 1], as the authors'
CIFAR-10 U-Net does) and the second time entering through `SongUNet(second_time=True)`.
`second="r"` feeds `r` instead of `t - r` (the paper's ablation; `t - r` is its default).
"""

from __future__ import annotations

import torch
from torch import nn

from ayt.errors import check

SECOND_TIMES = ("t-r", "r")


class MeanFlowNet(nn.Module):
    """`u(z [B, C, H, W], r [B], t [B], labels) -> [B, C, H, W]`, the average velocity over [r, t].

    `net` is a `SongUNet` built with `second_time=True`. `r` and `t` may be scalars (broadcast)
    and must satisfy `0 <= r <= t <= 1` (checked on the CPU, as `Precond` checks `t > 0`).
    Times are used in float32 (float64 for float64 `z`); the result has `z`'s dtype.
    """

    def __init__(self, net: nn.Module, second: str = "t-r") -> None:
        super().__init__()
        check(second in SECOND_TIMES, f"unknown second time input {second!r}; use one of {list(SECOND_TIMES)}")
        check(getattr(net, "map_time2", None) is not None,
              "MeanFlow needs a U-Net with a second time input: SongUNet(second_time=True)")
        self.net, self.second = net, second
        self.img_resolution, self.img_channels = net.img_resolution, net.in_channels
        self.label_dim = net.label_dim

    def times(self, r: torch.Tensor | float, t: torch.Tensor | float, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(r, t)` as `[B]` tensors on `z`'s device, float32 or float64."""
        dtype = torch.promote_types(z.dtype, torch.float32)
        r, t = (torch.as_tensor(v, device=z.device).to(dtype).expand(z.shape[0]) for v in (r, t))
        if t.device.type == "cpu" and not torch.compiler.is_compiling():
            check(bool(((0 <= r) & (r <= t) & (t <= 1)).all()), "MeanFlow times must satisfy 0 <= r <= t <= 1")
        return r, t

    def forward(self, z: torch.Tensor, r: torch.Tensor | float, t: torch.Tensor | float,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        r, t = self.times(r, t, z)
        second = t - r if self.second == "t-r" else r
        return self.net(z, t, labels, second).to(z.dtype)
