"""The paper-style tangent picture (method.md section 3), for any dataset.

For each of a few images, one block of rows: the noisy input `x_t`, the output `f(x_t, t)`, then
the tangent of each distance; columns run over the noise levels `t`. A tangent is shown as a
signed map scaled by its own largest absolute value: `0.5 + 0.5 g / max|g|` as an image (grey is
zero; for RGB the colour shows the sign per channel), with a diverging colour map for
single-channel data. Only directions are comparable between tiles, not sizes.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor

from ayt.errors import check


def signed_display(g: Tensor) -> Tensor:
    """`g / max|g|` per map, g [..., C, H, W] -> same shape in [-1, 1] (0 where g = 0)."""
    peak = g.abs().flatten(-3).amax(-1).clamp_min(1e-30)
    return g / peak[..., None, None, None]


def _to_hwc(x: Tensor) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> [H, W, C] (or [H, W] for gray) in [0, 1]."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[2] == 1 else arr


def _show(ax: plt.Axes, x: Tensor, signed: bool) -> None:
    gray = x.shape[0] == 1
    if signed and gray:
        ax.imshow(x[0].detach().float().cpu().numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    else:
        ax.imshow(_to_hwc(x), cmap="gray" if gray else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def tangent_picture(
    x_t: Tensor, output: Tensor, tangents: dict[str, Tensor], levels: Tensor, path: str | Path, title: str | None = None
) -> Path:
    """Save the picture as PNG.

    Args:
        x_t: [N, K, C, H, W] noisy inputs (N images, K noise levels); shown clamped to [-1, 1].
        output: [N, K, C, H, W] `f(x_t, t)`.
        tangents: name -> [N, K, C, H, W].
        levels: [K] the noise levels (column titles).
    """
    n, k = x_t.shape[:2]
    check(output.shape == x_t.shape and all(g.shape == x_t.shape for g in tangents.values()),
          "tangent_picture: x_t, output and every tangent must share the shape [N, K, C, H, W]")
    rows = [("x_t", x_t, False), ("f(x_t, t)", output, False)]
    rows += [(name, signed_display(g), True) for name, g in tangents.items()]
    height = 1.1 * n * len(rows) + 0.6
    fig, axes = plt.subplots(n * len(rows), k, figsize=(1.1 * k + 1.4, height), squeeze=False)
    for i in range(n):
        for j, (label, tensor, signed) in enumerate(rows):
            row = i * len(rows) + j
            for c in range(k):
                _show(axes[row, c], tensor[i, c], signed)
            axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    for c in range(k):
        axes[0, c].set_title(f"t = {float(levels[c]):.3g}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.05 / height, va="top")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))  # room for the title
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def picture_rows(batch_grid: Tensor, num: int) -> Tensor:
    """The first `num` images of a [N, K, ...] grid, as float32 on the CPU."""
    return batch_grid[:num].detach().float().cpu()

