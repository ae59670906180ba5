"""In-memory image dataset base class and the small checks every dataset shares.

Every dataset yields `(image, label)`: `image` float32 `[C, H, W]` in `[-1, 1]` (method.md
section 1: "data scaled to [-1, 1]") and `label` an int64 scalar tensor, `-1` when unlabelled.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ayt.errors import AytError, check

SPLITS = ("train", "test", "all")


class ImageDataset(Dataset):
    """Images held in memory as one tensor.

    Attributes:
        name: the factory name of the dataset ("shapes", "digits", ...).
        images: float32 `[N, C, H, W]` in `[-1, 1]`, square (`H == W`).
        labels: int64 `[N]`; `-1` everywhere when the dataset is unlabelled.
        resolution: `H` (= `W`).
        channels: `C` (1 or 3).
        num_classes: number of classes; 0 when unlabelled.
    """

    def __init__(
        self,
        name: str,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_classes: int = 0,
    ) -> None:
        _check_images(images, name)
        if labels is None:
            labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
        check(labels.shape == (images.shape[0],), f"{name}: labels shape {tuple(labels.shape)} "
              f"does not match {images.shape[0]} images; give one label per image")
        self.name = name
        self.images = images
        self.labels = labels.to(torch.int64)
        self.resolution = int(images.shape[-1])
        self.channels = int(images.shape[1])
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(image [C, H, W] float32 in [-1, 1], label int64 scalar)`."""
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, "
                f"channels={self.channels}, resolution={self.resolution}, "
                f"num_classes={self.num_classes})")


def _check_images(images: torch.Tensor, name: str) -> None:
    """Internal consistency check: float32 `[N, C, H, H]`, C in {1, 3}, values in [-1, 1]."""
    check(images.dim() == 4 and images.shape[1] in (1, 3) and images.shape[2] == images.shape[3],
          f"{name}: images must be [N, C, H, H] with C in (1, 3), got {tuple(images.shape)}; "
          "give square images with 1 or 3 channels")
    check(images.shape[0] > 0, f"{name}: no images; give at least one image")
    check(images.dtype == torch.float32, f"{name}: images must be float32, got {images.dtype}")
    low, high = torch.aminmax(images)  # NaN propagates into both and fails the check
    check(bool(low >= -1.0) and bool(high <= 1.0),
          f"{name}: image values must be finite and in [-1, 1]; rescale the data")


def uint8_to_unit(array: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixel values 0..255 to float32 in [-1, 1] (`x / 255 * 2 - 1`)."""
    return array.to(torch.float32) / 127.5 - 1.0


def check_split(split: str, name: str) -> None:
    """Raise unless `split` is one of `SPLITS`."""
    check(split in SPLITS, f"{name}: unknown split {split!r}; use one of {', '.join(SPLITS)}")


def check_channels(channels: int | None, native: int, name: str) -> None:
    """Raise if the caller asked for a channel count the dataset does not have."""
    check(channels is None or channels == native,
          f"{name}: has {native} channel(s), got channels={channels}; "
          f"set channels={native} or leave it unset")


def subset_indices(total: int, num_samples: int | None, seed: int, name: str) -> torch.Tensor:
    """Indices of a seeded random subset of `num_samples` out of `total`, in increasing order.

    `num_samples=None` or `== total` keeps everything (returns `arange(total)`).
    """
    if num_samples is None or num_samples == total:
        return torch.arange(total)
    if num_samples <= 0 or num_samples > total:
        raise AytError(f"{name}: num_samples={num_samples} but only {total} images are "
                       f"available; use 1..{total} or leave num_samples unset")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:num_samples].sort().values
