"""Unit-gradient form (method.md section 4): value = d(x, y), gradient w.r.t. x = w * g / ||g||."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from ayt.features import TinyVGG
from ayt.losses import build_distance
from ayt.losses.aligned import Aligned
from ayt.losses.mfd import MFD


@pytest.fixture(scope="module")
def lpips_distance(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    """LPIPS(vgg) with random trunk weights from a torchvision-format file the test writes."""
    torch.manual_seed(0)
    sd = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save({k: v for k, v in sd.items() if k.startswith("features.")}, path)
    return build_distance("lpips", net="vgg", weights=str(path))


def _mfd() -> nn.Module:
    torch.manual_seed(0)
    return MFD(TinyVGG(3, target_dim=7, width=4, resolution=16))


DISTANCES = {
    "pseudo_huber": lambda: build_distance("pseudo_huber"),
    "l2": lambda: build_distance("l2"),
    "mfd": _mfd,
    "mfd_squared": lambda: MFD(_mfd().net, form="squared"),
}


def _pair(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 16, 16, generator=g) * 2 - 1, torch.rand(b, 3, 16, 16, generator=g) * 2 - 1


def _check_unit_gradient(distance: nn.Module) -> None:
    """The gradient reaching x through `(w * aligned(x, y)).sum()` is w * g / ||g|| per example."""
    x, y = _pair()
    w = torch.tensor([0.5, 2.0, 7.0])
    x.requires_grad_(True)
    value = Aligned(distance)(x, y)
    (w * value).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    reference = distance(x_ref, y)
    (g,) = torch.autograd.grad(reference.sum(), x_ref)
    expected = w.view(-1, 1, 1, 1) * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    torch.testing.assert_close(value.detach(), reference.detach())  # the value is the distance (for logging)
    torch.testing.assert_close(x.grad, expected)
    torch.testing.assert_close(x.grad.flatten(1).norm(dim=1), w)  # unit norm, times w
    assert all(p.grad is None for p in distance.parameters())


@pytest.mark.parametrize("name", list(DISTANCES))
def test_unit_gradient_pixel_and_mfd(name: str) -> None:
    _check_unit_gradient(DISTANCES[name]())


def test_unit_gradient_lpips(lpips_distance: nn.Module) -> None:
    _check_unit_gradient(lpips_distance)


def test_gradient_flows_through_the_model_that_made_x() -> None:
    """x = model(z): the model's gradient is J^T (w g_unit), i.e. the chain rule through the surrogate."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 3, padding=1)
    z, y = _pair()
    distance = build_distance("pseudo_huber")
    (Aligned(distance)(model(z), y) * 3.0).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    x = model(z)
    (g,) = torch.autograd.grad(distance(x, y).sum(), x, retain_graph=True)
    g_unit = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x.backward(3.0 * g_unit)
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.grad)


def test_target_gets_no_gradient_and_zero_gradient_stays_finite() -> None:
    x, y = _pair()
    x.requires_grad_(True)
    y.requires_grad_(True)
    Aligned(build_distance("squared_l2"))(x, y).sum().backward()
    assert y.grad is None  # the target is held constant
    x2 = y.detach().clone().requires_grad_(True)
    Aligned(build_distance("squared_l2"))(x2, y.detach()).sum().backward()
    assert torch.equal(x2.grad, torch.zeros_like(x2))  # g = 0 at x = y: no update, no NaN


def test_no_grad_returns_the_value() -> None:
    x, y = _pair()
    distance = build_distance("pseudo_huber")
    with torch.no_grad():
        out = Aligned(distance)(x.requires_grad_(True), y)
    assert not out.requires_grad
    torch.testing.assert_close(out, distance(x.detach(), y))
