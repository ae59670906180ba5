"""FD-digits: the cached classifier is accurate, and held-out digits score far better than noise or blur."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2.functional import gaussian_blur

from ayt.data import build_dataset
from ayt.errors import AytError
from ayt.metrics import classifier
from ayt.metrics.classifier import DigitsFeatures, digits_metrics, fd_digits



@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """The resolution-8 classifier, trained once into a temporary cache."""
    cache = tmp_path_factory.mktemp("cache")
    extractor = DigitsFeatures(8, cache_dir=cache)
    return extractor, cache


def test_classifier_is_accurate_and_cached(features, monkeypatch):
    extractor, cache = features
    assert extractor.test_accuracy > 0.95  # measured 0.980 at 8x8 and at 32x32
    path = cache / "digits-classifier-8.safetensors"
    assert path.is_file()
    monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: pytest.fail("retrained despite the cache"))
    again = DigitsFeatures(8, cache_dir=cache)  # loaded, not retrained
    assert again.test_accuracy == extractor.test_accuracy
    x = build_dataset("digits", split="test").images[:5]
    torch.testing.assert_close(again(x), extractor(x))


def test_held_out_digits_score_far_better_than_noise_and_blur(features):
    extractor, _ = features
    test = build_dataset("digits", split="test").images  # 297 images
    noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    blurred = gaussian_blur(test, [7, 7], [1.5, 1.5])
    scores = {name: fd_digits(x, features=extractor) for name, x in [("test", test), ("noise", noise), ("blur", blurred)]}
    # Measured: test 0.34, noise 95, blur (1.5 px) 347.
    assert scores["noise"] > 5 * scores["test"] and scores["blur"] > 5 * scores["test"], scores
    metrics = digits_metrics(test, features=extractor)
    assert list(metrics) == ["fd_digits", "kid_digits"] and metrics["fd_digits"] == pytest.approx(scores["test"])


def test_cache_location_and_bad_cache_files(tmp_path, monkeypatch):
    monkeypatch.setenv("AYT_CACHE", str(tmp_path / "env"))
    assert classifier.cache_dir() == tmp_path / "env"
    assert classifier.cache_dir(tmp_path / "arg") == tmp_path / "arg"
    junk = tmp_path / "digits-classifier-8.safetensors"
    junk.write_bytes(b"garbage")
    assert classifier._load(junk, 8) is None  # unreadable caches are retrained, not trusted


def test_wrong_image_shape_raises(features):
    extractor, _ = features
    with pytest.raises(AytError, match=r"\[B, 1, 8, 8\]"):
        extractor(torch.zeros(2, 3, 8, 8))
    with pytest.raises(AytError, match="multiple of 8"):
        classifier.DigitsCNN(12)
