"""Datasets: images as float32 `[C, H, W]` in [-1, 1] with int64 labels (-1 if unlabelled).

`build_dataset(name, ...)` is the one entry point; see each module for its dataset.
"""

from __future__ import annotations

from ayt.data import cifar10, digits, folder, npz, shapes
from ayt.data.base import ImageDataset
from ayt.config import DATASETS
from ayt.errors import AytError


__all__ = ["DATASETS", "ImageDataset", "build_dataset"]


def build_dataset(name: str, *, root: str | None = None, resolution: int | None = None,
                  num_samples: int | None = None, seed: int = 0, split: str = "train",
                  channels: int | None = None, download: bool = False,
                  class_folders: bool = False) -> ImageDataset:
    """Build a dataset by name; arguments a dataset does not use are ignored.

    Args:
        name: one of `DATASETS`.
        root: cifar10: folder holding `cifar-10-batches-py`; folder: the image folder;
            npz: the .npz file. Unused by shapes and digits.
        resolution: shapes: 8/16/32/64 (default 32); digits: a multiple of 8 (default 8,
            nearest upscaling); cifar10: 32; folder: required; npz: must match the file.
        num_samples: shapes: how many to render (default 10,000); others: a random subset
            (drawn with `seed`) of this size, default everything.
        seed: shapes: the sampling seed; others: only the `num_samples` subset.
        split: "train", "test" or "all" (digits, cifar10); ignored by shapes, folder, npz.
        channels: folder: 3 (RGB, default) or 1 (gray); others: must match the data if given.
        download: cifar10 only: fetch the files with torchvision first.
        class_folders: folder only: label each image by its top-level subfolder.
    """
    if name == "shapes":
        return shapes.build(resolution, num_samples, seed, channels)
    if name == "digits":
        return digits.build(resolution, num_samples, seed, split, channels)
    if name == "cifar10":
        return cifar10.build(root, resolution, num_samples, seed, split, channels, download)
    if name == "folder":
        return folder.build(root, resolution, num_samples, seed, channels, class_folders)
    if name == "npz":
        return npz.build(root, resolution, num_samples, seed, channels)
    raise AytError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
