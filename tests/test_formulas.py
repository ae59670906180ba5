"""Invariant tests that pin the core formulas to method.md, each value recomputed here in float64.

The objectives draw their noise through `rng`; `Scripted` hands them known draws instead, and a
stub network with a closed form replaces the U-Net, so every expected loss is computed by hand.
`benchmarks/mutations.py` mutates each formula in a copy of `src/` and checks a test here (or in
the file it names) fails.

Which tests already protect what (kept, not duplicated here):
- precond scalings, both boundary modes: test_nets.py::test_scalings_match_formulas,
  test_exact_boundary_gives_identity_at_sigma_min, test_forward_is_the_preconditioned_formula;
- aligned (unit-gradient) normalisation: test_aligned.py::test_unit_gradient_pixel_and_mfd;
- MFD reference and squared forms: test_mfd.py::test_reference_form_is_sum_of_channel_pseudo_huber_spatial_norms,
  test_squared_form_is_squared_norm_of_concatenated_features;
- ECT `w = 1/(t - r)` and the r = 0 target: test_objectives.py::test_ect_loss_is_per_example_and_weighted,
  test_ect_target_is_x0_where_r_is_zero;
- continuous `1/t` weight and mean over elements: test_continuous.py::test_gradient_on_the_output_is_the_normalised_ode_velocity_over_t
  (it normalises with the library's own `rms_normalise`, so the `+ 0.1` is pinned below).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ayt.losses import build_distance
from ayt.losses.aligned import Aligned
from ayt.objectives import ContinuousObjective, ECTObjective, EDMObjective
from ayt.objectives.continuous import rms_normalise
from ayt.schedules import ect_r_from_t
from ayt.train import update_ema

SD = 0.5  # sigma_data


class Scripted:
    """A stand-in for `StepRandom` that returns the given draws in order (float64)."""

    def __init__(self, *draws: torch.Tensor):
        self.draws, self.rank = list(draws), 0

    def randn(self, shape, device, dtype=torch.float32) -> torch.Tensor:
        out = self.draws.pop(0)
        assert tuple(out.shape) == tuple(shape)
        return out.clone()

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, x.device)

    def seed(self) -> int:
        return 0


class Affine(nn.Module):
    """A closed-form stand-in for a network: `f(x, t) = s x / (1 + t) + 0.1 t` with one parameter s = 1."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        t = t.view(-1, 1, 1, 1)
        return self.s * x / (1 + t) + 0.1 * t


def affine(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, 1, 1, 1)
    return x / (1 + t) + 0.1 * t


