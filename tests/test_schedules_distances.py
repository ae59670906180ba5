"""Schedules (t -> r mapping) and pixel distances: mathematical invariants."""

import math

import pytest
import torch

from ayt.errors import AytError
from ayt.losses import build_distance
from ayt.schedules import ect_gap, ect_r_from_t, karras_sigmas, lognormal_bucket_edges, lognormal_t


def test_r_is_below_t_and_non_negative():
    t = lognormal_t(torch.randn(10_000, generator=torch.Generator().manual_seed(0)))
    for stage, q in [(s, 2.0) for s in range(12)] + [(0, 256.0), (1, 256.0)]:
        r = ect_r_from_t(t, stage, q)
        assert (r >= 0).all() and (r < t).all()


def test_gap_shrinks_with_stage():
    t = torch.logspace(-3, 2, 50)
    gaps = [(t - ect_r_from_t(t, s, q=2.0)).mean().item() for s in range(6)]
    assert all(a > b for a, b in zip(gaps, gaps[1:]))
    # at large t the sigmoid term vanishes: t - r -> t * d(stage) = t / 2^(stage+1)
    big = torch.tensor([200.0])
    assert ect_r_from_t(big, 3, 2.0).item() == pytest.approx(200.0 * (1 - 1 / 16), rel=1e-6)


def test_fixed_q256_gap_matches_method():
    t = torch.tensor([1e-3, 50.0])
    gap = (t - ect_r_from_t(t, 0, q=256.0)) / t
    # method.md: the gap lies between t/256 and 5t/256 (sigmoid(-bt) <= 1/2)
    assert gap[0].item() == pytest.approx(5 / 256, rel=1e-3)
    assert gap[1].item() == pytest.approx(1 / 256, rel=1e-3)
    assert ect_gap(0, 256.0) == 1 / 256


def test_karras_sigmas_endpoints_and_order():
    s = karras_sigmas(18)
    assert s[0] == pytest.approx(80.0) and s[-1] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(s, s[1:]))


def test_lognormal_bucket_edges_split_mass_evenly():
    edges = lognormal_bucket_edges(4)
    t = lognormal_t(torch.randn(100_000, generator=torch.Generator().manual_seed(1)))
    counts = torch.bucketize(t, torch.tensor(edges)).bincount(minlength=4).float() / len(t)
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.01)


@pytest.mark.parametrize("name", ["l2", "pseudo_huber", "squared_l2", "l1"])
def test_distances_zero_on_equal_inputs_and_shape(name):
    d = build_distance(name)
    x = torch.randn(5, 3, 8, 8)
    out = d(x, x.clone())
    assert out.shape == (5,)
    assert torch.allclose(out, torch.zeros(5), atol=1e-6)
    y = x + 0.1 * torch.randn_like(x)
    assert (d(x, y) > 0).all()


def test_distance_values_match_formulas():
    x, y = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    diff = (x - y).flatten(1)
    assert torch.allclose(build_distance("l2")(x, y), diff.norm(dim=1), rtol=1e-5)
    assert torch.allclose(build_distance("squared_l2")(x, y), diff.square().sum(1), rtol=1e-5)
    assert torch.allclose(build_distance("l1")(x, y), diff.abs().sum(1), rtol=1e-5)
    c = 0.00054 * math.sqrt(3 * 8 * 8)
    expected = (diff.square().sum(1) + c * c).sqrt() - c
    assert torch.allclose(build_distance("pseudo_huber")(x, y), expected, rtol=1e-5)


def test_pseudo_huber_tends_to_l2_as_c_goes_to_zero():
    x, y = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    l2 = build_distance("l2")(x, y)
    errors = [(build_distance("pseudo_huber", c=c)(x, y) - l2).abs().max().item() for c in (1.0, 0.1, 0.01, 0.0)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-5


def test_l2_gradient_is_finite_at_zero():
    x = torch.zeros(2, 1, 4, 4, requires_grad=True)
    build_distance("l2")(x, torch.zeros_like(x)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_unknown_distance_and_bad_options_raise():
    with pytest.raises(AytError, match="unknown distance 'l3'.*pseudo_huber"):
        build_distance("l3")
    with pytest.raises(AytError, match="bad options"):
        build_distance("l2", c=1.0)
    with pytest.raises(AytError, match="differ in shape"):
        build_distance("l2")(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))
