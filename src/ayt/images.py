"""Writing images: sample grids as PNG, batches as npz."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ayt.errors import check


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """`[B, C, H, W]` in [-1, 1] -> uint8 `[B, H, W, C]` (values clamped)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile `[B, C, H, W]` images in [-1, 1] into one uint8 `[rows*H', cols*W', C]` array."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    cols = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(b):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = arr[i]
    return grid


def check_output_path(path: str | Path, flag: str, suffixes: tuple[str, ...]) -> Path:
    """Raise AytError unless `path` can be written: its folder exists and it ends in one of `suffixes`."""
    path = Path(path)
    check(path.suffix.lower() in suffixes, f"{flag} {path}: unknown file type '{path.suffix}'; use a name ending in "
          f"{' or '.join(suffixes)}")
    folder = path.parent
    check(folder.is_dir(), f"{flag} {path}: the folder {folder} does not exist; create it first (mkdir -p {folder})")
    check(not path.is_dir(), f"{flag} {path} is a folder; give a file name")
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Save a PNG grid; small images are upscaled (nearest) so a grid is at least ~384 px wide."""
    grid = make_grid(images, nrow)
    scale = scale or max(1, 384 // grid.shape[1])
    mode = "L" if grid.shape[2] == 1 else "RGB"
    img = Image.fromarray(grid[..., 0] if mode == "L" else grid, mode)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    img.save(path)
    return path


def save_npz(images: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None) -> Path:
    """Save images as uint8 NHWC under key `images` (the format `ayt.data` reads back)."""
    arrays = {"images": to_uint8(images)}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    np.savez_compressed(path, **arrays)
    return Path(path)