def _data(b: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(b, 2, 3, 3, generator=g, dtype=torch.float64)
    return x0, eps


# ---------------------------------------------------------------- EDM (the diffusion pretraining)

def test_edm_weight_is_lambda_t_times_mean_squared_error():
    """EDM: loss = (t^2 + sd^2)/(t sd)^2 * mean (D(x_0 + t eps, t) - x_0)^2, t = exp(P_mean + P_std n)."""
    x0, eps = _data()
    n = torch.tensor([-2.0, -0.5, 0.3, 1.7], dtype=torch.float64)  # t from ~0.03 to ~2.3
    loss = EDMObjective(p_mean=-1.2, p_std=1.2, sigma_data=SD)(Affine(), x0, rng=Scripted(n, eps))
    t = [math.exp(-1.2 + 1.2 * v) for v in n.tolist()]
    for i, ti in enumerate(t):
        lam = (ti**2 + SD**2) / (ti * SD) ** 2
        d = affine(x0[i : i + 1] + ti * eps[i : i + 1], torch.tensor([ti], dtype=torch.float64))
        assert loss[i].item() == pytest.approx(lam * (d - x0[i]).square().mean().item(), rel=1e-12)


def test_edm_weight_gives_unit_loss_for_the_zero_network():
    """With F = 0 (D = c_skip x), lambda(t) * E||D - x_0||^2 / dim equals 1 for every t when data and
    noise have the EDM variances: the weight EDM chose so the raw target has unit variance."""
    from ayt.nets.precond import Precond

    class Zero(nn.Module):
        img_resolution, in_channels, label_dim = 3, 2, 0

        def forward(self, x, c_noise, labels=None):
            return torch.zeros_like(x)

    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(4, 2, 64, 64, generator=g, dtype=torch.float64) * SD  # std sd
    eps = torch.randn(4, 2, 64, 64, generator=g, dtype=torch.float64)
    n = torch.tensor([-2.5, -1.0, 0.0, 2.0], dtype=torch.float64)
    loss = EDMObjective(sigma_data=SD)(Precond(Zero(), sigma_data=SD), x0, rng=Scripted(n, eps))
    torch.testing.assert_close(loss, torch.ones(4, dtype=torch.float64), rtol=0.05, atol=0)


# ---------------------------------------------------------------- EMA

def test_ema_update_is_decay_times_ema_plus_one_minus_decay_times_net():
    ema, net = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        ema.bias.copy_(torch.tensor([0.0, -1.0, 4.0]))
        net.weight.copy_(torch.tensor([11.0, -8.0, 3.0]))
        net.bias.copy_(torch.tensor([10.0, 9.0, -6.0]))
        net.running_mean.fill_(0.25)
    update_ema(ema, net, decay=0.9)
    torch.testing.assert_close(ema.weight, torch.tensor([2.0, 1.0, 3.0]))  # 0.9 * ema + 0.1 * net
    torch.testing.assert_close(ema.bias, torch.tensor([1.0, 0.0, 3.0]))
    torch.testing.assert_close(ema.running_mean, torch.full((3,), 0.25))  # buffers are copied
    assert net.weight.tolist() == [11.0, -8.0, 3.0]  # the network is untouched


# ---------------------------------------------------------------- ECT (t -> r, w, target)

@pytest.mark.parametrize("stage,q,k,b", [(0, 2.0, 8.0, 1.0), (2, 2.0, 8.0, 1.0), (0, 256.0, 8.0, 1.0), (1, 4.0, 3.0, 0.5)])
def test_r_from_t_matches_the_ect_formula(stage, q, k, b):
    """r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), clamped at 0, at t where every term matters."""
    ts = [0.01, 0.3, 1.0, 2.5, 7.0]
    r = ect_r_from_t(torch.tensor(ts, dtype=torch.float64), stage, q, k, b)
    for ti, ri in zip(ts, r.tolist()):
        expected = ti * (1 - q ** -(stage + 1) * (1 + k / (1 + math.exp(b * ti))))
        assert ri == pytest.approx(max(expected, 0.0), rel=1e-12, abs=1e-15)


def test_ect_loss_is_w_times_distance_to_the_target_at_r():
    """loss = d(f(x_0 + t eps, t), y) / (t - r) with y = f(x_0 + r eps, r), or y = x_0 where r = 0."""
    x0, eps = _data()
    n = torch.tensor([-3.0, -0.5, 0.5, 1.0], dtype=torch.float64)  # q = 4, stage 0: t < 0.51 maps to r = 0
    obj = ECTObjective(build_distance("squared_l2"), p_mean=-1.1, p_std=2.0, q=4.0, k=8.0, b=1.0, stage_steps=None)
    loss = obj(Affine(), x0, rng=Scripted(n, eps))
    zero = 0
    for i, v in enumerate(n.tolist()):
        t = math.exp(-1.1 + 2.0 * v)
        r = max(t * (1 - 0.25 * (1 + 8 / (1 + math.exp(t)))), 0.0)
        f = affine(x0[i : i + 1] + t * eps[i : i + 1], torch.tensor([t], dtype=torch.float64))
        if r > 0:
            y = affine(x0[i : i + 1] + r * eps[i : i + 1], torch.tensor([r], dtype=torch.float64))
        else:
            y, zero = x0[i : i + 1], zero + 1
        assert loss[i].item() == pytest.approx((f - y).square().sum().item() / (t - r), rel=1e-10)
    assert zero == 2  # both branches were checked


def test_aligned_ect_update_has_size_w_and_the_distance_direction():
    """With d = Aligned(d_pixel), the gradient reaching f is w g/||g|| per example, g = grad_f d_pixel."""
    x0, eps = _data()
    n = torch.tensor([-0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    distance = build_distance("pseudo_huber")
    obj = ECTObjective(Aligned(distance), q=256.0, stage_steps=None)
    pair = obj.draw(Affine(), x0, None, 0, Scripted(n, eps))
    f = pair.student.detach().requires_grad_(True)
    pair.student = f
    (grad,) = torch.autograd.grad(obj.loss(pair, 0).sum(), f)
    f_ref = f.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(distance(f_ref, pair.target).sum(), f_ref)
    w = 1 / (pair.t - pair.r)
    expected = w.view(-1, 1, 1, 1) * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)  # Aligned normalises in float32


# ---------------------------------------------------------------- continuous time

def test_rms_normalise_is_g_over_rms_plus_a_tenth():
    g = torch.zeros(3, 2, 2, 2, dtype=torch.float64)
    g[0] = 3.0  # rms 3
    g[1, 0] = 0.2  # rms 0.2 / sqrt(2)
    g[2, :, 0, 0] = torch.tensor([1.0, -1.0])  # rms 0.5
    u = rms_normalise(g)
    for i, rms in enumerate([3.0, 0.2 / math.sqrt(2), 0.5]):
        torch.testing.assert_close(u[i], g[i] / (rms + 0.1), rtol=1e-12, atol=0)


def test_continuous_training_loss_and_gradient_for_a_linear_model():
    """f(x, t) = x / (1 + t) + 0.1 t: the tangent along (eps, 1) is eps / (1+t) - x_t / (1+t)^2 + 0.1;
    the gradient reaching f is u / (t D) with u = g / (rms(g) + 0.1), the loss mean(u^2) / (2 t)."""
    x0, eps = _data()
    n = torch.tensor([-2.0, -0.5, 0.3, 1.0], dtype=torch.float64)
    seen = {}

    class Spy(Affine):
        def forward(self, x, t, labels=None):
            out = super().forward(x, t, labels)
            if torch.is_grad_enabled():  # the student call (the tangent's JVP runs under no_grad)
                out.retain_grad()
                seen["f"] = out
            return out

    loss = ContinuousObjective(p_mean=-1.1, p_std=2.0)(Spy(), x0, rng=Scripted(n, eps))
    loss.sum().backward()
    dim = x0[0].numel()
    for i, v in enumerate(n.tolist()):
        t = math.exp(-1.1 + 2.0 * v)
        x_t = x0[i] + t * eps[i]
        g = eps[i] / (1 + t) - x_t / (1 + t) ** 2 + 0.1
        u = g / (g.square().mean().sqrt() + 0.1)
        assert loss[i].item() == pytest.approx(u.square().mean().item() / (2 * t), rel=1e-10)
        torch.testing.assert_close(seen["f"].grad[i], u / (t * dim), rtol=1e-10, atol=1e-14)
