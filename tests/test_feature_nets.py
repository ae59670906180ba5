"""Feature networks phi: shapes, attributes, factory, freezing (method.md section 4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ayt.errors import AytError
from ayt.features import FEATURE_NETS, FeatureNet, TinyVGG, build_feature_net, freeze


def _spatial(arch: str, res: int) -> list[int]:
    """Expected spatial size after each stage."""
    if arch == "resnet18":
        return [res, (res + 1) // 2, (res + 3) // 4, (res + 7) // 8]
    stages = 5 if arch == "vgg16_bn" else 4
    return [max(res >> (k + 1), 1) for k in range(stages)]


@pytest.mark.parametrize("arch", FEATURE_NETS)
@pytest.mark.parametrize("res", [8, 16, 32])
def test_shapes(arch: str, res: int) -> None:
    torch.manual_seed(0)
    net = build_feature_net(arch, in_channels=3, target_dim=15, resolution=res)
    x = torch.randn(2, 3, res, res)
    maps = net.features(x)
    assert len(maps) == len(net.feature_channels)
    assert [m.shape[1] for m in maps] == list(net.feature_channels)
    assert [m.shape[-1] for m in maps[:-1]] == _spatial(arch, res)
    assert [m.shape[-2] for m in maps[:-1]] == _spatial(arch, res)
    assert maps[-1].shape == (2, 15)
    net.eval()
    assert torch.allclose(net(x), net.features(x)[-1])


@pytest.mark.parametrize("arch", FEATURE_NETS)
def test_attributes_and_gray_input(arch: str) -> None:
    net = build_feature_net(arch, in_channels=1, target_dim=7, resolution=16)
    assert (net.arch, net.in_channels, net.target_dim, net.resolution) == (arch, 1, 7, 16)
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, 7)


def test_vgg_has_five_pooling_stages_with_vgg16_widths() -> None:
    net = build_feature_net("vgg16_bn", in_channels=3, target_dim=15, resolution=32)
    assert net.feature_channels == (64, 128, 256, 512, 512, 15)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 13 and len(bns) == 13


def test_param_counts() -> None:
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert 0.3e6 <= count(TinyVGG(3, 15)) <= 0.5e6
    assert 14e6 < count(build_feature_net("vgg16_bn", in_channels=3, target_dim=15, resolution=32)) < 15.5e6
    assert 10.5e6 < count(build_feature_net("resnet18", in_channels=3, target_dim=15, resolution=32)) < 11.5e6


def test_factory_rejects_bad_input() -> None:
    with pytest.raises(AytError, match="tiny_vgg"):
        build_feature_net("vgg19", in_channels=3, target_dim=15, resolution=32)
    with pytest.raises(AytError):
        build_feature_net("tiny_vgg", in_channels=3, target_dim=15, resolution=4)
    with pytest.raises(AytError):
        build_feature_net("tiny_vgg", in_channels=0, target_dim=15, resolution=16)


def test_freeze() -> None:
    net = build_feature_net("tiny_vgg", in_channels=3, target_dim=15, resolution=16)
    assert freeze(net) is net
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    parent = nn.ModuleDict({"phi": net, "other": nn.Linear(2, 2)})
    parent.train()  # a training loop calling .train() on its container must not un-freeze BatchNorm
    assert not net.training and parent["other"].training
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    net(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients still reach the input
    assert all(p.grad is None for p in net.parameters())


def test_frozen_net_keeps_batchnorm_statistics() -> None:
    net = freeze(build_feature_net("tiny_vgg", in_channels=3, target_dim=15, resolution=16))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    net(torch.randn(4, 3, 16, 16) * 3 + 1)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_freeze_plain_module() -> None:
    lin = freeze(nn.Linear(3, 3))
    assert not lin.training and not any(p.requires_grad for p in lin.parameters())
    assert not isinstance(lin, FeatureNet)
