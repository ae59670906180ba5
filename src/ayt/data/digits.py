"""scikit-learn's handwritten digits: 1,797 gray 8x8 images (values 0..16), labels 0..9.

Splits are fixed, independent of `seed`: a permutation of the 1,797 indices drawn with
`torch.Generator().manual_seed(0)`; its first 1,500 entries (sorted) are "train", the other
297 are "test"; "all" keeps every image. Pixels map to [-1, 1] as `x / 16 * 2 - 1`.
"""

from __future__ import annotations

import torch

from ayt.data.base import ImageDataset, check_channels, check_split, subset_indices
from ayt.errors import check

NUM_TRAIN = 1500


def split_indices(split: str, total: int = 1797) -> torch.Tensor:
    """Indices (increasing) of `split` in the 1,797 digits; the permutation seed is always 0."""
    check_split(split, "digits")
    if split == "all":
        return torch.arange(total)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(0))
    chosen = perm[:NUM_TRAIN] if split == "train" else perm[NUM_TRAIN:]
    return chosen.sort().values


def upscale_nearest(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Nearest-neighbour upscaling `[N, C, 8, 8] -> [N, C, R, R]`: each pixel becomes an
    `R/8 x R/8` block, so pixel values stay exactly those of the original digits."""
    check(resolution > 0 and resolution % 8 == 0,
          f"digits: resolution {resolution} is not a multiple of 8; use 8, 16, 32 or 64")
    factor = resolution // 8
    return images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


class DigitsDataset(ImageDataset):
    """Digits as float32 `[N, 1, R, R]` in [-1, 1] (`R = resolution`, default 8), labels 0..9."""

    def __init__(self, split: str = "train", resolution: int = 8,
                 num_samples: int | None = None, seed: int = 0) -> None:
        from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

        index = split_indices(split)
        bunch = load_digits()
        images = torch.as_tensor(bunch.images, dtype=torch.float32)[index, None] / 8.0 - 1.0
        labels = torch.as_tensor(bunch.target, dtype=torch.int64)[index]
        keep = subset_indices(len(index), num_samples, seed, "digits")
        super().__init__("digits", upscale_nearest(images[keep], resolution), labels[keep], 10)


def build(resolution: int | None, num_samples: int | None, seed: int, split: str,
          channels: int | None) -> DigitsDataset:
    """Factory entry; `num_samples` keeps a `seed`-dependent random subset of the split."""
    check_channels(channels, 1, "digits")
    return DigitsDataset(split, 8 if resolution is None else resolution, num_samples, seed)
