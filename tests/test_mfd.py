"""Manifold feature distance d_phi (method.md section 4): both forms, layer choice, freezing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ayt.checkpoint import save_checkpoint
from ayt.errors import AytError
from ayt.features import TinyVGG
from ayt.losses import build_distance
from ayt.losses.mfd import MFD


def _net(channels: int = 3, seed: int = 0) -> TinyVGG:
    torch.manual_seed(seed)
    net = TinyVGG(channels, target_dim=7, width=4, resolution=16)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval and train mode differ
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def _pair(b: int = 3, c: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, 16, 16, generator=g) * 2 - 1, torch.rand(b, c, 16, 16, generator=g) * 2 - 1


def test_reference_form_is_sum_of_channel_pseudo_huber_spatial_norms() -> None:
    net, (x, y) = _net(), _pair()
    d = MFD(net)(x, y)
    eps = 1e-5
    expected = torch.zeros(3)
    for fx, fy in zip(net.features(x), net.features(y)):  # net is frozen (eval) by MFD
        diff = (fx - fy).reshape(3, fx.shape[1], -1)
        expected += ((diff.square().sum(2) + eps**2).sqrt() - eps).sum(1)
    assert d.shape == (3,)
    torch.testing.assert_close(d, expected)


def test_squared_form_is_squared_norm_of_concatenated_features() -> None:
    net, (x, y) = _net(), _pair()
    d = MFD(net, form="squared")(x, y)
    fx = torch.cat([f.flatten(1) for f in net.features(x)], 1)
    fy = torch.cat([f.flatten(1) for f in net.features(y)], 1)
    torch.testing.assert_close(d, (fx - fy).square().sum(1))


@pytest.mark.parametrize("form", ["reference", "squared"])
def test_zero_on_equal_inputs_positive_otherwise(form: str) -> None:
    mfd, (x, y) = MFD(_net(), form=form), _pair()
    assert torch.all(mfd(x, x) == 0)
    assert torch.all(mfd(x, y) > 0)


def test_layers_negative_indices_and_weights() -> None:
    net, (x, y) = _net(), _pair()
    head = MFD(net, layers=[-1])(x, y)
    diff = net(x) - net(y)  # head [B, 7]: 7 channels of one position each
    torch.testing.assert_close(head, ((diff.square() + 1e-10).sqrt() - 1e-5).sum(1))
    both = MFD(net, layers=[0, -1], weights=[2.0, 0.5])(x, y)
    torch.testing.assert_close(both, 2.0 * MFD(net, layers=[0])(x, y) + 0.5 * head)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"layers": [5]}, "indices -5..4"),
        ({"layers": [0, -5]}, "twice"),
        ({"layers": [0, 1], "weights": [1.0]}, "one weight per layer"),
        ({"form": "cubed"}, "reference, squared"),
    ],
)
def test_bad_options_raise(kwargs: dict, words: str) -> None:
    with pytest.raises(AytError, match=words):
        MFD(_net(), **kwargs)


def test_no_feature_network_raises_with_fix() -> None:
    with pytest.raises(AytError, match="distance.features=.*ayt train-features"):
        build_distance("mfd")
    with pytest.raises(AytError, match="not both"):
        MFD(_net(), features="somewhere")


def test_frozen_eval_mode_no_parameter_grads_and_gradient_reaches_x() -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    mfd = MFD(net)
    parent = nn.Sequential(mfd).train()  # a parent switching to train mode must not unfreeze phi
    assert not net.training and all(not m.training for m in net.modules())
    assert not any(p.requires_grad for p in mfd.parameters())
    x, y = _pair()
    x.requires_grad_(True)
    parent[0](x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():  # BatchNorm running statistics untouched
        assert torch.equal(v, before[k]), k


def test_target_without_grad_builds_no_graph_but_a_target_with_grad_gets_one() -> None:
    mfd, (x, y) = MFD(_net()), _pair()
    assert not mfd(x, y).requires_grad
    y.requires_grad_(True)
    mfd(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_wrong_channels_raise() -> None:
    mfd = MFD(_net(channels=1))
    x, y = _pair(c=3)
    with pytest.raises(AytError, match="1 channels"):
        mfd(x, y)


def test_builds_from_a_feature_checkpoint(tmp_path) -> None:
    net = _net()
    state = {"kind": "features", "arch": "tiny_vgg", "in_channels": 3, "target_dim": 7, "resolution": 16,
             "subset": "geo", "width": 4}
    save_checkpoint(tmp_path / "feat", 1, {"features": net.state_dict()}, state)
    x, y = _pair()
    mfd = build_distance("mfd", features=str(tmp_path / "feat"), resolution=16, channels=3)
    torch.testing.assert_close(mfd(x, y), MFD(net)(x, y))
    with pytest.raises(AytError, match="resolution 16 .* 32x32.*ayt train-features"):
        build_distance("mfd", features=str(tmp_path / "feat"), resolution=32, channels=3)


def test_aligned_direction_under_bf16_autocast_matches_fp32_for_nearby_images() -> None:
    """The features run in fp32 under autocast: for images 1e-3 apart (small t, small ECT gaps) a bf16
    feature difference is rounding noise (median cosine 0.24 to fp32 at t = 5e-4 before the fix)."""
    from ayt.losses.aligned import Aligned

    torch.manual_seed(0)
    aligned = Aligned(MFD(net=_net()))
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    y = x + 1e-3 * torch.randn_like(x)
    _, fp32 = aligned.unit_gradient(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16 = aligned.unit_gradient(x, y)  # fp32 images (MeanFlow's implied images are) under autocast
    cosine = torch.nn.functional.cosine_similarity(fp32.flatten(1), bf16.float().flatten(1), dim=1)
    assert cosine.min() > 0.98, cosine
