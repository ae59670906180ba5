"""Inception-v3 pool features (2048-d) for FID / KID / precision-recall (method.md section 6).

The network is torch-fidelity's `FeatureExtractorInceptionV3` ("inception-v3-compat"): the
TensorFlow FID Inception graph ported to PyTorch, which takes uint8 RGB images of any size
and resizes them to 299 x 299 the way TensorFlow 1 did, so scores are comparable with
published FIDs (see README, "FID protocol"). Its weights file is read weights-only by `ayt.checkpoint.load_weights_file` here (a
pickle cannot run code) and handed to the library from memory.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ayt.checkpoint import load_weights_file
from ayt.errors import AytError, check

#: The weights file torch-fidelity downloads (sha256 starts with the hex in its name).
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"
FEATURE_DIM = 2048
FEATURE_KIND = "inception-v3-compat/2048"
#: The network, in words, for FID records.
NETWORK = "torch-fidelity inception-v3-compat: the TF FID Inception graph 2015-12-05, 2048-d pool features"
#: How images reach it (`to_uint8_rgb`, then torch-fidelity's TF1-compatible bilinear resize to 299).
PIPELINE = "uint8 round((clamp(x,-1,1)+1)*127.5) half-to-even; gray repeated; TF1-bilinear resize to 299x299"


def cached_weights_path() -> Path:
    """Where torch-fidelity (torch.hub) caches the weights: `$TORCH_HOME/hub/checkpoints/<file>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[-1]


def _missing_weights(reason: str) -> AytError:
    return AytError(f"Inception-v3 weights are not available ({reason}); download {WEIGHTS_URL} once and pass "
                    f"--inception-weights PATH (config: eval.inception_weights=PATH), or put it at {cached_weights_path()}")


def resolve_weights(weights_path: str | Path | None = None, download: bool = True) -> Path:
    """The weights file: `weights_path` if given, else the torch.hub cache, else a download into it."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        check(path.is_file(), f"Inception weights file {path} does not exist; pass the path of "
              f"{WEIGHTS_URL.rsplit('/', 1)[-1]} (from {WEIGHTS_URL})")
        return path
    cached = cached_weights_path()
    if cached.is_file():
        return cached
    if not download:
        raise _missing_weights(f"not in {cached.parent} and downloads are off")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, str(cached), hash_prefix=WEIGHTS_SHA256_PREFIX)
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError; hash mismatch a RuntimeError
        raise _missing_weights(f"download failed: {err}") from None
    return cached


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors without unpickling code."""
    try:
        state = load_weights_file(path, "Inception weights")
    except AytError as err:
        raise AytError(f"{err}; pass the file {WEIGHTS_URL}") from None
    check(all(isinstance(v, torch.Tensor) for v in state.values()),
          f"Inception weights {path} are not a state dict of tensors; pass the file {WEIGHTS_URL}")
    return state


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]` in [-1, 1] (C = 1 or 3) -> uint8 `[B, 3, H, W]` in 0..255 (gray repeated)."""
    check(images.dim() == 4 and images.shape[1] in (1, 3),
          f"Inception features need images [B, 1 or 3, H, W], got {tuple(images.shape)}")
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionFeatures:
    """Callable: images `[B, C, H, W]` in [-1, 1] -> pool features float32 `[B, 2048]` (CPU).

    Args:
        weights_path: the torch-fidelity weights file; None uses the torch.hub cache and
            downloads there if `download` (offline without the file: `AytError` saying how to
            provide it).
        device: where the network runs.
        batch: images per forward pass.
    """

    kind = FEATURE_KIND
    dim = FEATURE_DIM

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu",
                 batch: int = 64, download: bool = True) -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = resolve_weights(weights_path, download)
        buffer = io.BytesIO()
        torch.save(_load_state_dict(path), buffer)  # re-serialised tensors only: safe for the library's loader
        buffer.seek(0)
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
        except RuntimeError as err:
            raise AytError(f"Inception weights {path} do not fit the network ({str(err).splitlines()[0]}); "
                           f"pass the file {WEIGHTS_URL}") from None
        self.net, self.device, self.batch = net.to(device), torch.device(device), batch

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features `[B, 2048]` float32 on the CPU for images `[B, C, H, W]` in [-1, 1]."""
        x = to_uint8_rgb(images)
        out = [self.net(chunk.to(self.device))[0].float().cpu() for chunk in x.split(self.batch)]
        return torch.cat(out)
