"""Feature networks `phi` for the manifold feature distance (method.md section 4).

Every network maps images x [B, C, H, W] to the regression head `phi(x)` [B, target_dim]
(`forward`) and exposes `features(x)`: the feature map after each pooling stage, then the head
output, which is what the reference MFD compares (5 VGG pooling stages plus the 15 targets).
The head is global average pooling followed by one linear layer. Pooling is skipped once the
spatial size is 1, so 8x8 inputs work with every architecture.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ayt.config import FEATURE_ARCHS
from ayt.errors import AytError, check

VGG16_STAGES: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (width, convs)


class FeatureNet(nn.Module):
    """Stages then a global-average-pooled linear head; shared by every architecture.

    Attributes used by the MFD distance and checkpoint checks: `arch`, `in_channels`,
    `target_dim`, `resolution` (the training resolution; None if unknown), `feature_channels`
    (channels of each `features` entry, head last). A frozen net (see `freeze`) stays in eval
    mode even when a parent module calls `.train()`.
    """

    def __init__(
        self, arch: str, stages: list[nn.Module], widths: list[int], *, in_channels: int, target_dim: int,
        resolution: int | None,
    ) -> None:
        super().__init__()
        self.arch, self.in_channels, self.target_dim, self.resolution = arch, in_channels, target_dim, resolution
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(widths[-1], target_dim)
        self.feature_channels = (*widths, target_dim)
        self.frozen = False

    def features(self, x: Tensor) -> list[Tensor]:
        """Feature maps after each stage ([B, C_k, H_k, W_k]) followed by the head output [B, target_dim]."""
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        maps.append(self.head(x.mean(dim=(2, 3))))
        return maps

    def forward(self, x: Tensor) -> Tensor:
        """Regression head phi(x) [B, target_dim] for images x [B, in_channels, H, W]."""
        return self.features(x)[-1]

    def train(self, mode: bool = True) -> FeatureNet:
        """As nn.Module.train, except that a frozen net stays in eval mode (BatchNorm statistics fixed)."""
        return super().train(mode and not self.frozen)


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients, for use inside the CM loss (method.md section 4); returns net."""
    if isinstance(net, FeatureNet):
        net.frozen = True
    net.eval()
    net.requires_grad_(False)
    return net


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class MaybePool(nn.Module):
    """2x2 max pooling, skipped when the input is already 1 pixel high or wide."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.max_pool2d(x, 2) if min(x.shape[2:]) >= 2 else x


def _vgg_stages(in_channels: int, plan: tuple[tuple[int, int], ...]) -> tuple[list[nn.Module], list[int]]:
    """One stage = `convs` x (3x3 conv, BN, ReLU) then MaybePool."""
    stages, cin = [], in_channels
    for width, convs in plan:
        layers = [m for i in range(convs) for m in _conv_bn_relu(cin if i == 0 else width, width)]
        stages.append(nn.Sequential(*layers, MaybePool()))
        cin = width
    return stages, [w for w, _ in plan]


class VGG16BN(FeatureNet):
    """VGG16 with BatchNorm (64-64-M-128-128-M-256x3-M-512x3-M-512x3-M), from scratch, pooled linear head."""

    def __init__(self, in_channels: int, target_dim: int, resolution: int | None = None) -> None:
        stages, widths = _vgg_stages(in_channels, VGG16_STAGES)
        super().__init__(
            "vgg16_bn", stages, widths, in_channels=in_channels, target_dim=target_dim, resolution=resolution
        )


class TinyVGG(FeatureNet):
    """A small VGG for CPU runs: widths (w, 2w, 4w, 4w) with (2, 2, 2, 1) convs; about 0.43M params at w=32."""

    def __init__(self, in_channels: int, target_dim: int, width: int = 32, resolution: int | None = None) -> None:
        check(width >= 1, f"tiny_vgg width must be >= 1, got {width}")
        plan = ((width, 2), (2 * width, 2), (4 * width, 2), (4 * width, 1))
        stages, widths = _vgg_stages(in_channels, plan)
        super().__init__(
            "tiny_vgg", stages, widths, in_channels=in_channels, target_dim=target_dim, resolution=resolution
        )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet18(FeatureNet):
    """ResNet-18 with the CIFAR stem (3x3 conv, no max pool); the 4 stage outputs are the feature maps."""

    def __init__(self, in_channels: int, target_dim: int, resolution: int | None = None) -> None:
        widths = [64, 128, 256, 512]
        stages, cin = [], 64
        for i, width in enumerate(widths):
            blocks = [BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)]
            stages.append(nn.Sequential(*(_conv_bn_relu(in_channels, 64) if i == 0 else []), *blocks))
            cin = width
        super().__init__(
            "resnet18", stages, widths, in_channels=in_channels, target_dim=target_dim, resolution=resolution
        )


FEATURE_NETS = FEATURE_ARCHS


def build_feature_net(name: str, *, in_channels: int, target_dim: int, resolution: int, width: int = 32) -> FeatureNet:
    """Build a feature network by name ("vgg16_bn" | "resnet18" | "tiny_vgg"); AytError on bad input.

    `width` is the tiny_vgg base width (the other architectures have fixed widths).
    """
    check(in_channels >= 1, f"in_channels must be >= 1, got {in_channels}")
    check(target_dim >= 1, f"target_dim must be >= 1, got {target_dim}")
    check(resolution >= 8, f"feature nets need resolution >= 8, got {resolution}; use larger images")
    if name == "vgg16_bn":
        return VGG16BN(in_channels, target_dim, resolution)
    if name == "resnet18":
        return ResNet18(in_channels, target_dim, resolution)
    if name == "tiny_vgg":
        return TinyVGG(in_channels, target_dim, width=width, resolution=resolution)
    raise AytError(f"unknown feature network {name!r}; use one of {', '.join(FEATURE_NETS)}")
