"""Shapes manifold metrics: the fit recovers parameters, degradations score monotonically worse,
and the distribution metrics (param_fd, sliced Wasserstein, coverage) behave as defined."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchvision.transforms.v2.functional import gaussian_blur

from ayt.data.shapes import NUM_PARAMS, render, sample_params
from ayt.errors import AytError
from ayt.metrics.manifold import (
    coverage,
    fit_shapes,
    manifold_metrics,
    normalise,
    param_fd,
    sliced_wasserstein,
)



def normalised_errors(fitted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """|fitted - truth| in normalised units `[B, P]`, the angle measured on its circle of period pi."""
    d = (normalise(fitted) - normalise(truth)).abs()
    d[:, 4] = torch.minimum(d[:, 4], 1 - d[:, 4])
    return d


def test_fit_recovers_parameters_of_rendered_images():
    truth = sample_params(64, torch.Generator().manual_seed(1))
    fit = fit_shapes(render(truth, 16), generator=torch.Generator().manual_seed(0))
    # Measured: median 4e-5, largest 1e-3 (an aspect close to its lower bound).
    assert normalised_errors(fit.params, truth).median() < 0.02
    assert fit.rms.mean() < 0.01 and fit.rendered.shape == (64, 3, 16, 16)


@pytest.mark.parametrize("kind, levels", [("noise", [0.05, 0.1, 0.2, 0.4]), ("blur", [0.5, 1.0, 1.5, 2.5])])
def test_degradations_score_monotonically_worse(kind, levels):
    g = torch.Generator().manual_seed(2)
    images = render(sample_params(16, g), 16)
    noise = torch.randn(images.shape, generator=g)
    scores = []
    for level in levels:
        if kind == "noise":
            degraded = images + level * noise
        else:
            degraded = gaussian_blur(images, [2 * math.ceil(3 * level) + 1] * 2, [level, level])
        fit = fit_shapes(degraded, starts=4, steps=(30, 60), generator=torch.Generator().manual_seed(0))
        scores.append(float(fit.rms.mean()))
    assert scores[0] > 0.01 and all(a < b for a, b in itertools.pairwise(scores)), scores


def test_param_fd_is_the_squared_shift_between_equal_covariances():
    ref = sample_params(500, torch.Generator().manual_seed(3))
    shift = torch.zeros(NUM_PARAMS)
    shift[0] = 0.1 * (0.35 - -0.35)  # 0.1 in normalised units of x
    assert abs(param_fd(ref, ref)) < 1e-6
    assert param_fd(ref + shift, ref) == pytest.approx(0.01, rel=1e-5)


def test_sliced_wasserstein_of_a_shift():
    g = torch.Generator().manual_seed(4)
    a = torch.rand(400, NUM_PARAMS, generator=g)
    shift = torch.zeros(NUM_PARAMS)
    shift[2] = 0.2
    assert sliced_wasserstein(a, a, generator=g) < 1e-9
    # W_2 along theta of a shift s is |<s, theta>|; mean over unit theta of <s, theta>^2 = |s|^2 / P.
    expected = 0.2 / math.sqrt(NUM_PARAMS)
    assert sliced_wasserstein(a + shift, a, directions=2000, generator=g) == pytest.approx(expected, rel=0.1)


def test_coverage_of_same_distribution_and_of_a_collapsed_one():
    g = torch.Generator().manual_seed(5)
    ref, fake = torch.rand(300, NUM_PARAMS, generator=g), torch.rand(300, NUM_PARAMS, generator=g)
    collapsed = 0.5 + 0.01 * torch.randn(300, NUM_PARAMS, generator=g)
    assert coverage(ref, fake) > 0.8  # expected about 1 - 2^-5 for equal distributions, k = 5
    assert coverage(ref, collapsed) < 0.1
    assert coverage(ref, ref) == 1.0


def test_manifold_metrics_keys_and_values_on_data():
    g = torch.Generator().manual_seed(6)
    truth = sample_params(128, g)
    metrics = manifold_metrics(render(truth, 8), sample_params(2000, g), generator=g)
    # Measured: manifold_rms 6e-4, param_fd 0.015, param_swd 0.039, coverage 0.98.
    assert list(metrics) == ["manifold_rms", "param_fd", "param_swd", "coverage"]
    assert metrics["manifold_rms"] < 0.01 and metrics["param_fd"] < 0.05 and metrics["coverage"] > 0.8
    one = render(truth[:1].expand(128, -1), 8)  # a collapsed generator: on the manifold, no diversity
    collapsed = manifold_metrics(one, sample_params(2000, g), starts=2, steps=(20, 40), generator=g)
    assert collapsed["manifold_rms"] < 0.01 and collapsed["coverage"] < 0.2
    assert collapsed["param_fd"] > 10 * metrics["param_fd"] and collapsed["param_swd"] > 3 * metrics["param_swd"]


def test_non_finite_pixels_score_badly_instead_of_failing():
    images = render(sample_params(4, torch.Generator().manual_seed(7)), 8)
    images[0] = float("nan")
    fit = fit_shapes(images, starts=2, steps=(10, 10))
    assert torch.isfinite(fit.rms).all() and fit.rms[0] > 5 * fit.rms[1:].max()


def test_fit_rejects_non_shapes_images():
    with pytest.raises(AytError, match=r"\[B, 3, H, H\]"):
        fit_shapes(torch.zeros(2, 1, 8, 8))
