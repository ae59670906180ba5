"""The AYT reference's classifier file (`cifar10_clf.pt`) as an MFD feature network.

The reference-layout modules below are written for this test from the reference's key names and
forward pass (github.com/1202kbs/AYT, src/ayt/classifiers.py): a VGG16 whose `layers` ModuleDict
is named by resolution, with biased convs, returning the 5 max-pool outputs and the classifier
output as features; a CIFAR ResNet-18 returning `layer1..4` and `linear`. Random weights and
BatchNorm statistics, saved with `torch.save(state_dict)` as the reference does; `ayt` must give
the same features, the same MFD value and the same MFD gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ayt.build import build_objective
from ayt.config import Config
from ayt.errors import AytError
from ayt.features.load import load_feature_net
from ayt.losses import build_distance

VGG16_PLAN = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class RefVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)  # conv has a bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class RefVGG(nn.Module):
    """Reference key names: layers.{r}x{r}_block{j}.{conv,bn}.*, layers.classifier.*."""

    def __init__(self, resolution: int = 32, cin: int = 3, classes: int = 15, plan: list = VGG16_PLAN) -> None:
        super().__init__()
        self.layers, r, j = nn.ModuleDict(), resolution, 0
        for width in plan:
            if width == "M":
                self.layers[f"{r}x{r}_maxpool"] = nn.MaxPool2d(2, 2)
                r, j = r // 2, 0
            else:
                self.layers[f"{r}x{r}_block{j}"] = RefVGGBlock(cin, width)
                cin, j = width, j + 1
        self.layers[f"{r}x{r}_avgpool"] = nn.AvgPool2d(r, r)
        self.layers["classifier"] = nn.Linear(512, classes)

    def feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for name, layer in self.layers.items():
            x = layer(x.flatten(1) if name == "classifier" else x)
            if name == "classifier":
                out.append(x[..., None, None])
            elif name.endswith("maxpool"):
                out.append(x)
        return out


class RefBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class RefResNet(nn.Module):
    """Reference key names: conv1, bn1, layer{1..4}.{0,1}.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}, linear."""

    def __init__(self, classes: int = 15) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        cin = 64
        for i, width in enumerate([64, 128, 256, 512]):
            blocks = [RefBasicBlock(cin, width, 1 if i == 0 else 2), RefBasicBlock(width, width, 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = width
        self.linear = nn.Linear(512, classes)

    def feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, x = [], F.relu(self.bn1(self.conv1(x)))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            out.append(x)
        out.append(self.linear(F.avg_pool2d(x, 4).flatten(1))[..., None, None])
        return out


def ref_distance(fx: list[torch.Tensor], fy: list[torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """The reference's distance: per layer, per channel sqrt(sum_hw diff^2 + eps^2) - eps, all summed."""
    return sum((((a - b).square().sum((2, 3)) + eps**2).sqrt() - eps).sum(1) for a, b in zip(fx, fy))


def randomised(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights, conv biases and BatchNorm statistics (so folding and eval mode matter); eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.1, 0.1)
                m.num_batches_tracked.fill_(1000)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    ref = randomised(RefVGG())
    path = tmp_path_factory.mktemp("ref") / "cifar10_clf.pt"
    torch.save(ref.state_dict(), path)
    return ref, path


def images(seed: int, b: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_same_features_distance_and_gradient(ref: nn.Module, mfd: nn.Module) -> None:
    x, y = images(1).requires_grad_(True), images(2)
    ours, theirs = mfd.net.features(x), ref.feats(x)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-4, atol=1e-5)
    d_ours, d_ref = mfd(x, y), ref_distance(ref.feats(x), ref.feats(y))
    torch.testing.assert_close(d_ours, d_ref, rtol=1e-4, atol=1e-4)
    g_ours, = torch.autograd.grad(d_ours.sum(), x)
    g_ref, = torch.autograd.grad(d_ref.sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-3, atol=1e-5)


def test_reference_vgg_file_gives_the_reference_features_distance_and_gradient(vgg_file):
    ref, path = vgg_file
    mfd = build_distance("mfd", features=str(path), resolution=32, channels=3, arch="vgg16_bn")
    assert (mfd.net.arch, mfd.net.in_channels, mfd.net.target_dim, mfd.net.resolution) == ("vgg16_bn", 3, 15, 32)
    assert not mfd.net.training and not any(p.requires_grad for p in mfd.net.parameters())
    assert_same_features_distance_and_gradient(ref, mfd)


