"""A folder of PNG/JPEG images (searched recursively), unlabelled or labelled by subfolder.

Each image is centre-cropped to a square (side = its shorter side), resized to
`resolution x resolution` with PIL's bicubic filter (antialiased when shrinking), converted to
RGB (`channels=3`) or gray "L" (`channels=1`), and mapped to [-1, 1] as `x / 255 * 2 - 1`.
Files are read in sorted path order. With `class_folders=True` each image's label is the index
of its top-level subfolder among the sorted subfolder names (the ImageNet train layout
`root/n01440764/*.JPEG`, as torchvision's `ImageFolder`); images directly under `root` raise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ayt.data.base import ImageDataset, subset_indices, uint8_to_unit
from ayt.errors import AytError, check

EXTENSIONS = (".png", ".jpg", ".jpeg")


def list_images(root: str | None) -> list[Path]:
    """All PNG/JPEG files under `root` (recursive, case-insensitive extensions), sorted."""
    check(root is not None, "folder: no root given; set data.root to a folder of PNG/JPEG files")
    base = Path(root).expanduser()
    check(base.is_dir(), f"folder: {base} is not a folder; set data.root to a folder of "
          "PNG/JPEG files")
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    check(len(files) > 0, f"folder: no .png/.jpg/.jpeg files under {base}; put images there "
          "or point data.root at another folder")
    return files


def class_labels(files: list[Path], root: str) -> tuple[torch.Tensor, int]:
    """Labels `[N]` (index of each file's top-level subfolder, sorted by name) and the class count."""
    parts = [f.relative_to(Path(root).expanduser()).parts for f in files]
    loose = [f for f, p in zip(files, parts) if len(p) < 2]
    check(not loose, f"folder: {loose[0] if loose else ''} is not inside a class subfolder; with "
          "data.class_folders=true put every image in root/CLASS/ (or set class_folders=false)")
    folders = [p[0] for p in parts]
    classes = {name: i for i, name in enumerate(sorted(set(folders)))}
    return torch.tensor([classes[d] for d in folders], dtype=torch.int64), len(classes)


def load_image(path: Path, resolution: int, channels: int) -> np.ndarray:
    """Read, centre-crop, resize one file -> uint8 `[C, R, R]`; AytError naming a bad file."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB" if channels == 3 else "L")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise AytError(f"folder: cannot read image {path} ({e}); remove or replace it") from e
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, channels)


class FolderDataset(ImageDataset):
    """Every image of a folder as float32 `[N, C, R, R]` in [-1, 1]; labels -1, or the class
    subfolder's index with `class_folders`."""

    def __init__(self, root: str | None, resolution: int, channels: int = 3,
                 num_samples: int | None = None, seed: int = 0, class_folders: bool = False) -> None:
        check(channels in (1, 3), f"folder: channels={channels} not supported; use 3 (RGB) "
              "or 1 (gray)")
        check(resolution > 0, f"folder: resolution must be positive, got {resolution}")
        files = list_images(root)
        labels, num_classes = class_labels(files, root) if class_folders else (None, 0)
        keep = subset_indices(len(files), num_samples, seed, "folder").tolist()
        arrays = np.stack([load_image(files[i], resolution, channels) for i in keep])
        images = uint8_to_unit(torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous())
        super().__init__("folder", images, None if labels is None else labels[keep], num_classes)


def build(root: str | None, resolution: int | None, num_samples: int | None, seed: int,
          channels: int | None, class_folders: bool = False) -> FolderDataset:
    """Factory entry; `resolution` is required, channels default to 3."""
    check(resolution is not None, "folder: resolution is required (images are resized to it); "
          "set data.resolution, e.g. 32")
    return FolderDataset(root, resolution, 3 if channels is None else channels, num_samples,
                         seed, class_folders)
