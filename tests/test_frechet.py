"""Frechet distance, feature statistics, KID and precision / recall on small feature sets."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ayt.errors import AytError
from ayt.metrics.frechet import FeatureStats, feature_stats, frechet_distance, kid, precision_recall


def random_gaussian(d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A mean [d] and a well-conditioned covariance [d, d]."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.5 * np.eye(d)


def closed_form(mu1, s1, mu2, s2) -> float:
    """FD through the symmetric form Tr((S1^1/2 S2 S1^1/2)^1/2), eigen-decompositions only."""
    w, v = scipy.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = scipy.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner)))


def test_fd_of_a_set_with_itself_is_zero():
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    s = feature_stats(features)
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-6


def test_fd_matches_closed_form_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    (mu1, s1), (mu2, s2) = random_gaussian(12, 1), random_gaussian(12, 2)
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert fd == pytest.approx(closed_form(mu1, s1, mu2, s2), rel=1e-6)
    library = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert fd == pytest.approx(library["frechet_inception_distance"], rel=1e-6)


def test_fd_of_diagonal_gaussians():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 2.0])
    expected = 1 + 4 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # |dmu|^2 + sum (sqrt a - sqrt b)^2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_few_samples_warn_with_minimum_and_fd_stays_finite():
    g = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match="at least 21 samples"):
        a = feature_stats(torch.randn(10, 20, generator=g))
    with pytest.warns(UserWarning, match="at least 21 samples"):
        b = feature_stats(torch.randn(11, 20, generator=g) + 1)
    fd = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)  # rank-9 covariances: needs the eps offset
    assert np.isfinite(fd) and fd > 0


def test_non_finite_statistics_give_nan_not_an_error():
    features = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    features[0, 0] = float("nan")  # a diverged sample
    s, ok = feature_stats(features), feature_stats(features[1:])
    with pytest.warns(UserWarning, match="returning nan"):
        assert np.isnan(frechet_distance(s.mu, s.sigma, ok.mu, ok.sigma))


def test_stats_save_load_round_trip_and_validation(tmp_path):
    features = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    stats = feature_stats(features, kind="test/4", keep=20, generator=torch.Generator().manual_seed(1))
    path = stats.save(tmp_path / "s.npz")
    back = FeatureStats.load(path, kind="test/4")
    assert back.n == 50 and back.kind == "test/4" and back.features.shape == (20, 4)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    with pytest.raises(AytError, match="'test/4' features but 'other/4'"):
        FeatureStats.load(path, kind="other/4")
    with pytest.raises(AytError, match="does not exist"):
        FeatureStats.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "pytorch_fid.npz", mu=np.zeros(3), sigma=np.eye(3))  # other tools' files: no n, no kind
    other = FeatureStats.load(tmp_path / "pytorch_fid.npz", kind="inception-v3-compat/2048")
    assert other.n == 0 and other.features is None
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(AytError, match="no 'mu' and 'sigma'"):
        FeatureStats.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(2))
    with pytest.raises(AytError, match=r"mu \[D\] and sigma \[D, D\]"):
        FeatureStats.load(tmp_path / "shape.npz")


def test_kid_of_identical_sets_is_near_zero_and_of_shifted_sets_positive():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g)
    same, _ = kid(a, a, subsets=50, subset_size=200)  # different random subsets: unbiased, not exactly 0
    shifted, _ = kid(a, a + 1.0, subsets=50, subset_size=200)
    assert shifted > 0.5 and abs(same) < 0.02 * shifted


def test_kid_equals_unbiased_polynomial_mmd():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=g).double(), torch.randn(30, 5, generator=g).double() + 0.3
    kernel = lambda p, q: (p @ q.T / 5 + 1) ** 3  # Binkowski et al.'s cubic kernel
    m = len(x)
    off = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))
    expected = off(kernel(x, x)) + off(kernel(y, y)) - 2 * kernel(x, y).mean()
    mean, std = kid(x, y, subsets=1, subset_size=m)  # a subset of all rows: order does not matter
    assert mean == pytest.approx(float(expected), rel=1e-4) and std == 0


def test_kid_rejects_too_large_subsets():
    with pytest.raises(AytError, match="subset_size=50 must be in 2..10"):
        kid(torch.randn(10, 3), torch.randn(20, 3), subset_size=50)


def test_precision_recall_identical_is_one_and_disjoint_is_zero():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(100, 6, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_recall_of_a_collapsed_generator():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 2, generator=g)
    fake = 0.05 * torch.randn(200, 2, generator=g)  # every sample near the mode: precise, not diverse
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.9 and recall < 0.2
