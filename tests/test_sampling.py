"""Samplers: the 1-step / multistep formulas and EDM Heun on an analytic denoiser."""

import math

import pytest
import torch
from torch import nn

from ayt.errors import AytError
from ayt.sampling import DEFAULT_T_MID, consistency_sample, edm_heun_sample, parse_sigmas
from ayt.schedules import karras_sigmas


class Recorder(nn.Module):
    """A fake consistency function that records its inputs and returns x / (1 + t)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, labels=None):
        self.calls.append((x.clone(), t.clone()))
        return x / (1 + t.view(-1, 1, 1, 1))


def test_one_step_is_f_of_sigma_max_times_z():
    f, z = Recorder(), torch.randn(3, 1, 4, 4)
    out = consistency_sample(f, z, [80.0])
    assert len(f.calls) == 1
    assert torch.allclose(f.calls[0][0], 80 * z) and torch.all(f.calls[0][1] == 80)
    assert torch.allclose(out, 80 * z / 81)


def test_two_step_adds_noise_back_to_t_mid():
    f, z = Recorder(), torch.randn(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = consistency_sample(f, z, [80.0, DEFAULT_T_MID], generator=g)
    x1 = 80 * z / 81
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    x_mid = x1 + math.sqrt(DEFAULT_T_MID**2 - 0.002**2) * noise
    assert len(f.calls) == 2
    assert torch.allclose(f.calls[1][0], x_mid) and torch.all(f.calls[1][1] == DEFAULT_T_MID)
    assert torch.allclose(out, x_mid / (1 + DEFAULT_T_MID))


def test_edm_heun_recovers_a_point_mass():
    """For data = {c}, the ideal denoiser is D(x, t) = c and Heun must land on c."""
    c = torch.full((1, 1, 2, 2), 0.3)

    class PointMass(nn.Module):
        def forward(self, x, t, labels=None):
            return c.expand_as(x)

    out = edm_heun_sample(PointMass(), torch.randn(4, 1, 2, 2), karras_sigmas(10))
    assert torch.allclose(out, c.expand(4, 1, 2, 2), atol=1e-5)


def test_edm_heun_on_gaussian_data_keeps_the_variance():
    """Data ~ N(0, s^2): D(x, t) = x s^2 / (s^2 + t^2); the ODE maps N(0, 80^2) to N(0, s^2)."""
    s = 0.5

    class Gaussian(nn.Module):
        def forward(self, x, t, labels=None):
            return x * s**2 / (s**2 + t.view(-1, 1, 1, 1) ** 2)

    out = edm_heun_sample(Gaussian(), torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0)), karras_sigmas(32))
    assert out.std().item() == pytest.approx(s, rel=0.05)


def test_parse_sigmas_and_bad_schedules():
    assert parse_sigmas("1") == [80.0]
    assert parse_sigmas("2") == [80.0, DEFAULT_T_MID]
    assert parse_sigmas("80,1.5,0.4") == [80.0, 1.5, 0.4]
    with pytest.raises(AytError, match="bad sampling schedule"):
        parse_sigmas("80,abc")
    with pytest.raises(AytError, match="decrease"):
        consistency_sample(Recorder(), torch.randn(1, 1, 2, 2), [1.0, 2.0])
    with pytest.raises(AytError, match="sigma_min"):
        consistency_sample(Recorder(), torch.randn(1, 1, 2, 2), [80.0, 0.001])
