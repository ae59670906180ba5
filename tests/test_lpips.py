"""LPIPS distance offline: trunk weights from a file or the torchvision cache, never the network."""

from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from ayt.errors import AytError
from ayt.losses import build_distance
from ayt.losses.lpips import LPIPS, cached_trunk_file


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision VGG16 state_dict file (random weights; only the `features.*` trunk entries,
    which is all LPIPS reads, to keep the file at 59 MB instead of 528 MB)."""
    torch.manual_seed(0)
    sd = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "vgg16-397923af.pth"
    torch.save({k: v for k, v in sd.items() if k.startswith("features.")}, path)
    return path


@pytest.fixture(scope="module")
def lpips_vgg(vgg_file: Path) -> LPIPS:
    """One LPIPS(vgg) built from the file, shared by the tests that only call it."""
    return LPIPS("vgg", weights=vgg_file)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """An empty TORCH_HOME and a download function that fails at once; returns the URLs tried."""
    tried: list[str] = []

    def no_network(url: str, *args, **kwargs) -> None:
        tried.append(url)
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tried


def _pair(b: int = 2, c: int = 3, res: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, res, res, generator=g) * 2 - 1, torch.rand(b, c, res, res, generator=g) * 2 - 1


def test_builds_from_a_weights_file(vgg_file: Path, lpips_vgg: LPIPS) -> None:
    d = lpips_vgg
    saved = torch.load(vgg_file, weights_only=True)
    assert torch.equal(d.model.net.slice1[0].weight, saved["features.0.weight"])
    assert torch.equal(getattr(d.model.net.slice5, "28").bias, saved["features.28.bias"])
    x, y = _pair()
    assert d(x, y).shape == (2,)
    assert torch.all(d(x, x).abs() < 1e-6)
    assert torch.all(d(x, y) > 1e-4)


def test_gradient_reaches_x_and_no_parameter(lpips_vgg: LPIPS) -> None:
    d = lpips_vgg
    d.train()  # a parent switching to train mode must not unfreeze it (dropout in the linear layers)
    assert not any(m.training for m in d.model.modules())
    assert not any(p.requires_grad for p in d.parameters())
    x, y = _pair()
    x.requires_grad_(True)
    d(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())


def test_gray_images_are_repeated_to_rgb(lpips_vgg: LPIPS) -> None:
    d = lpips_vgg
    x, y = _pair(c=1)
    torch.testing.assert_close(d(x, y), d(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))


def test_small_images_need_upsampling(lpips_vgg: LPIPS) -> None:
    x, y = _pair(res=8)
    with pytest.raises(AytError, match="lpips_upsample=true"):
        lpips_vgg(x, y)
    lpips_vgg.upsample = True
    try:
        assert lpips_vgg._prepare(x).shape == (2, 3, 224, 224)
    finally:
        lpips_vgg.upsample = False


def test_no_weights_no_cache_offline_raises_guidance(offline: list[str]) -> None:
    with pytest.raises(AytError) as err:
        LPIPS("vgg")
    message = str(err.value)
    assert "torchvision vgg16 weights" in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert "distance.lpips_weights=PATH" in message
    assert offline == ["https://download.pytorch.org/models/vgg16-397923af.pth"]  # one try, failed at once


def test_uses_the_torchvision_cache(vgg_file: Path, lpips_vgg: LPIPS, offline: list[str]) -> None:
    cached = cached_trunk_file("vgg")
    cached.parent.mkdir(parents=True)
    shutil.copy(vgg_file, cached)
    d = build_distance("lpips", net="vgg")
    assert offline == []
    x, y = _pair()
    torch.testing.assert_close(d(x, y), lpips_vgg(x, y))


def test_bad_weights_files_raise(tmp_path: Path) -> None:
    with pytest.raises(AytError, match="does not exist"):
        LPIPS("vgg", weights=tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(AytError, match="has no entry|does not fit"):
        LPIPS("vgg", weights=wrong)
    with pytest.raises(AytError, match="vgg, alex"):
        LPIPS("squeeze")
