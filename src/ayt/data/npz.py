"""Images from a `.npz` file (`root` is the file's path).

The images are the array under key "images", or the file's only array. Two layouts are
accepted, told apart by dtype:
  - uint8 NHWC `[N, H, W, C]`, values 0..255 (mapped as `x / 255 * 2 - 1`);
  - floating NCHW `[N, C, H, W]`, values already in [-1, 1].
`C` is 1 or 3 and `H == W`. An optional integer array "labels" `[N]` (values >= 0) gives
labels; without it labels are -1. A `resolution` given by the caller must equal `H`: the file
is used as is, never resized.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ayt.data.base import ImageDataset, check_channels, subset_indices, uint8_to_unit
from ayt.errors import AytError, check


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # the first bytes of a zip archive, which numpy.savez writes


def read_npz(path: Path, fix: str) -> dict[str, np.ndarray]:
    """Every array of the .npz archive at `path`, never unpickling anything (object arrays are
    refused); AytError naming the problem and `fix` for anything else."""
    with open(path, "rb") as f:
        head = f.read(4)
    check(head in ZIP_MAGIC, f"{path} is not an .npz archive (numpy.savez writes one; this file starts with {head!r}); {fix}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as e:
        if "pickle" in str(e) or "Object arrays" in str(e):
            raise AytError(f"untrusted or corrupted file: {path} holds pickled object arrays, which ayt never loads; {fix}") from None
        raise AytError(f"cannot read {path} ({e}); {fix}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise AytError(f"cannot read {path} ({e}); {fix}") from None


def read_arrays(root: str | None) -> tuple[np.ndarray, np.ndarray | None, Path]:
    """Load (images, labels or None, path) from the .npz at `root`; no pickles allowed."""
    check(root is not None, "npz: no file given; set data.root to the path of a .npz file")
    path = Path(root).expanduser()
    check(path.is_file(), f"npz: {path} does not exist; set data.root to the path of a .npz file")
    arrays = read_npz(path, "save the images with numpy.savez")
    if "images" in arrays:
        key = "images"
    else:
        check(len(arrays) == 1, f"npz: {path} has arrays {sorted(arrays)} but none named "
              "'images'; save the images under the key 'images'")
        key = next(iter(arrays))
    return arrays[key], arrays.get("labels") if key != "labels" else None, path


def to_unit_nchw(array: np.ndarray, path: Path) -> torch.Tensor:
    """uint8 NHWC or float NCHW array -> float32 `[N, C, H, W]` in [-1, 1] (checked)."""
    check(array.ndim == 4, f"npz: images in {path} have rank {array.ndim} (shape {array.shape}) "
          "but must be rank 4; save uint8 [N, H, W, C] or float [N, C, H, W] (add a channel "
          "axis for gray images)")
    if array.dtype == np.uint8:
        _check_layout(array.shape[3], array.shape[1], array.shape, path, "uint8", "NHWC",
                      "(0, 2, 3, 1)")
        return uint8_to_unit(torch.from_numpy(array).permute(0, 3, 1, 2).contiguous())
    check(np.issubdtype(array.dtype, np.floating), f"npz: images in {path} have dtype "
          f"{array.dtype}; save uint8 values 0..255 (NHWC) or floats in [-1, 1] (NCHW)")
    _check_layout(array.shape[1], array.shape[3], array.shape, path, "float", "NCHW",
                  "(0, 3, 1, 2)")
    check(bool(np.isfinite(array).all()), f"npz: images in {path} contain NaN or inf; "
          "remove or fix those images")
    low, high = float(array.min()), float(array.max())
    check(low >= -1.0 and high <= 1.0, f"npz: float images in {path} span [{low:g}, {high:g}] "
          "but must lie in [-1, 1]; rescale them (e.g. x / 127.5 - 1 for 0..255 values)")
    return torch.from_numpy(array.astype(np.float32))


def _check_layout(channel_dim: int, other_dim: int, shape: tuple[int, ...], path: Path,
                  kind: str, layout: str, transpose: str) -> None:
    """Raise unless the channel axis of `layout` holds 1 or 3 and the images are square."""
    if channel_dim not in (1, 3):
        hint = (f"it looks transposed: use array.transpose{transpose}" if other_dim in (1, 3)
                else "give 1 or 3 channels")
        raise AytError(f"npz: {kind} images in {path} must be {layout}, got shape {shape}; "
                       f"{hint}")
    height, width = (shape[1], shape[2]) if layout == "NHWC" else (shape[2], shape[3])
    check(height == width, f"npz: images in {path} are {height}x{width} ({layout} shape "
          f"{shape}); make them square, e.g. centre-crop")


def to_labels(labels: np.ndarray | None, count: int, path: Path) -> tuple[torch.Tensor | None, int]:
    """Check optional labels -> (int64 `[N]` or None, num_classes)."""
    if labels is None:
        return None, 0
    check(labels.shape == (count,) and np.issubdtype(labels.dtype, np.integer),
          f"npz: 'labels' in {path} must be {count} integers, got {labels.dtype} "
          f"{labels.shape}; save one integer label per image")
    check(count == 0 or labels.min() >= 0, f"npz: 'labels' in {path} has negative values; "
          "use class indices 0..K-1 (or drop 'labels' for an unlabelled set)")
    return torch.from_numpy(labels.astype(np.int64)), int(labels.max()) + 1 if count else 0


class NpzDataset(ImageDataset):
    """The images of a .npz file as float32 `[N, C, H, H]` in [-1, 1]."""

    def __init__(self, root: str | None, num_samples: int | None = None, seed: int = 0) -> None:
        array, raw_labels, path = read_arrays(root)
        images = to_unit_nchw(array, path)
        labels, num_classes = to_labels(raw_labels, images.shape[0], path)
        check(images.shape[0] > 0, f"npz: {path} holds no images; save at least one")
        keep = subset_indices(images.shape[0], num_samples, seed, "npz")
        super().__init__("npz", images[keep], None if labels is None else labels[keep],
                         num_classes)


def build(root: str | None, resolution: int | None, num_samples: int | None, seed: int,
          channels: int | None) -> NpzDataset:
    """Factory entry; `resolution` and `channels`, if given, must match the file."""
    dataset = NpzDataset(root, num_samples, seed)
    check(resolution is None or resolution == dataset.resolution,
          f"npz: resolution={resolution} but {root} holds {dataset.resolution}x"
          f"{dataset.resolution} images (npz files are not resized); set resolution="
          f"{dataset.resolution} or leave it unset")
    check_channels(channels, dataset.channels, "npz")
    return dataset
