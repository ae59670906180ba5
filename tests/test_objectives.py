"""ECT and EDM objectives: per-example shapes, the r = 0 target, the shared dropout mask, overfitting."""

import pytest
import torch
from torch import nn

from ayt.data.shapes import render, sample_params
from ayt.losses import build_distance
from ayt.nets import build_network
from ayt.nets.dropout import SeededDropout
from ayt.objectives import ConsistencyPair, ECTObjective, EDMObjective
from ayt.rng import StepRandom


def tiny_net(res: int = 8, dropout: float = 0.0, channels: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return build_network(
        "tiny", img_resolution=res, in_channels=3, dropout=dropout,
        overrides={"model_channels": channels, "num_blocks": 1, "attn_resolutions": ()},
    )


def shapes(n: int, res: int = 8, seed: int = 0) -> torch.Tensor:
    return render(sample_params(n, torch.Generator().manual_seed(seed)), res)


def test_ect_loss_is_per_example_and_weighted():
    net, x0 = tiny_net(), shapes(6)
    obj = ECTObjective(build_distance("l2"), stage_steps=None, q=256.0)
    rng = StepRandom(torch.Generator().manual_seed(3))
    pair = obj.draw(net, x0, None, 0, rng)
    assert pair.student.shape == x0.shape and pair.target.shape == x0.shape
    assert (pair.r < pair.t).all() and (pair.r >= 0).all()
    assert torch.allclose(pair.weight, 1 / (pair.t - pair.r))
    loss = obj(net, x0, None, 0, StepRandom(torch.Generator().manual_seed(3)))
    assert loss.shape == (6,)
    expected = pair.weight * build_distance("l2")(pair.student, pair.target)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert not pair.target.requires_grad and pair.student.requires_grad


def test_ect_target_is_x0_where_r_is_zero():
    net, x0 = tiny_net(), shapes(64)
    obj = ECTObjective(build_distance("l2"), stage_steps=1, q=2.0)  # stage 0, q = 2: small t map to r = 0
    pair = obj.draw(net, x0, None, 0, StepRandom(torch.Generator().manual_seed(0)))
    zero = pair.r == 0
    assert zero.any() and (~zero).any()
    assert torch.equal(pair.target[zero], x0[zero])
    assert not torch.allclose(pair.target[~zero], x0[~zero])


class MaskSpy(nn.Module):
    """Records the dropout masks each SeededDropout layer applies."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.masks: list[torch.Tensor] = []
        for m in net.modules():
            if isinstance(m, SeededDropout):
                m.register_forward_hook(lambda mod, inp, out: self.masks.append((out == 0) & (inp[0] != 0)))


def test_student_and_target_share_the_dropout_mask():
    net = tiny_net(dropout=0.5).train()
    spy = MaskSpy(net)
    obj = ECTObjective(build_distance("l2"), stage_steps=None, q=256.0)
    x0 = shapes(4)
    obj.draw(net, x0, None, 0, StepRandom(torch.Generator().manual_seed(1)))
    n = len(spy.masks) // 2
    assert n > 0 and len(spy.masks) == 2 * n
    for student, target in zip(spy.masks[:n], spy.masks[n:]):
        assert student.any()
        # positions dropped in the student are dropped in the target (where the input was non-zero)
        assert torch.equal(student, target)
    # another draw uses another mask
    first = [m.clone() for m in spy.masks[:n]]
    spy.masks.clear()
    obj.draw(net, x0, None, 0, StepRandom(torch.Generator().manual_seed(2)))
    assert any(not torch.equal(a, b) for a, b in zip(first, spy.masks[:n]))


def test_same_step_random_gives_same_loss():
    net, x0 = tiny_net(dropout=0.2).train(), shapes(4)
    obj = ECTObjective(build_distance("pseudo_huber"), stage_steps=None, q=256.0)
    a = obj(net, x0, None, 0, StepRandom.for_step(0, 5, 0, torch.device("cpu")))
    torch.manual_seed(123)  # the global RNG does not matter
    b = obj(net, x0, None, 0, StepRandom.for_step(0, 5, 0, torch.device("cpu")))
    assert torch.equal(a, b)


def test_step_random_slices_the_global_batch():
    full = StepRandom.for_step(1, 2, 0, torch.device("cpu")).randn((8, 3), "cpu")
    halves = [StepRandom.for_step(1, 2, 0, torch.device("cpu"), rank=r, world=2).randn((4, 3), "cpu") for r in range(2)]
    assert torch.equal(torch.cat(halves), full)


def test_edm_loss_shape_and_weighting():
    """Per example: lambda(t) * mean (D(x_0 + t eps, t) - x_0)^2 with lambda(t) = (t^2 + sd^2) / (t sd)^2."""
    net, x0 = tiny_net().eval(), shapes(5)
    loss = EDMObjective()(net, x0, None, 0, StepRandom(torch.Generator().manual_seed(0)))
    assert loss.shape == (5,) and torch.isfinite(loss).all()
    g = torch.Generator().manual_seed(0)  # replay the objective's draws: n [B], then eps
    t = (torch.randn(5, generator=g) * 1.2 - 1.2).exp()
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        mse = (net(x0 + t.view(-1, 1, 1, 1) * eps, t) - x0).square().flatten(1).mean(1)
    weight = (t.double() ** 2 + 0.25) / (t.double() * 0.5) ** 2
    torch.testing.assert_close(loss.detach().double(), weight * mse.double(), rtol=1e-5, atol=0)


def fixed_edm_loss(net: nn.Module, x0: torch.Tensor) -> float:
    """EDM loss at fixed noise levels and noise, to compare before/after training."""
    g = torch.Generator().manual_seed(99)
    sigmas = torch.tensor([0.05, 0.2, 0.5, 1.0, 2.0, 5.0]).repeat_interleave(len(x0) // 6 + 1)[: len(x0)]
    eps = torch.randn(x0.shape, generator=g)
    w = (sigmas**2 + 0.25) / (sigmas * 0.5) ** 2
    with torch.no_grad():
        d = net.eval()(x0 + sigmas.view(-1, 1, 1, 1) * eps, sigmas)
    net.train()
    return (w * (d - x0).square().flatten(1).mean(1)).mean().item()


@pytest.mark.slow  # 68 s on 2 shared cores (2026-11-30): over the ~20 s default-run limit
def test_tiny_model_overfits_64_shapes_with_edm():
    """The tiny U-Net memorises 64 images: the fixed-noise EDM loss falls at least 4x in 300 steps."""
    net, x0 = tiny_net(channels=32), shapes(64)
    before = fixed_edm_loss(net, x0)
    obj, opt = EDMObjective(), torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(300):
        loss = obj(net, x0, None, step, StepRandom.for_step(0, step, 0, torch.device("cpu"))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_edm_loss(net, x0)
    assert after < before / 4, (before, after)  # measured: about 1.9 -> 0.2 (2026-11-28)


def _output_gradient(objective, step: int) -> tuple[torch.Tensor, ConsistencyPair]:
    """Gradient of the summed ECT loss with respect to the student output f(x_t, t)."""
    net, x0 = tiny_net(), shapes(6)
    pair = objective.draw(net, x0, None, step, StepRandom(torch.Generator().manual_seed(4)))
    pair.student = pair.student.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective.loss(pair, step).sum(), pair.student)
    return grad, pair


def _unit(g: torch.Tensor) -> torch.Tensor:
    return g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Per-example relative agreement of two gradient batches."""
    err = (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)
    return bool((err < 1e-5).all())


def _distance_gradient(distance, pair) -> torch.Tensor:
    f = pair.student.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(distance(f, pair.target).sum(), f)
    return g


def test_aligned_mode_sends_w_times_unit_gradient():
    from ayt.build import build_objective
    from ayt.config import load_config

    config = load_config(None, ["distance.mode=aligned", "distance.name=pseudo_huber", "objective.stage_steps=null", "objective.q=256"])
    grad, pair = _output_gradient(build_objective(config), step=0)
    expected = pair.weight.view(-1, 1, 1, 1) * _unit(_distance_gradient(build_distance("pseudo_huber"), pair))
    assert _close(grad, expected)
    assert torch.allclose(grad.flatten(1).norm(dim=1), pair.weight, rtol=1e-4)


def test_pixel_plus_aligned_mode_ramps_lambda():
    from ayt.build import build_objective
    from ayt.config import load_config

    overrides = ["distance.mode=pixel+aligned", "distance.name=l2", "distance.pixel=pseudo_huber",
                 "distance.weight=0.5", "distance.ramp_steps=100", "objective.stage_steps=null", "objective.q=256"]
    objective = build_objective(load_config(None, overrides))
    assert objective.extra_lambda(0) == 0 and objective.extra_lambda(50) == 0.25 and objective.extra_lambda(500) == 0.5
    grad, pair = _output_gradient(objective, step=50)
    w = pair.weight.view(-1, 1, 1, 1)
    pixel = _distance_gradient(build_distance("pseudo_huber"), pair)
    aligned = _unit(_distance_gradient(build_distance("l2"), pair))
    assert _close(grad, w * (pixel + 0.25 * aligned))
