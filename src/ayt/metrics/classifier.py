"""FD-digits: Frechet distance on the features of a small digits classifier (method.md section 6).

Inception features mean little on 8x8 gray digits, so digits runs are scored like FID but in
the penultimate layer (64-d) of a small CNN trained once, deterministically, on the digits
train split (1,500 images) at the evaluated resolution. Its accuracy on the 297-image test
split is stored with the weights. The scores are called `fd_digits` and `kid_digits`, never
FID: the numbers are not comparable with Inception FIDs.

The trained network is cached as `<cache>/digits-classifier-<resolution>.safetensors`
(`<cache>`: the `cache_dir` argument, else `$AYT_CACHE`, else `~/.cache/ayt`), written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ayt.data import build_dataset
from ayt.files import atomic_file
from ayt.errors import AytError, check
from ayt.metrics.frechet import FeatureStats, feature_stats, frechet_distance, kid

FEATURE_DIM = 64
#: Training recipe; changing any of it changes `FORMAT` so stale caches are retrained.
SEED, EPOCHS, BATCH, LR = 0, 10, 100, 3e-3
FORMAT = "1"


def cache_dir(path: str | Path | None = None) -> Path:
    """The cache folder: `path`, else `$AYT_CACHE`, else `~/.cache/ayt`."""
    if path is not None:
        return Path(path).expanduser()
    return Path(os.environ.get("AYT_CACHE") or Path.home() / ".cache" / "ayt").expanduser()


class DigitsCNN(nn.Module):
    """Conv(32) at full resolution, area-pool to 8x8, Conv(64), max-pool to 4x4, Conv(64),
    Linear(1024 -> 64) (the features, standardised), ReLU, Linear(64 -> 10) (the logits)."""

    def __init__(self, resolution: int) -> None:
        super().__init__()
        check(resolution >= 8 and resolution % 8 == 0, f"digits classifier: resolution {resolution} "
              "must be a multiple of 8; use 8, 16, 32 or 64")
        self.resolution = resolution
        self.stem = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)
        # Fixed standardisation of the features (train-split mean / std, set after training).
        self.register_buffer("feature_mean", torch.zeros(FEATURE_DIM))
        self.register_buffer("feature_std", torch.ones(FEATURE_DIM))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features `[B, 64]` of images `[B, 1, R, R]` in [-1, 1]: the hidden layer
        before its ReLU (no unit is constant, so the covariance has full rank), standardised
        with the train split's per-unit mean and std."""
        return (self._hidden(x) - self.feature_mean) / self.feature_std

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(F.relu(self.stem(x)), 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.hidden(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `[B, 10]`."""
        return self.head(F.relu(self._hidden(x)))


def _split(split: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = build_dataset("digits", resolution=resolution, split=split)
    return data.images, data.labels


@torch.no_grad()
def accuracy(net: DigitsCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images` `[N, 1, R, R]` classified as `labels` `[N]`."""
    return float((net(images).argmax(1) == labels).float().mean())


def train_classifier(resolution: int) -> tuple[DigitsCNN, float]:
    """Train the classifier on the digits train split (Adam, `EPOCHS` epochs, CPU, seeded);
    return it (eval mode) with its accuracy on the test split."""
    images, labels = _split("train", resolution)
    generator = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(SEED)
        net = DigitsCNN(resolution)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    steps = EPOCHS * -(-len(images) // BATCH)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    with torch.enable_grad():
        for _ in range(EPOCHS):
            for index in torch.randperm(len(images), generator=generator).split(BATCH):
                loss = F.cross_entropy(net(images[index]), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    net.eval().requires_grad_(False)
    with torch.no_grad():
        hidden = net._hidden(images)
        net.feature_mean.copy_(hidden.mean(0))
        net.feature_std.copy_(hidden.std(0).clamp(min=1e-6))
    return net, accuracy(net, *_split("test", resolution))


def _save(net: DigitsCNN, test_accuracy: float, path: Path) -> None:
    """Atomic safetensors write (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "resolution": str(net.resolution), "test_accuracy": repr(test_accuracy)}
    with atomic_file(path, ".safetensors") as tmp:
        os.chmod(tmp, 0o644)  # a shared cache: readable like any other file
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)


def _load(path: Path, resolution: int) -> tuple[DigitsCNN, float] | None:
    """The cached classifier, or None when the file is missing, unreadable or from another recipe."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (OSError, SafetensorError):
        return None
    if meta.get("format") != FORMAT or meta.get("resolution") != str(resolution):
        return None
    net = DigitsCNN(resolution)
    try:
        net.load_state_dict(state)
    except RuntimeError:
        return None
    return net.eval().requires_grad_(False), float(meta["test_accuracy"])


def load_classifier(resolution: int, cache: str | Path | None = None) -> tuple[DigitsCNN, float]:
    """The digits classifier for `resolution` and its test accuracy: from the cache, else
    trained now (a few seconds to half a minute on a CPU) and cached."""
    path = cache_dir(cache) / f"digits-classifier-{resolution}.safetensors"
    loaded = _load(path, resolution)
    if loaded is not None:
        return loaded
    net, test_accuracy = train_classifier(resolution)
    try:
        _save(net, test_accuracy, path)
    except OSError as err:
        raise AytError(f"cannot write the digits classifier to {path} ({err.strerror or err}); "
                       "set AYT_CACHE to a writable folder") from None
    return net, test_accuracy


class DigitsFeatures:
    """Callable: digits images `[B, 1, R, R]` in [-1, 1] -> classifier features float32 `[B, 64]` (CPU).

    Attributes: `test_accuracy` (on the 297 test digits), `kind` ("digits-R/64"), `dim` (64).
    """

    dim = FEATURE_DIM

    def __init__(self, resolution: int, cache_dir: str | Path | None = None,
                 device: str | torch.device = "cpu", batch: int = 512) -> None:
        net, self.test_accuracy = load_classifier(resolution, cache_dir)
        self.net, self.device, self.batch = net.to(device), torch.device(device), batch
        self.resolution = resolution
        self.kind = f"digits-{resolution}/{FEATURE_DIM}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check(images.dim() == 4 and tuple(images.shape[1:]) == (1, self.resolution, self.resolution),
              f"digits features need images [B, 1, {self.resolution}, {self.resolution}], got "
              f"{tuple(images.shape)}; evaluate a digits model at its training resolution")
        return torch.cat([self.net.features(x.to(self.device).float()).cpu() for x in images.split(self.batch)])

    def reference(self, split: str = "train") -> torch.Tensor:
        """Features `[N, 64]` of the digits `split` ("train": 1,500, "test": 297, "all")."""
        return self(_split(split, self.resolution)[0])


def digits_metrics(images: torch.Tensor, reference: str = "train", features: DigitsFeatures | None = None,
                   cache_dir: str | Path | None = None, seed: int = 0) -> dict[str, float]:
    """`fd_digits` and `kid_digits` of images `[B, 1, R, R]` against a digits split."""
    features = features or DigitsFeatures(images.shape[-1], cache_dir)
    ref = features.reference(reference)
    fake = features(images)
    return {"fd_digits": stats_distance(feature_stats(fake), feature_stats(ref)),
            "kid_digits": kid(fake, ref, seed=seed)[0]}


def fd_digits(images: torch.Tensor, reference: str = "train", features: DigitsFeatures | None = None,
              cache_dir: str | Path | None = None) -> float:
    """Frechet distance between classifier features of `images` `[B, 1, R, R]` and a digits split."""
    features = features or DigitsFeatures(images.shape[-1], cache_dir)
    return stats_distance(feature_stats(features(images)), feature_stats(features.reference(reference)))


def stats_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between two `FeatureStats`."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