def test_reference_resnet_file_gives_the_reference_features_distance_and_gradient(tmp_path):
    ref = randomised(RefResNet(), seed=1)
    torch.save(ref.state_dict(), tmp_path / "resnet_clf.pt")
    mfd = build_distance("mfd", features=str(tmp_path / "resnet_clf.pt"), resolution=32, channels=3, arch="resnet18")
    assert mfd.net.arch == "resnet18" and mfd.net.feature_channels == (64, 128, 256, 512, 15)
    assert_same_features_distance_and_gradient(ref, mfd)


def test_wrapped_and_dataparallel_prefixed_files_load_the_same_weights(vgg_file, tmp_path):
    ref, path = vgg_file
    plain = load_feature_net(path).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}, "iter": 5}, tmp_path / "w.pt")
    wrapped = load_feature_net(tmp_path / "w.pt").state_dict()
    assert all(torch.equal(plain[k], wrapped[k]) for k in plain)


def test_config_with_the_reference_file_builds_the_ayt_objective(vgg_file):
    _, path = vgg_file
    config = Config()
    config.distance.name, config.distance.mode, config.distance.features = "mfd", "aligned", str(path)
    config.features.arch = "vgg16_bn"
    objective = build_objective(config, resolution=32, channels=3)
    nets = [m for m in objective.modules() if getattr(m, "arch", None) == "vgg16_bn"]
    assert len(nets) == 1 and nets[0].resolution == 32
    config.features.arch = "tiny_vgg"
    with pytest.raises(AytError, match="holds the AYT reference's vgg16_bn .*set features.arch=vgg16_bn"):
        build_objective(config, resolution=32, channels=3)


def edited(state: dict, drop: str | None = None, add: dict | None = None) -> dict:
    state = {k: v for k, v in state.items() if k != drop}
    state.update(add or {})
    return state


@pytest.mark.parametrize("change, words", [
    ({"add": {"layers.8x8_block3.conv.weight": torch.zeros(256, 256, 3, 3)}},
     "VGG16 layout: unexpected key 'layers.8x8_block3.conv.weight'"),  # a VGG19
    ({"drop": "layers.32x32_block1.conv.bias"}, "VGG16 layout: missing key 'layers.32x32_block1.conv.bias'"),
    ({"add": {"layers.classifier.weight": torch.zeros(15, 256)}},
     r"'layers.classifier.weight' has shape \(15, 256\), expected \(15, 512\)"),
    ({"add": {"layers.32x32_block0.bn.weight": [1.0]}}, "not a state_dict of tensors"),
])
def test_other_layouts_are_refused_naming_the_first_problem(vgg_file, tmp_path, change, words):
    ref, _ = vgg_file
    torch.save(edited(ref.state_dict(), **change), tmp_path / "bad.pt")
    with pytest.raises(AytError, match=words) as err:
        load_feature_net(tmp_path / "bad.pt")
    assert "\n" not in str(err.value)


def test_unknown_layouts_pickles_and_mismatched_images_are_refused(vgg_file, tmp_path):
    _, path = vgg_file
    torch.save({"features.0.weight": torch.zeros(1), "dense1.0.conv1.weight": torch.zeros(1)}, tmp_path / "densenet.pt")
    with pytest.raises(AytError, match="not an AYT reference classifier: unexpected key 'features.0.weight'"):
        load_feature_net(tmp_path / "densenet.pt")
    torch.save(RefVGG(), tmp_path / "module.pt")  # a pickled module, not a state_dict
    with pytest.raises(AytError, match="Python objects besides tensors.*state_dict") as err:
        load_feature_net(tmp_path / "module.pt")
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AytError, match="untrusted or corrupted .*junk.pt"):
        load_feature_net(tmp_path / "junk.pt")
    with pytest.raises(AytError, match="works at resolution 32 .* 16x16; use data.resolution=32"):
        load_feature_net(path, resolution=16)
    with pytest.raises(AytError, match="takes 3-channel images .* have 1"):
        load_feature_net(path, channels=1)


def test_tangents_take_the_reference_file_whatever_the_runs_features_arch(vgg_file, tmp_path):
    from test_tangents import cli, save_model

    _, path = vgg_file
    ect = save_model(tmp_path / "ect", 1)  # an 8x8 shapes run with the default features.arch (tiny_vgg)
    with pytest.raises(AytError, match="works at resolution 32 but the images here are 8x8"):
        cli(str(ect), "--distances", "mfd:aligned", "--features", str(path))
