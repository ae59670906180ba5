"""CIFAR-10 from the standard python-format batches (`cifar-10-batches-py/`).

Each batch file is a pickled dict with `b"data"` uint8 `[N, 3072]` (per image: the 1024 red,
then green, then blue values of a 32x32 image, rows top to bottom) and `b"labels"` (N ints
0..9). "train" reads `data_batch_1..5` (50,000 images), "test" reads `test_batch` (10,000),
"all" both. Pixels map to [-1, 1] as `x / 255 * 2 - 1`.

The files are read here, not through torchvision, so that any copy in this format loads (no
md5 check); pickles are read by `_BatchUnpickler`, which only builds dicts, lists, bytes,
strings, numbers and numpy arrays, never arbitrary objects. `download=True` fetches the files
with torchvision's `CIFAR10(root, download=True)` first.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ayt.data.base import (ImageDataset, check_channels, check_split, subset_indices,
                           uint8_to_unit)
from ayt.errors import AytError, check

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
# The only globals a CIFAR-10 batch pickle (numpy array inside a dict) needs.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except those that rebuild a numpy array."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file -> (uint8 `[N, 3, 32, 32]`, int64 `[N]`); AytError if malformed."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        data, labels = batch[b"data"], np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        reason = " ".join(str(e).split())  # one line
        raise AytError(f"cifar10: cannot read {path} ({reason}); re-download it with "
                       "download=True or replace the file") from e
    check(isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
          and data.shape[1] == 3072 and labels.shape == (data.shape[0],),
          f"cifar10: {path} is not a CIFAR-10 batch (want uint8 data [N, 3072] and N labels); "
          "re-download it with download=True")
    check(labels.size == 0 or (labels.min() >= 0 and labels.max() <= 9),
          f"cifar10: {path} has labels outside 0..9; re-download it with download=True")
    return data.reshape(-1, 3, 32, 32), labels


def find_folder(root: str | None, split: str, download: bool) -> Path:
    """The folder holding the batch files: `root/cifar-10-batches-py` or `root` itself."""
    check(root is not None, "cifar10: no root folder given; set data.root to the folder "
          "holding cifar-10-batches-py (add download=True to fetch it)")
    if download:
        _download(root, split)
    base = Path(root).expanduser()
    folder = base / FOLDER if (base / FOLDER).is_dir() else base
    for name in _files(split):
        check((folder / name).is_file(), f"cifar10: missing {folder / name}; pass "
              f"download=True or set data.root to the folder holding {FOLDER}")
    return folder


def _files(split: str) -> tuple[str, ...]:
    return {"train": TRAIN_FILES, "test": TEST_FILES, "all": TRAIN_FILES + TEST_FILES}[split]


def _download(root: str, split: str) -> None:
    """Fetch the batches with torchvision (needs internet; md5-checked by torchvision)."""
    from torchvision.datasets import CIFAR10

    for train in {"train": (True,), "test": (False,), "all": (True, False)}[split]:
        try:
            CIFAR10(root, train=train, download=True)
        except Exception as e:  # network and checksum failures come in many types
            raise AytError(f"cifar10: download to {root} failed ({e}); check the internet "
                           f"connection or copy {FOLDER} into {root}") from e


class Cifar10Dataset(ImageDataset):
    """CIFAR-10 as float32 `[N, 3, 32, 32]` in [-1, 1], labels 0..9."""

    def __init__(self, root: str | None, split: str = "train", download: bool = False,
                 num_samples: int | None = None, seed: int = 0) -> None:
        check_split(split, "cifar10")
        folder = find_folder(root, split, download)
        batches = [read_batch(folder / name) for name in _files(split)]
        data = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        keep = subset_indices(len(data), num_samples, seed, "cifar10").numpy()
        super().__init__("cifar10", uint8_to_unit(torch.from_numpy(data[keep])),
                         torch.from_numpy(labels[keep]), 10)


def build(root: str | None, resolution: int | None, num_samples: int | None, seed: int,
          split: str, channels: int | None, download: bool) -> Cifar10Dataset:
    """Factory entry; resolution must be 32 (or unset), channels 3 (or unset)."""
    check(resolution in (None, 32), f"cifar10: resolution {resolution} not supported; "
          "CIFAR-10 is 32x32, set resolution=32 or leave it unset")
    check_channels(channels, 3, "cifar10")
    return Cifar10Dataset(root, split, download, num_samples, seed)
