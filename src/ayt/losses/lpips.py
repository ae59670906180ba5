"""LPIPS distance (Zhang et al. 2018) through the `lpips` package (method.md section 2, "Distances").

`lpips` ships its calibrated linear layers inside the package; the trunk (torchvision VGG16 or
AlexNet, ImageNet weights) normally comes through torchvision's download cache
(`$TORCH_HOME/hub/checkpoints`). This wrapper never lets torchvision download on its own: it
builds the trunk randomly initialised and then loads, in this order, the file given as
`weights` (the torchvision state_dict file, e.g. `vgg16-397923af.pth`), the cached file, or a
download into the cache. Without any of them it raises AytError when it is built, i.e. before
training starts. Inputs are images in [-1, 1] (what LPIPS expects); gray images are repeated to
3 channels. The whole network is frozen.
"""

from __future__ import annotations

import os
import urllib.error
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ayt.checkpoint import load_weights_file
from ayt.errors import AytError, check

# lpips trunk name -> (torchvision name, weights URL, smallest image side it accepts without upsampling)
TRUNKS: dict[str, tuple[str, str, int]] = {
    "vgg": ("vgg16", "https://download.pytorch.org/models/vgg16-397923af.pth", 16),
    "alex": ("alexnet", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", 31),
}
UPSAMPLE_SIZE = 224


def _guidance(net: str) -> str:
    tv_name, url, _ = TRUNKS[net]
    return (f"LPIPS needs the torchvision {tv_name} weights: run once with internet, or download {url} "
            "and pass distance.lpips_weights=PATH")


def cached_trunk_file(net: str) -> Path:
    """Where torchvision caches the trunk weights: `$TORCH_HOME/hub/checkpoints/<file of the URL>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(TRUNKS[net][1])


def _read_state_dict(path: Path, net: str) -> dict[str, Tensor]:
    """A torchvision state_dict file, read weights-only (no code runs)."""
    try:
        return load_weights_file(path, "LPIPS trunk weights")
    except AytError as err:
        raise AytError(f"{err}; {_guidance(net)}") from None


def trunk_state_dict(net: str, weights: str | os.PathLike | None) -> dict[str, Tensor]:
    """The torchvision trunk weights from `weights`, the cache, or a download (AytError offline)."""
    if weights is not None:
        return _read_state_dict(Path(weights), net)
    cached = cached_trunk_file(net)
    if cached.is_file():
        return _read_state_dict(cached, net)
    try:
        return torch.hub.load_state_dict_from_url(TRUNKS[net][1], map_location="cpu", progress=False, weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise AytError(f"{_guidance(net)} (download failed: {type(err).__name__})") from None


def load_trunk(trunk: nn.Module, sd: dict[str, Tensor], source: str) -> None:
    """Copy torchvision `features.<i>.<param>` entries into lpips' `slice<k>.<i>.<param>` layout.

    lpips keeps torchvision's layer index `i` inside each slice, so the mapping is by name.
    """
    mapped = {}
    for key in trunk.state_dict():
        tv_key = "features." + key.split(".", 1)[1]
        check(tv_key in sd, f"{source} has no entry {tv_key!r}; pass the torchvision weights file of this trunk")
        mapped[key] = sd[tv_key]
    try:
        trunk.load_state_dict(mapped, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise AytError(f"{source} does not fit the LPIPS trunk ({first}); pass the torchvision weights file of this trunk") from None


class LPIPS(nn.Module):
    """`LPIPS(x, y) -> [B]` for images x, y [B, C, H, W] in [-1, 1] (C = 1 or 3).

    Args:
        net: trunk, "vgg" (VGG16) or "alex" (AlexNet).
        upsample: resize inputs bilinearly to 224x224 first (needed below 16x16 for vgg, 31x31
            for alex).
        weights: the torchvision trunk state_dict file for offline use; None looks in the
            torchvision cache and downloads when missing.
    """

    def __init__(self, net: str = "vgg", upsample: bool = False, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        check(net in TRUNKS, f"unknown LPIPS trunk {net!r}; use one of {', '.join(TRUNKS)}")
        import lpips

        sd = trunk_state_dict(net, weights)  # first, so that a missing file fails fast
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation warning for pretrained=False
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        load_trunk(self.model.net, sd, str(weights or cached_trunk_file(net)))
        self.model.eval().requires_grad_(False)
        self.net_name, self.upsample = net, bool(upsample)

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode (the network is frozen) whatever the parent asks."""
        super().train(mode)
        self.model.eval()
        return self

    def _prepare(self, x: Tensor) -> Tensor:
        check(x.ndim == 4 and x.shape[1] in (1, 3), f"LPIPS takes images [B, 1 or 3, H, W], got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.upsample:
            return F.interpolate(x, size=(UPSAMPLE_SIZE, UPSAMPLE_SIZE), mode="bilinear", align_corners=False)
        smallest = TRUNKS[self.net_name][2]
        check(min(x.shape[2:]) >= smallest, f"LPIPS ({self.net_name}) needs images of at least {smallest}x{smallest}, "
              f"got {tuple(x.shape[2:])}; set distance.lpips_upsample=true")
        return x

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-example LPIPS [B]."""
        if x.shape != y.shape:
            raise AytError(f"distance inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        return self.model(self._prepare(x), self._prepare(y), normalize=False).reshape(x.shape[0])
