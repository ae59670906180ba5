"""Rebuild a frozen feature network `phi` from a checkpoint written by `ayt train-features`
(or, for a single file, from the AYT reference's classifier state_dict: `ayt.features.reference`).

The checkpoint (see `ayt.features.train`) holds the weights as module "features" and, in its
JSON state, what is needed to rebuild the network: `kind: "features"`, `arch`, `in_channels`,
`target_dim`, `resolution`, `subset`, `width`. The MFD distance (method.md section 4) uses the
network frozen: eval mode, no parameter gradients.
"""

from __future__ import annotations

import os
from typing import Any

from ayt.checkpoint import check_compatible, check_finite, load_checkpoint, require_keys
from ayt.errors import AytError, check
from ayt.features.nets import FeatureNet, build_feature_net, freeze
from ayt.features.reference import is_reference_file, load_reference_net

FEATURES_KIND = "features"
FEATURES_MODULE = "features"


def _retrain_hint(resolution: int | None) -> str:
    res = f" data.resolution={resolution}" if resolution is not None else ""
    return f"train a feature network on this dataset: ayt train-features data.name=NAME{res} train.run_dir=RUN_DIR"


def check_feature_state(state: dict[str, Any], path: str, resolution: int | None, channels: int | None) -> None:
    """Raise AytError unless `state` is a feature-network run matching the images it will see."""
    kind = state.get("kind")
    check(kind == FEATURES_KIND, f"{path} is not a feature-network checkpoint (it holds a {kind!r} run); "
          "pass the run folder written by 'ayt train-features'")
    require_keys(state, ("in_channels", "resolution", "arch", "target_dim"), path)
    hint = _retrain_hint(resolution)
    saved_c, saved_r = state["in_channels"], state["resolution"]
    check(channels is None or channels == saved_c,
          f"feature network {path} was trained on {saved_c}-channel images but the images here have {channels}; {hint}")
    check(resolution is None or resolution == saved_r,
          f"feature network {path} was trained at resolution {saved_r} but the images here are {resolution}x{resolution}; {hint}")


def load_feature_net(
    path: str | os.PathLike, *, resolution: int | None = None, channels: int | None = None, arch: str | None = None
) -> FeatureNet:
    """Load the feature network of a checkpoint (folder or run folder), frozen, on the CPU.

    `resolution` and `channels` describe the images it will be used on; a mismatch with the
    training images of the checkpoint raises AytError (before any CM training starts), as does a
    checkpoint that is not a feature network. Move it with `.to(device)`.
    A single file is read as the AYT reference's classifier (`cifar10_clf.pt`); `arch`
    (`features.arch`) must then name its layout (vgg16_bn or resnet18). A run folder records its own
    architecture and ignores `arch`.
    """
    if is_reference_file(path):
        return load_reference_net(path, arch=arch, resolution=resolution, channels=channels)
    ckpt = load_checkpoint(path, map_location="cpu")
    state = ckpt.state
    check_feature_state(state, str(ckpt.path), resolution, channels)
    if FEATURES_MODULE not in ckpt.modules:
        raise AytError(f"{ckpt.path} has no '{FEATURES_MODULE}' weights; pass a checkpoint written by 'ayt train-features'")
    net = build_feature_net(
        state["arch"],
        in_channels=state["in_channels"],
        target_dim=state["target_dim"],
        resolution=state["resolution"],
        width=state.get("width") or 32,
    )
    check_compatible(ckpt.modules[FEATURES_MODULE], net, str(ckpt.path))
    check_finite(ckpt.modules[FEATURES_MODULE], ckpt.path)
    net.load_state_dict(ckpt.modules[FEATURES_MODULE])
    freeze(net)
    return net
