"""The paper-style tangent picture (method.md section 3), for any dataset.

For each of a few images, one block of rows: the noisy input `x_t`, the output `f(x_t, t)`, then
the tangent of each distance; columns run over the noise levels `t`. A tangent is shown as a
signed map scaled by its own largest absolute value: `0.5 + 0.5 g / max|g|` as an image (grey is
zero; for RGB the colour shows the sign per channel), with a diverging colour map for
single-channel data. Only directions are comparable between tiles, not sizes.

Also the report plots of `ayt tangents`: `plot_vs_t` (parallel fraction and cosine versus the
noise level) and `plot_vs_step` (parallel fraction across checkpoints of one run).
"""

from __future__ import annotations

import math
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


def plot_vs_t(report: dict, path: Path) -> Path:
    """Parallel fraction and cosine to the manifold versus t (last checkpoint), one curve per tangent."""
    last = report["checkpoints"][-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("parallel_fraction", "cosine_to_manifold")):
        for name, values in last["tangents"].items():
            ax.plot(report["levels"], [math.nan if v is None else v for v in values[key]], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("noise level t")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"step {last['step']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_vs_step(report: dict, path: Path) -> Path:
    """Parallel fraction versus training step, one panel per noise level, one curve per tangent."""
    levels, cks = report["levels"], report["checkpoints"]
    fig, axes = plt.subplots(1, len(levels), figsize=(2.6 * len(levels) + 1, 3.2), squeeze=False)
    for b, ax in enumerate(axes[0]):
        for name in cks[0]["tangents"]:
            ys = [ck["tangents"][name]["parallel_fraction"][b] for ck in cks]
            ax.plot([ck["step"] for ck in cks], [math.nan if y is None else y for y in ys], marker="o", label=name)
        ax.set_title(f"t = {levels[b]:.3g}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("parallel fraction")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
