"""Load the AYT reference code's feature network (its released `cifar10_clf.pt`) as an `ayt` FeatureNet.

The reference (github.com/1202kbs/AYT) trains its classifier with `scripts/train_clf/train_clf.py`
and saves `torch.save(get_module(clf).state_dict(), ...)`: a plain state_dict (DataParallel is
unwrapped before saving). Its default classifier (`configs/classifier/vgg.yaml`) is `VGG16`,
img_resolution 32, in_channels 3, n_classes 15; `configs/classifier/resnet.yaml` is a CIFAR
ResNet-18 (`num_blocks [2, 2, 2, 2]`). Facts of `src/ayt/classifiers.py` used here:

- VGG16: `layers` is a ModuleDict named by resolution: `{R}x{R}_block{j}` (3x3 conv *with bias*,
  BatchNorm, ReLU), `{R}x{R}_maxpool`, then `{r}x{r}_avgpool` (global) and `classifier`
  (Linear 512 -> n_classes). The MFD features (`forward(x, return_feats=True)`) are the 5
  max-pool outputs (after ReLU and pooling) and the classifier output as `[B, D, 1, 1]`.
- ResNet: `conv1`/`bn1` stem (no max pool), `layer1..4` of BasicBlocks (`conv1, bn1, conv2,
  bn2, shortcut.0 (1x1 conv), shortcut.1 (BN)`), `avg_pool2d(., 4)` and `linear`. Features: the
  outputs of `layer1..4` and of `linear`. The fixed 4x4 pooling makes it a 32x32-only network.
- Inputs: images in [-1, 1] (`Normalize(0.5, 0.5)`; the CM output itself in training), no
  resizing, no other normalisation.

`ayt`'s VGG16BN and ResNet18 compute the same maps in the same order (`FeatureNet.features`),
and the MFD of `ayt.losses.mfd` (form "reference") treats the head output `[B, D]` as D
channels of one position, as the reference does. One structural difference: `ayt`'s VGG convs
have no bias (BatchNorm follows). In eval mode, the only mode MFD uses, `BN(conv(x) + b)` equals
`BN'(conv(x))` with `running_mean' = running_mean - b`, so the bias is folded into the
BatchNorm's running mean (exact up to float rounding).

The reference itself loads the file with `load_state_dict(..., strict=False)`, which ignores
missing and extra keys; here every key and shape must match. Not distinguishable from a state_dict:
the reference's VGGMod16 has the same key names and shapes, and with `use_maxpool: False` a
different forward (stride-2 convs). The released file is the default VGG16 (`train_clf.yaml`:
`classifier: vgg`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ayt.checkpoint import load_weights_file
from ayt.errors import AytError, check
from ayt.features.nets import FeatureNet, build_feature_net, freeze

RESNET_RESOLUTION = 32  # the reference ResNet's avg_pool2d(out, 4) is global only at 32x32
_VGG_FIRST = re.compile(r"^layers\.(\d+)x\1_block0\.conv\.weight$")
_HINT = ("pass the state_dict saved by the AYT reference's train_clf.py (VGG16 or ResNet-18) "
         "or a run folder of 'ayt train-features'")


def is_reference_file(path: str | os.PathLike) -> bool:
    """True for a single file (the reference's `.pt`); `ayt` checkpoints are folders."""
    return Path(path).is_file()


def _unwrap(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """The bare state_dict: inside `{"state_dict": ...}`, without a DataParallel `module.` prefix."""
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise AytError(f"{path} is not a state_dict of tensors (entry {bad[0]!r} is not a tensor); {_HINT}")
    return state


def _layout(state: dict[str, torch.Tensor], path: Path) -> str:
    """"vgg16_bn" or "resnet18" from the key names; AytError naming the first unexpected key."""
    if any(_VGG_FIRST.match(k) for k in state):
        return "vgg16_bn"
    if "conv1.weight" in state and "linear.weight" in state:
        return "resnet18"
    first = next(iter(state), None)
    raise AytError(f"{path} is not an AYT reference classifier: unexpected key {first!r} (expected "
                   f"'layers.32x32_block0.conv.weight' (VGG16) or 'conv1.weight' (ResNet-18)); {_HINT}")


def _vgg_net(state: dict[str, torch.Tensor]) -> FeatureNet:
    """An ayt VGG16BN sized like the reference file (resolution from the largest `RxR` name)."""
    resolution = max(int(m.group(1)) for k in state if (m := _VGG_FIRST.match(k)))
    first = state[f"layers.{resolution}x{resolution}_block0.conv.weight"]
    target = state.get("layers.classifier.weight")
    check(first.dim() == 4 and target is not None and target.dim() == 2,
          f"the reference VGG16 file lacks a 4-d first conv or a 2-d 'layers.classifier.weight'; {_HINT}")
    return build_feature_net("vgg16_bn", in_channels=first.shape[1], target_dim=target.shape[0],
                             resolution=resolution)


def _resnet_net(state: dict[str, torch.Tensor]) -> FeatureNet:
    first, target = state["conv1.weight"], state["linear.weight"]
    check(first.dim() == 4 and target.dim() == 2, f"conv1.weight / linear.weight have the wrong rank; {_HINT}")
    return build_feature_net("resnet18", in_channels=first.shape[1], target_dim=target.shape[0],
                             resolution=RESNET_RESOLUTION)


def vgg_names(net: FeatureNet) -> dict[str, str]:
    """Reference VGG16 key -> ayt VGG16BN key (every ayt key once; the conv biases are extra).

    `stages.s.(3j)` (conv) <- `layers.{r}x{r}_block{j}.conv`, `stages.s.(3j+1)` (BN) <-
    `layers.{r}x{r}_block{j}.bn`, with `r = resolution >> s`; `head` <- `layers.classifier`.
    """
    names = {}
    for key in net.state_dict():
        if key.startswith("head."):
            names[f"layers.classifier.{key[5:]}"] = key
            continue
        stage, index, leaf = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(.+)", key).groups()
        r = net.resolution >> int(stage)
        block, part = divmod(int(index), 3)
        names[f"layers.{r}x{r}_block{block}.{('conv', 'bn')[part]}.{leaf}"] = key
    return names


def resnet_names(net: FeatureNet) -> dict[str, str]:
    """Reference ResNet-18 key -> ayt ResNet18 key.

    Stem `conv1`, `bn1` <- `stages.0.0`, `stages.0.1`; `layer{i+1}.{j}` <- `stages.i.(j + o)`
    (o = 3 in stage 0, after the stem's conv, BN, ReLU; else 0) with `conv1, bn1, conv2, bn2` <-
    `body.0, body.1, body.3, body.4` and `shortcut.k` <- `shortcut.k`; `linear` <- `head`.
    """
    body = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2"}
    names = {}
    for key in net.state_dict():
        if key.startswith("head."):
            names[f"linear.{key[5:]}"] = key
        elif m := re.fullmatch(r"stages\.0\.([01])\.(.+)", key):
            names[f"{('conv1', 'bn1')[int(m.group(1))]}.{m.group(2)}"] = key
        else:
            stage, index, part, sub, leaf = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(body|shortcut)\.(\d+)\.(.+)",
                                                         key).groups()
            block = int(index) - (3 if stage == "0" else 0)
            name = body[sub] if part == "body" else f"shortcut.{sub}"
            names[f"layer{int(stage) + 1}.{block}.{name}.{leaf}"] = key
    return names


def _expected_shapes(net: FeatureNet, names: dict[str, str], arch: str) -> dict[str, tuple[int, ...]]:
    """Shape of every reference key, the VGG conv biases included."""
    ours = net.state_dict()
    shapes = {ref: tuple(ours[key].shape) for ref, key in names.items()}
    if arch == "vgg16_bn":
        for ref in list(shapes):
            if ref.endswith(".conv.weight"):
                shapes[ref.replace(".weight", ".bias")] = (shapes[ref][0],)
    return shapes


def _check_layout(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path, arch: str) -> None:
    """Every key and shape of the reference layout, nothing else; one line naming the first problem."""
    what = f"{path} does not match the AYT reference {'VGG16' if arch == 'vgg16_bn' else 'ResNet-18'} layout"
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise AytError(f"{what}: unexpected key {unexpected[0]!r}; {_HINT}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise AytError(f"{what}: missing key {missing[0]!r}; {_HINT}")
    for key, shape in expected.items():
        check(tuple(state[key].shape) == shape,
              f"{what}: {key!r} has shape {tuple(state[key].shape)}, expected {shape}; {_HINT}")


def convert_reference_state(state: dict[str, torch.Tensor], path: str | os.PathLike = "state_dict") -> FeatureNet:
    """An ayt FeatureNet (frozen, CPU) holding the weights of a reference classifier state_dict."""
    path = Path(path)
    state = _unwrap(state, path)
    arch = _layout(state, path)
    net = _vgg_net(state) if arch == "vgg16_bn" else _resnet_net(state)
    names = vgg_names(net) if arch == "vgg16_bn" else resnet_names(net)
    _check_layout(state, _expected_shapes(net, names, arch), path, arch)
    ours = {key: state[ref].clone() for ref, key in names.items()}
    if arch == "vgg16_bn":  # fold the conv bias into the BatchNorm that follows (exact in eval mode)
        for ref, key in names.items():
            if ref.endswith(".bn.running_mean"):
                ours[key] -= state[ref.replace(".bn.running_mean", ".conv.bias")].to(ours[key].dtype)
    net.load_state_dict(ours)
    return freeze(net)


def load_reference_net(path: str | os.PathLike, *, arch: str | None = None, resolution: int | None = None,
                       channels: int | None = None) -> FeatureNet:
    """Load the reference's classifier file (e.g. `cifar10_clf.pt`) weights-only, frozen, on the CPU.

    `arch` (the config's `features.arch`) must name the layout found in the file when given;
    `resolution` and `channels` describe the images it will see and must match the file.
    """
    path = Path(path)
    net = convert_reference_state(load_weights_file(path, "reference feature network"), path)
    check(arch is None or arch == net.arch,
          f"{path} holds the AYT reference's {net.arch} but features.arch={arch}; set features.arch={net.arch}")
    check(channels is None or channels == net.in_channels,
          f"feature network {path} takes {net.in_channels}-channel images but the images here have {channels}; "
          "use it on the data it was trained on (CIFAR-10 for cifar10_clf.pt)")
    check(resolution is None or resolution == net.resolution,
          f"feature network {path} works at resolution {net.resolution} but the images here are "
          f"{resolution}x{resolution}; use data.resolution={net.resolution}")
    return net
