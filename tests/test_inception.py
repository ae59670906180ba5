"""Inception features through torch-fidelity: weights file format, input conversion, offline errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from ayt.errors import AytError
from ayt.metrics import inception
from ayt.metrics.inception import InceptionFeatures, to_uint8_rgb



def test_features_are_2048_d_for_small_images(weights_file):
    extractor = InceptionFeatures(weights_file, batch=2)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features = extractor(images)
    assert features.shape == (3, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and features.std() > 0


def test_uint8_conversion_and_gray_repeat():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    out = to_uint8_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 2, 2)
    assert out[0, :, 0, 0].tolist() == [0, 0, 0] and out[0, 0, 1, 0] == 255 and out[0, 0, 1, 1] == 255  # clamped
    assert out[0, 0, 0, 1] == 128  # 127.5 rounds half to even
    with pytest.raises(AytError, match="1 or 3"):
        to_uint8_rgb(torch.zeros(1, 2, 4, 4))


def test_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert inception.WEIGHTS_URL == URL_INCEPTION_V3


def test_missing_weights_offline_raise_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(AytError, match="--inception-weights PATH .*eval.inception_weights"):
        InceptionFeatures(download=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(AytError, match="download failed.*weights-inception-2015-12-05-6726825d.pth"):
        InceptionFeatures()
    with pytest.raises(AytError, match="does not exist"):
        InceptionFeatures(tmp_path / "nope.pth")


def test_bad_weights_files_raise(tmp_path):
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(AytError, match="do not fit the network"):
        InceptionFeatures(tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(AytError, match="untrusted or corrupted Inception weights file"):
        InceptionFeatures(tmp_path / "junk.pth")
