"""Networks: the DDPM++ and ADM U-Nets, the preconditioning wrapper and seeded dropout.

`build_network(preset, ...)` returns a `Precond` (method.md section 1) around the preset's
network: a `SongUNet` (DDPM++) or, for `imagenet64-adm`, a `DhariwalUNet` (ADM).
`build_meanflow_network` returns a `MeanFlowNet` (method.md section 8) around a SongUNet preset.
Presets (parameter counts with `label_dim=0`, `in_channels = out_channels`, unless stated):

- `"tiny"`: model_channels 32, channel_mult (1, 2), 2 blocks, attention at 8x8 (and, as always in
  DDPM++, in the first bottleneck block). 1,033,507 parameters at 16x16x3; 994,913 at 8x8x1.
  For 8x8 / 16x16 images on CPU.
- `"small"`: model_channels 48, channel_mult (1, 2, 2), 2 blocks, attention at 8x8.
  3,936,819 parameters at 16x16x3 and at 32x32x3.
- `"cifar10-ddpmpp"`: EDM/ECT CIFAR-10 DDPM++: model_channels 128, channel_mult (2, 2, 2),
  4 blocks, attention at 16x16, positional embedding. 55,732,739 parameters at 32x32x3
  (EDM reports 55.73M). Dropout 0.13 for EDM; ECT/AYT configs pass `dropout=0.2`.
  EDM's `edm-cifar10-32x32-{uncond,cond}-vp.pkl` load onto it (`ayt.nets.edm_pickle`).
- `"cifar10-ncsnpp"`: EDM's CIFAR-10 NCSN++ ("ve"): as DDPM++ but Fourier noise embedding of
  256 channels, (1, 3, 3, 1) resampling filter and the residual encoder. 56,395,523 parameters
  at 32x32x3. EDM's `edm-cifar10-32x32-{uncond,cond}-ve.pkl` load onto it.
- `"imagenet64-adm"`: EDM's ImageNet-64 ADM (`DhariwalUNet`, the architecture of
  `edm-imagenet-64x64-cond-adm.pkl`): model_channels 192, channel_mult (1, 2, 3, 4), 3 blocks,
  attention at 32, 16 and 8 with 64 channels per head, dropout 0.10. 295,899,267 parameters
  at 64x64x3 with `label_dim=1000` (EDM reports 295.9M).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ayt.errors import AytError, check
from ayt.nets.adm import DhariwalUNet
from ayt.nets.dropout import SeededDropout, shared_dropout
from ayt.nets.meanflow import MeanFlowNet
from ayt.nets.precond import Precond
from ayt.nets.unet import SongUNet

__all__ = ["NETWORK_PRESETS", "PRESET_ARCHITECTURES", "DhariwalUNet", "MeanFlowNet", "Precond", "SeededDropout",
           "SongUNet", "build_meanflow_network", "build_network", "build_raw_network", "count_parameters",
           "shared_dropout"]

NETWORK_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model_channels=32, channel_mult=(1, 2), channel_mult_emb=4, num_blocks=2,
                 attn_resolutions=(8,), dropout=0.10, embedding_type="positional"),
    "small": dict(model_channels=48, channel_mult=(1, 2, 2), channel_mult_emb=4, num_blocks=2,
                  attn_resolutions=(8,), dropout=0.10, embedding_type="positional"),
    "cifar10-ddpmpp": dict(model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4,
                           num_blocks=4, attn_resolutions=(16,), dropout=0.13,
                           embedding_type="positional"),
    "cifar10-ncsnpp": dict(model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4,
                           num_blocks=4, attn_resolutions=(16,), dropout=0.13,
                           embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                           resample_filter=(1, 3, 3, 1)),
    # EDM `train.py --arch=adm` (model_channels 192, channel_mult [1,2,3,4]) with DhariwalUNet's
    # defaults and the README's ImageNet-64 dropout 0.10.
    "imagenet64-adm": dict(model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4,
                           num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10),
}

# The network class of each preset; its constructor's keywords are the valid overrides.
PRESET_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "tiny": SongUNet, "small": SongUNet, "cifar10-ddpmpp": SongUNet, "cifar10-ncsnpp": SongUNet,
    "imagenet64-adm": DhariwalUNet,
}

_FIXED = ("img_resolution", "in_channels", "out_channels", "label_dim")


def _unet_kwargs(preset: str, overrides: dict | None) -> dict[str, Any]:
    """Preset kwargs for the preset's network class with `overrides` applied; unknown names
    (checked against that class's constructor) raise `AytError`."""
    if preset not in NETWORK_PRESETS:
        raise AytError(f"unknown network preset {preset!r}; use one of {sorted(NETWORK_PRESETS)}")
    cls = PRESET_ARCHITECTURES[preset]
    valid = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", *_FIXED)]
    unknown = sorted(set(overrides or {}) - set(valid))
    check(not unknown, f"unknown network override(s) {unknown} for preset {preset!r} "
          f"({cls.__name__}); valid keys are {valid}")
    return {**NETWORK_PRESETS[preset], **(overrides or {})}


def build_raw_network(preset: str = "tiny", *, img_resolution: int, in_channels: int, label_dim: int = 0,
                      dropout: float | None = None, overrides: dict | None = None) -> nn.Module:
    """The preset's raw network `F` (a `SongUNet` or `DhariwalUNet`), before any wrapper;
    `dropout=None` keeps the preset's rate. Maps `[B, in_channels, R, R]` to the same shape."""
    kwargs = _unet_kwargs(preset, overrides)
    if dropout is not None:
        kwargs["dropout"] = dropout
    levels = len(kwargs["channel_mult"]) - 1
    check(img_resolution > 0 and img_resolution % 2 ** levels == 0,
          f"img_resolution {img_resolution} is not divisible by 2**{levels} (preset {preset!r}); "
          "resize the images or override channel_mult with fewer levels")
    return PRESET_ARCHITECTURES[preset](img_resolution, in_channels, in_channels, label_dim=label_dim, **kwargs)


def build_network(preset: str = "tiny", *, img_resolution: int, in_channels: int,
                  label_dim: int = 0, dropout: float | None = None, boundary: str = "edm",
                  sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  overrides: dict | None = None) -> Precond:
    """Build `Precond(SongUNet(...))` or `Precond(DhariwalUNet(...))` from a preset (see
    `PRESET_ARCHITECTURES`); `dropout=None` keeps the preset's rate.

    The network maps `[B, in_channels, img_resolution, img_resolution]` to the same shape.
    """
    net = build_raw_network(preset, img_resolution=img_resolution, in_channels=in_channels, label_dim=label_dim,
                            dropout=dropout, overrides=overrides)
    return Precond(net, sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max,
                   boundary=boundary)


def build_meanflow_network(preset: str = "tiny", *, img_resolution: int, in_channels: int, label_dim: int = 0,
                           dropout: float | None = None, second: str = "t-r",
                           overrides: dict | None = None) -> MeanFlowNet:
    """`MeanFlowNet(SongUNet(..., second_time=True))`: the average velocity `u(z, r, t)` (method.md
    section 8); SongUNet presets only (the second time input is a SongUNet option)."""
    check(PRESET_ARCHITECTURES.get(preset, SongUNet) is SongUNet,
          f"objective.kind=meanflow needs a SongUNet preset (tiny, small, cifar10-ddpmpp, cifar10-ncsnpp), "
          f"not network.preset={preset}")
    net = build_raw_network(preset, img_resolution=img_resolution, in_channels=in_channels, label_dim=label_dim,
                            dropout=dropout, overrides={**(overrides or {}), "second_time": True})
    return MeanFlowNet(net, second)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of `module` (trainable or frozen)."""
    return sum(p.numel() for p in module.parameters())
